package pki

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"
)

// KeyPair is a certificate and key for HTTPS to registry clients (from any
// CA: the cluster's, a public one, cert-manager's), re-read when the files
// change so a renewed certificate needs no restart. A change that does not
// load keeps the last good pair and is logged.
type KeyPair struct {
	certFile, keyFile string
	log               *slog.Logger

	mu      sync.Mutex
	cur     *tls.Certificate
	stamps  [2]stamp
	checked time.Time
	failed  string
}

// OpenKeyPair loads certFile and keyFile.
func OpenKeyPair(certFile, keyFile string, log *slog.Logger) (*KeyPair, error) {
	if certFile == "" || keyFile == "" {
		return nil, errors.New("HTTPS needs both --http-tls-cert and --http-tls-key")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	k := &KeyPair{certFile: certFile, keyFile: keyFile, log: log}
	cert, stamps, err := k.load()
	if err != nil {
		return nil, err
	}
	k.cur, k.stamps, k.checked = cert, stamps, time.Now()
	return k, nil
}

func (k *KeyPair) load() (*tls.Certificate, [2]stamp, error) {
	var stamps [2]stamp
	for i, f := range []string{k.certFile, k.keyFile} {
		st, err := os.Stat(f)
		if err != nil {
			return nil, stamps, err
		}
		stamps[i] = stamp{st.ModTime(), st.Size()}
	}
	pair, err := tls.LoadX509KeyPair(k.certFile, k.keyFile)
	if err != nil {
		return nil, stamps, fmt.Errorf("load %s and %s: %w", k.certFile, k.keyFile, err)
	}
	return &pair, stamps, nil
}

// GetCertificate serves tls.Config.GetCertificate with the current pair.
func (k *KeyPair) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if time.Since(k.checked) < recheckEvery {
		return k.cur, nil
	}
	k.checked = time.Now()
	for i, f := range []string{k.certFile, k.keyFile} {
		st, err := os.Stat(f)
		if err != nil || st.ModTime() != k.stamps[i].mod || st.Size() != k.stamps[i].size {
			cert, stamps, err := k.load()
			if err != nil {
				if msg := err.Error(); msg != k.failed {
					k.failed = msg
					k.log.Warn("HTTPS certificate files changed but do not load; keeping the previous certificate", "err", err)
				}
				return k.cur, nil
			}
			k.cur, k.stamps, k.failed = cert, stamps, ""
			k.log.Info("HTTPS certificate reloaded", "subject", cert.Leaf.Subject, "not_after", cert.Leaf.NotAfter)
			break
		}
	}
	return k.cur, nil
}

// ServerConfig is the TLS configuration of the registry's HTTPS listener:
// TLS 1.2 or newer, HTTP/2 offered first.
func (k *KeyPair) ServerConfig() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: k.GetCertificate,
		NextProtos:     []string{"h2", "http/1.1"},
	}
}
