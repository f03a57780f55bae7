package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"time"
)

// File names inside a CA directory.
const (
	CACertFile    = "ca.crt"
	CAKeyFile     = "ca.key"
	GossipKeyFile = "gossip.key"
	// CRLFile is the CA's certificate revocation list (--tls-crl).
	CRLFile = "ca.crl"
)

const (
	// CAValidity is how long a new cluster CA is valid.
	CAValidity = 10 * 365 * 24 * time.Hour
	// DefaultValidity is how long an issued member certificate is valid
	// unless the caller asks otherwise.
	DefaultValidity = 365 * 24 * time.Hour
	// clockSkew backdates NotBefore so a peer whose clock runs a little
	// behind accepts a certificate issued a moment ago.
	clockSkew = 5 * time.Minute
)

// ErrExists: InitCA found a CA already in the directory. A CA is never
// overwritten: every certificate it signed would stop working.
var ErrExists = errors.New("a CA already exists there")

// InitCA creates a cluster CA for clusterID in dir: an ECDSA P-256 key
// (ca.key, 0600), a self-signed certificate carrying spiffe://<clusterID>
// (ca.crt) and a fresh 32-byte gossip key (gossip.key, 0600, base64 on one
// line, the format --gossip-key-file reads). dir is created 0700.
func InitCA(dir, clusterID string) error {
	if !ValidID(clusterID) {
		return fmt.Errorf("cluster id %q: use 1-63 letters, digits, '.', '_' or '-'", clusterID)
	}
	for _, f := range []string{CACertFile, CAKeyFile, GossipKeyFile} {
		if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
			return fmt.Errorf("%s: %w", filepath.Join(dir, f), ErrExists)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{Organization: []string{"Meridian"}, CommonName: "Meridian cluster CA " + clusterID},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(CAValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{{Scheme: "spiffe", Host: clusterID}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	gossip := make([]byte, 32)
	if _, err := rand.Read(gossip); err != nil {
		return err
	}
	// The keys first: a directory with a ca.crt is taken as initialized.
	if err := writeKey(filepath.Join(dir, CAKeyFile), key); err != nil {
		return err
	}
	if err := WriteFileAtomic(filepath.Join(dir, GossipKeyFile), []byte(base64.StdEncoding.EncodeToString(gossip)+"\n"), 0o600); err != nil {
		return err
	}
	ca, err := x509.ParseCertificate(der)
	if err != nil {
		return err
	}
	// An empty revocation list from the start, so members can name it in
	// --tls-crl before anything is revoked.
	if err := writeCRL(dir, ca, key, nil, 1); err != nil {
		return err
	}
	return WriteFileAtomic(filepath.Join(dir, CACertFile), pemCert(der), 0o644)
}

// Revoke adds the certificate in certFile to the CA's revocation list in
// dir (ca.crl, created if missing) and returns its serial number. Members
// that name the list in --tls-crl refuse that certificate once the new
// list reaches them (they re-read it when it changes); copy it wherever
// ca.crt goes.
func Revoke(dir, certFile string) (*big.Int, error) {
	ca, caKey, err := loadCA(dir)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(certFile)
	if err != nil {
		return nil, err
	}
	certs, err := parseCerts(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", certFile, err)
	}
	leaf := certs[0]
	if err := leaf.CheckSignatureFrom(ca); err != nil {
		return nil, fmt.Errorf("%s was not issued by the CA in %s", certFile, dir)
	}
	var entries []x509.RevocationListEntry
	number := int64(1)
	if old, err := os.ReadFile(filepath.Join(dir, CRLFile)); err == nil {
		block, _ := pem.Decode(old)
		if block == nil {
			return nil, fmt.Errorf("%s: no PEM X509 CRL", filepath.Join(dir, CRLFile))
		}
		crl, err := x509.ParseRevocationList(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", filepath.Join(dir, CRLFile), err)
		}
		entries = crl.RevokedCertificateEntries
		number = crl.Number.Int64() + 1
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	for _, e := range entries {
		if e.SerialNumber.Cmp(leaf.SerialNumber) == 0 {
			return leaf.SerialNumber, nil // already revoked
		}
	}
	entries = append(entries, x509.RevocationListEntry{SerialNumber: leaf.SerialNumber, RevocationTime: time.Now()})
	return leaf.SerialNumber, writeCRL(dir, ca, caKey, entries, number)
}

// EnsureCRL writes an empty revocation list into dir when it has none (a
// CA made before lists existed).
func EnsureCRL(dir string) error {
	if _, err := os.Stat(filepath.Join(dir, CRLFile)); err == nil || !errors.Is(err, os.ErrNotExist) {
		return err
	}
	ca, key, err := loadCA(dir)
	if err != nil {
		return err
	}
	return writeCRL(dir, ca, key, nil, 1)
}

// writeCRL signs and writes the CA's revocation list. Members read it from
// a file rather than fetching it, so its next update lies as far ahead as
// the CA's expiry.
func writeCRL(dir string, ca *x509.Certificate, key *ecdsa.PrivateKey, entries []x509.RevocationListEntry, number int64) error {
	now := time.Now()
	der, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{
		Number:                    big.NewInt(number),
		ThisUpdate:                now.Add(-clockSkew),
		NextUpdate:                ca.NotAfter,
		RevokedCertificateEntries: entries,
	}, ca, key)
	if err != nil {
		return err
	}
	return WriteFileAtomic(filepath.Join(dir, CRLFile), pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der}), 0o644)
}

// IssueRequest says what certificate Issue signs.
type IssueRequest struct {
	Role     string
	ID       string
	DNSNames []string      // extra SANs, for HTTPS to registry clients
	IPs      []net.IP      // likewise
	Validity time.Duration // DefaultValidity when zero
}

// Issue signs a member certificate with the CA in dir and writes
// dir/<ID>.crt and dir/<ID>.key (0600), replacing earlier ones: issuing
// again for the same id is how a certificate is renewed, and processes
// that use the files pick the new pair up without a restart. It returns
// the paths written.
func Issue(dir string, req IssueRequest) (certPath, keyPath string, err error) {
	ca, caKey, err := loadCA(dir)
	if err != nil {
		return "", "", err
	}
	cluster := trustDomainOf(ca)
	if cluster == "" {
		return "", "", fmt.Errorf("%s carries no spiffe://<cluster-id> URI: not a Meridian cluster CA", filepath.Join(dir, CACertFile))
	}
	id := Identity{Cluster: cluster, Role: req.Role, ID: req.ID}
	if err := id.Validate(); err != nil {
		return "", "", err
	}
	validity := req.Validity
	if validity == 0 {
		validity = DefaultValidity
	}
	if validity < 0 {
		return "", "", fmt.Errorf("validity %v: must be positive", validity)
	}
	now := time.Now()
	notAfter := now.Add(validity)
	if notAfter.After(ca.NotAfter) {
		notAfter = ca.NotAfter
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{Organization: []string{"Meridian"}, OrganizationalUnit: []string{req.Role}, CommonName: req.ID},
		NotBefore:    now.Add(-clockSkew),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		// Members are servers and clients of each other (gRPC, Raft).
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:        []*url.URL{id.URI()},
		DNSNames:    req.DNSNames,
		IPAddresses: req.IPs,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return "", "", err
	}
	certPath, keyPath = filepath.Join(dir, req.ID+".crt"), filepath.Join(dir, req.ID+".key")
	if err := writeKey(keyPath, key); err != nil {
		return "", "", err
	}
	if err := WriteFileAtomic(certPath, pemCert(der), 0o644); err != nil {
		return "", "", err
	}
	return certPath, keyPath, nil
}

// loadCA reads the CA certificate and key of dir.
// CAClusterID is the cluster id the CA in dir was made for.
func CAClusterID(dir string) (string, error) {
	ca, _, err := loadCA(dir)
	if err != nil {
		return "", err
	}
	return trustDomainOf(ca), nil
}

func loadCA(dir string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, CACertFile))
	if err != nil {
		return nil, nil, fmt.Errorf("read CA (run meridian ca init --dir %s first?): %w", dir, err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, CAKeyFile))
	if err != nil {
		return nil, nil, fmt.Errorf("read CA key: %w", err)
	}
	certs, err := parseCerts(certPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", filepath.Join(dir, CACertFile), err)
	}
	block, _ := pem.Decode(keyPEM)
	if block == nil {
		return nil, nil, fmt.Errorf("%s: no PEM block", filepath.Join(dir, CAKeyFile))
	}
	key, err := x509.ParseECPrivateKey(block.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", filepath.Join(dir, CAKeyFile), err)
	}
	// The CA file may hold two CAs during a rotation: sign with the one
	// that matches the key.
	for _, c := range certs {
		if pub, ok := c.PublicKey.(*ecdsa.PublicKey); ok && pub.Equal(&key.PublicKey) && c.IsCA {
			return c, key, nil
		}
	}
	return nil, nil, fmt.Errorf("%s holds no CA certificate for the key in %s", filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile))
}

// parseCerts parses every CERTIFICATE block of a PEM file.
func parseCerts(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, err
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("no certificate in PEM data")
	}
	return out, nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand never fails on supported platforms
	}
	return n
}

func pemCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return err
	}
	return WriteFileAtomic(path, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), 0o600)
}

// WriteFileAtomic writes b to path through a temporary file in the same
// directory and a rename, so a process that reloads the file never reads
// half of it. The file has mode perm whatever the umask.
func WriteFileAtomic(path string, b []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // a no-op after the rename
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
