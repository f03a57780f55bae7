package gateway

import (
	"log/slog"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meridian-registry/meridian/node/pki"
	"github.com/meridian-registry/meridian/node/transport"
)

func TestCertificateCovers(t *testing.T) {
	for _, tc := range []struct {
		cert, id string
		want     bool
	}{
		{"gw-east", "gw-east", true},
		{"gw-east", "gw-east-7d9f8c6b5-x2x9k", true},
		{"gw-east", "gw-east-", false},
		{"gw-east", "gw-eastern", false},
		{"gw-east", "gw-eas", false},
		{"gw-east", "other", false},
		{"gw-1", "gw-10", false},
	} {
		if got := CertificateCovers(tc.cert, tc.id); got != tc.want {
			t.Errorf("CertificateCovers(%q, %q) = %v, want %v", tc.cert, tc.id, got, tc.want)
		}
	}
}

// TestStandaloneIDFromSharedCertificate: replicas sharing one gateway
// certificate start under their own ids; an id the certificate does not
// name, or a certificate of another role, is refused.
func TestStandaloneIDFromSharedCertificate(t *testing.T) {
	dir := t.TempDir()
	if err := pki.InitCA(dir, "meridian"); err != nil {
		t.Fatal(err)
	}
	open := func(role, id string) *transport.Trust {
		t.Helper()
		if _, _, err := pki.Issue(dir, pki.IssueRequest{Role: role, ID: id}); err != nil {
			t.Fatal(err)
		}
		src, err := pki.Open(filepath.Join(dir, pki.CACertFile), filepath.Join(dir, id+".crt"), filepath.Join(dir, id+".key"), slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		return &transport.Trust{Source: src}
	}
	gw, node := open(pki.RoleGateway, "gw-east"), open(pki.RoleNode, "node-1")
	for _, tc := range []struct {
		name  string
		trust *transport.Trust
		id    string
		ok    bool
	}{
		{"certificate id", gw, "", true},
		{"same id", gw, "gw-east", true},
		{"replica suffix", gw, "gw-east-7d9f8c6b5-x2x9k", true},
		{"other id", gw, "gw-west-1", false},
		{"longer name", gw, "gw-eastern", false},
		{"node certificate", node, "node-1", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := NewStandalone(StandaloneConfig{
				ID: tc.id, ClusterID: "meridian", Region: "east", HTTPAddr: "127.0.0.1:0",
				GossipAddr: "127.0.0.1:0", Join: []string{"127.0.0.1:5003"},
				Regions: []RegionStore{{Name: "east", Store: "file://" + t.TempDir()}},
				Gateway: DefaultConfig(), Trust: tc.trust, GossipKeys: [][]byte{make([]byte, 32)},
			})
			if tc.ok && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if !tc.ok && (err == nil || !strings.Contains(err.Error(), "tls_cert is")) {
				t.Fatalf("want a refusal naming the certificate, got %v", err)
			}
		})
	}
}
