package pki

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"
)

// ErrNoPeerCertificate: the peer presented no certificate.
var ErrNoPeerCertificate = errors.New("peer presented no certificate")

// ErrRevoked: the peer's certificate is on the revocation list.
var ErrRevoked = errors.New("certificate revoked")

// Source is a process's member identity: the CA pool that peers are
// verified against, and its own certificate and key, re-read when the
// files change (see watched). A new certificate that names another
// identity is refused: that is a mistake, not a rotation.
type Source struct {
	caFile, crlFile, certFile, keyFile string
	files                              *watched[*material]
}

// material is one consistent load of the files.
type material struct {
	pool *x509.CertPool
	cert *tls.Certificate
	self Identity
	// revoked are the serial numbers (decimal) the CRL lists.
	revoked map[string]bool
}

// Open loads caFile, certFile and keyFile. The certificate must be signed
// by a CA in caFile and carry a Meridian identity.
func Open(caFile, certFile, keyFile string, log *slog.Logger) (*Source, error) {
	return OpenWithCRL(caFile, "", certFile, keyFile, log)
}

// OpenWithCRL is Open with a certificate revocation list (crlFile, PEM,
// signed by a CA in caFile; "" for none): peers presenting a certificate
// it lists are refused. It is re-read when it changes, like the others.
func OpenWithCRL(caFile, crlFile, certFile, keyFile string, log *slog.Logger) (*Source, error) {
	if caFile == "" || certFile == "" || keyFile == "" {
		return nil, errors.New("cluster TLS needs all three of --tls-ca, --tls-cert and --tls-key")
	}
	s := &Source{caFile: caFile, crlFile: crlFile, certFile: certFile, keyFile: keyFile}
	files := []string{caFile, certFile, keyFile}
	if crlFile != "" {
		files = append(files, crlFile)
	}
	w, err := newWatched("cluster TLS", log, func(prev *material) (*material, error) {
		m, err := s.load()
		if err == nil && prev != nil && m.self != prev.self {
			return nil, fmt.Errorf("the new certificate names %s, not %s", m.self, prev.self)
		}
		return m, err
	}, files...)
	if err != nil {
		return nil, err
	}
	s.files = w
	return s, nil
}

// Identity is who this process is, from its certificate.
func (s *Source) Identity() Identity { return s.current().self }

// load reads and checks the three files.
func (s *Source) load() (*material, error) {
	caPEM, err := os.ReadFile(s.caFile)
	if err != nil {
		return nil, err
	}
	cas, err := parseCerts(caPEM)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", s.caFile, err)
	}
	pool := x509.NewCertPool()
	for _, c := range cas {
		pool.AddCert(c)
	}
	pair, err := tls.LoadX509KeyPair(s.certFile, s.keyFile)
	if err != nil {
		return nil, fmt.Errorf("load %s and %s: %w", s.certFile, s.keyFile, err)
	}
	leaf := pair.Leaf // parsed by LoadX509KeyPair since Go 1.23
	self, err := IdentityOf(leaf)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", s.certFile, err)
	}
	var inter []*x509.Certificate
	for _, der := range pair.Certificate[1:] {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", s.certFile, err)
		}
		inter = append(inter, c)
	}
	if _, err := verifyChain(pool, leaf, inter); err != nil {
		return nil, fmt.Errorf("%s is not signed by a CA in %s: %w", s.certFile, s.caFile, err)
	}
	m := &material{pool: pool, cert: &pair, self: self}
	if s.crlFile != "" {
		if m.revoked, err = loadCRL(s.crlFile, cas); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// loadCRL reads a PEM revocation list and checks that a CA in cas signed
// it: a list from anyone else could cut members off.
func loadCRL(path string, cas []*x509.Certificate) (map[string]bool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "X509 CRL" {
		return nil, fmt.Errorf("%s: no PEM X509 CRL", path)
	}
	crl, err := x509.ParseRevocationList(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	signed := false
	for _, ca := range cas {
		if crl.CheckSignatureFrom(ca) == nil {
			signed = true
			break
		}
	}
	if !signed {
		return nil, fmt.Errorf("%s: not signed by a CA in the CA file", path)
	}
	revoked := map[string]bool{}
	for _, e := range crl.RevokedCertificateEntries {
		revoked[e.SerialNumber.String()] = true
	}
	return revoked, nil
}

// current returns the material, reloading it first when a file changed.
func (s *Source) current() *material { return s.files.get() }

// ServerConfig is the TLS configuration of a member listener (gRPC or
// Raft): TLS 1.3, a client certificate required and verified against the
// current CA pool, and the client's identity checked by allow (nil allows
// every role of this cluster; per-RPC role checks come on top). nextProtos
// is the ALPN list ("h2" for gRPC).
func (s *Source) ServerConfig(allow func(Identity) error, nextProtos ...string) *tls.Config {
	return s.serverConfig(tls.RequireAndVerifyClientCert, allow, nextProtos)
}

// ServerConfigCertOptional is ServerConfig for a listener that also takes
// clients without a certificate (gRPC, where admin users may call admin
// methods with their credentials instead): a certificate, when given, is
// verified as strictly, and each call checks what the client proved.
func (s *Source) ServerConfigCertOptional(allow func(Identity) error, nextProtos ...string) *tls.Config {
	return s.serverConfig(tls.VerifyClientCertIfGiven, allow, nextProtos)
}

func (s *Source) serverConfig(auth tls.ClientAuthType, allow func(Identity) error, nextProtos []string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			m := s.current()
			return &tls.Config{
				MinVersion:   tls.VersionTLS13,
				Certificates: []tls.Certificate{*m.cert},
				ClientAuth:   auth,
				ClientCAs:    m.pool,
				NextProtos:   nextProtos,
				VerifyConnection: func(cs tls.ConnectionState) error {
					if len(cs.PeerCertificates) == 0 && auth == tls.VerifyClientCertIfGiven {
						return nil
					}
					return checkPeer(m, cs, allow)
				},
			}, nil
		},
	}
}

// ClientConfigCAOnly is the TLS configuration of a client without a
// certificate of its own (an admin user with credentials): it verifies
// the server against the CA in caFile and requires a node of that CA's
// cluster.
func ClientConfigCAOnly(caFile string, nextProtos ...string) (*tls.Config, error) {
	b, err := os.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("%s: no PEM certificate", caFile)
	}
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: nextProtos,
		// Verified below, by the CA and by identity, not by host name.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return ErrNoPeerCertificate
			}
			if _, err := verifyChain(pool, cs.PeerCertificates[0], cs.PeerCertificates[1:]); err != nil {
				return fmt.Errorf("server certificate: %w", err)
			}
			id, err := IdentityOf(cs.PeerCertificates[0])
			if err != nil {
				return err
			}
			if id.Role != RoleNode {
				return fmt.Errorf("%s is not a node", id)
			}
			return nil
		},
	}, nil
}

// ClientConfig is the TLS configuration for dialing a member: the server
// is verified against the current CA pool and by identity (expect; nil
// accepts any member of this cluster), not by host name, since members
// are reached at whatever address they advertise.
func (s *Source) ClientConfig(expect func(Identity) error, nextProtos ...string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		NextProtos: nextProtos,
		// Verification happens in VerifyConnection, against the pool of
		// the moment and by identity; the handshake still proves the
		// server holds the certificate's key.
		InsecureSkipVerify: true,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return s.current().cert, nil
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			m := s.current()
			if len(cs.PeerCertificates) == 0 {
				return ErrNoPeerCertificate
			}
			if _, err := verifyChain(m.pool, cs.PeerCertificates[0], cs.PeerCertificates[1:]); err != nil {
				return fmt.Errorf("server certificate: %w", err)
			}
			return checkPeer(m, cs, expect)
		},
	}
}

// checkPeer checks the identity of a verified peer, and that its
// certificate is not revoked.
func checkPeer(m *material, cs tls.ConnectionState, allow func(Identity) error) error {
	id, err := PeerIdentity(cs)
	if err != nil {
		return err
	}
	if leaf := cs.PeerCertificates[0]; m.revoked[leaf.SerialNumber.String()] {
		return fmt.Errorf("%w: %s (serial %s)", ErrRevoked, id, leaf.SerialNumber)
	}
	if id.Cluster != m.self.Cluster {
		return fmt.Errorf("%w: peer %s, this cluster %s", ErrWrongCluster, id, m.self.Cluster)
	}
	if allow != nil {
		return allow(id)
	}
	return nil
}

// PeerIdentity returns the identity of a connection's peer certificate.
// The chain must already have been verified (by the handshake).
func PeerIdentity(cs tls.ConnectionState) (Identity, error) {
	if len(cs.PeerCertificates) == 0 {
		return Identity{}, ErrNoPeerCertificate
	}
	return IdentityOf(cs.PeerCertificates[0])
}

// verifyChain verifies leaf against pool for use as a member certificate
// (client and server).
func verifyChain(pool *x509.CertPool, leaf *x509.Certificate, intermediates []*x509.Certificate) ([][]*x509.Certificate, error) {
	inter := x509.NewCertPool()
	for _, c := range intermediates {
		inter.AddCert(c)
	}
	return leaf.Verify(x509.VerifyOptions{
		Roots:         pool,
		Intermediates: inter,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
}
