package pki

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"
)

// recheckEvery is how often a Source looks at its files' modification
// times again: at most once per interval, on a handshake.
const recheckEvery = time.Second

// ErrNoPeerCertificate: the peer presented no certificate.
var ErrNoPeerCertificate = errors.New("peer presented no certificate")

// Source is a process's member identity: the CA pool that peers are
// verified against, and its own certificate and key. It re-reads the files
// when they change (checked at most once a second, on a handshake); a
// change that does not load (a certificate that does not match the new
// key yet, a half-written rotation) keeps the last good material and is
// logged.
type Source struct {
	caFile, certFile, keyFile string
	log                       *slog.Logger

	mu      sync.Mutex
	cur     *material
	stamps  [3]stamp
	checked time.Time
	failed  string // the last reload error logged, so it is logged once
}

// material is one consistent load of the three files.
type material struct {
	pool *x509.CertPool
	cert *tls.Certificate
	self Identity
}

type stamp struct {
	mod  time.Time
	size int64
}

// Open loads caFile, certFile and keyFile. The certificate must be signed
// by a CA in caFile and carry a Meridian identity.
func Open(caFile, certFile, keyFile string, log *slog.Logger) (*Source, error) {
	if caFile == "" || certFile == "" || keyFile == "" {
		return nil, errors.New("cluster TLS needs all three of --tls-ca, --tls-cert and --tls-key")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Source{caFile: caFile, certFile: certFile, keyFile: keyFile, log: log}
	m, stamps, err := s.load()
	if err != nil {
		return nil, err
	}
	s.cur, s.stamps, s.checked = m, stamps, time.Now()
	return s, nil
}

// Identity is who this process is, from its certificate.
func (s *Source) Identity() Identity { return s.current().self }

// load reads and checks the three files.
func (s *Source) load() (*material, [3]stamp, error) {
	var stamps [3]stamp
	for i, f := range []string{s.caFile, s.certFile, s.keyFile} {
		st, err := os.Stat(f)
		if err != nil {
			return nil, stamps, err
		}
		stamps[i] = stamp{st.ModTime(), st.Size()}
	}
	caPEM, err := os.ReadFile(s.caFile)
	if err != nil {
		return nil, stamps, err
	}
	cas, err := parseCerts(caPEM)
	if err != nil {
		return nil, stamps, fmt.Errorf("%s: %w", s.caFile, err)
	}
	pool := x509.NewCertPool()
	for _, c := range cas {
		pool.AddCert(c)
	}
	pair, err := tls.LoadX509KeyPair(s.certFile, s.keyFile)
	if err != nil {
		return nil, stamps, fmt.Errorf("load %s and %s: %w", s.certFile, s.keyFile, err)
	}
	leaf := pair.Leaf // parsed by LoadX509KeyPair since Go 1.23
	self, err := IdentityOf(leaf)
	if err != nil {
		return nil, stamps, fmt.Errorf("%s: %w", s.certFile, err)
	}
	var inter []*x509.Certificate
	for _, der := range pair.Certificate[1:] {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, stamps, fmt.Errorf("%s: %w", s.certFile, err)
		}
		inter = append(inter, c)
	}
	if _, err := verifyChain(pool, leaf, inter); err != nil {
		return nil, stamps, fmt.Errorf("%s is not signed by a CA in %s: %w", s.certFile, s.caFile, err)
	}
	return &material{pool: pool, cert: &pair, self: self}, stamps, nil
}

// current returns the material, reloading it first when a file changed.
func (s *Source) current() *material {
	s.mu.Lock()
	defer s.mu.Unlock()
	if time.Since(s.checked) < recheckEvery {
		return s.cur
	}
	s.checked = time.Now()
	changed := false
	for i, f := range []string{s.caFile, s.certFile, s.keyFile} {
		st, err := os.Stat(f)
		if err != nil || st.ModTime() != s.stamps[i].mod || st.Size() != s.stamps[i].size {
			changed = true
			break
		}
	}
	if !changed {
		return s.cur
	}
	m, stamps, err := s.load()
	if err != nil {
		if msg := err.Error(); msg != s.failed {
			s.failed = msg
			s.log.Warn("cluster TLS files changed but do not load; keeping the previous certificate", "err", err)
		}
		return s.cur
	}
	if m.self != s.cur.self {
		// A certificate for another identity is a mistake, not a rotation.
		if msg := "identity " + m.self.String(); msg != s.failed {
			s.failed = msg
			s.log.Error("new cluster certificate names another identity; keeping the previous one", "was", s.cur.self, "now", m.self)
		}
		return s.cur
	}
	s.cur, s.stamps, s.failed = m, stamps, ""
	s.log.Info("cluster TLS reloaded", "identity", m.self, "not_after", m.cert.Leaf.NotAfter)
	return s.cur
}

// ServerConfig is the TLS configuration of a member listener (gRPC or
// Raft): TLS 1.3, a client certificate required and verified against the
// current CA pool, and the client's identity checked by allow (nil allows
// every role of this cluster; per-RPC role checks come on top). nextProtos
// is the ALPN list ("h2" for gRPC).
func (s *Source) ServerConfig(allow func(Identity) error, nextProtos ...string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			m := s.current()
			return &tls.Config{
				MinVersion:   tls.VersionTLS13,
				Certificates: []tls.Certificate{*m.cert},
				ClientAuth:   tls.RequireAndVerifyClientCert,
				ClientCAs:    m.pool,
				NextProtos:   nextProtos,
				VerifyConnection: func(cs tls.ConnectionState) error {
					return checkPeer(m, cs, allow)
				},
			}, nil
		},
	}
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

// checkPeer checks the identity of a verified peer.
func checkPeer(m *material, cs tls.ConnectionState, allow func(Identity) error) error {
	id, err := PeerIdentity(cs)
	if err != nil {
		return err
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
