package pki

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
)

// KeyPair is a certificate and key for HTTPS to registry clients (from any
// CA: the cluster's, a public one, cert-manager's), re-read when the files
// change so a renewed certificate needs no restart (see watched).
type KeyPair struct {
	files *watched[*tls.Certificate]
}

// OpenKeyPair loads certFile and keyFile.
func OpenKeyPair(certFile, keyFile string, log *slog.Logger) (*KeyPair, error) {
	if certFile == "" || keyFile == "" {
		return nil, errors.New("HTTPS needs both --http-tls-cert and --http-tls-key")
	}
	w, err := newWatched("HTTPS certificate", log, func(*tls.Certificate) (*tls.Certificate, error) {
		pair, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("load %s and %s: %w", certFile, keyFile, err)
		}
		return &pair, nil
	}, certFile, keyFile)
	if err != nil {
		return nil, err
	}
	return &KeyPair{files: w}, nil
}

// GetCertificate serves tls.Config.GetCertificate with the current pair.
func (k *KeyPair) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return k.files.get(), nil
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
