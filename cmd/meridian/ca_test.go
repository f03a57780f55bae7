package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meridian-registry/meridian/node/pki"
)

// The shapes scripts rely on: ca init --dir writes ca.crt, ca.key and
// gossip.key; ca issue --dir --role --id writes ID.crt and ID.key, loadable
// as a member identity.
func TestCACommands(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	if err := ca([]string{"init", "--dir", dir, "--cluster-id", "prod"}); err != nil {
		t.Fatal(err)
	}
	if err := ca([]string{"issue", "--dir", dir, "--role", "gateway", "--id", "gw-1", "--dns", "registry.example", "--dns", "r2.example", "--ip", "127.0.0.1"}); err != nil {
		t.Fatal(err)
	}
	s, err := pki.Open(filepath.Join(dir, "ca.crt"), filepath.Join(dir, "gw-1.crt"), filepath.Join(dir, "gw-1.key"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := s.Identity().String(); got != "spiffe://prod/gateway/gw-1" {
		t.Errorf("identity %s", got)
	}
	if _, err := os.Stat(filepath.Join(dir, "gossip.key")); err != nil {
		t.Error(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"init", "--dir", dir}, "already exists"},
		{[]string{"init"}, "--dir is required"},
		{[]string{"issue", "--dir", dir, "--id", "x"}, "--role is required"},
		{[]string{"issue", "--dir", dir, "--role", "node"}, "--id is required"},
		{[]string{"issue", "--dir", dir, "--role", "root", "--id", "x"}, `role "root"`},
		{[]string{"issue", "--dir", dir, "--role", "node", "--id", "../x"}, `id "../x"`},
		{[]string{"issue", "--dir", dir, "--role", "node", "--id", "x", "--ip", "host"}, "not an IP address"},
		{[]string{"issue", "--dir", t.TempDir(), "--role", "node", "--id", "x"}, "ca init"},
		{[]string{"rotate"}, "unknown subcommand"},
	} {
		err := ca(tc.args)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("meridian ca %s: %v, want an error with %q", strings.Join(tc.args, " "), err, tc.want)
		}
	}
}

// ca bootstrap, as an init step runs it before every start: the first run
// makes the CA, the certificates and the admin password; a second run with
// one more node issues only that node's certificate and keeps every other
// file byte for byte (a changed CA or password would lock the running
// cluster out).
func TestCABootstrap(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	args := []string{"bootstrap", "--dir", dir, "--cluster-id", "prod", "--node", "n1", "--node", "n2",
		"--gateway", "gw", "--admin", "ops", "--admin-password"}
	if err := ca(args); err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string]string{"n1": "spiffe://prod/node/n1", "gw": "spiffe://prod/gateway/gw", "ops": "spiffe://prod/admin/ops"} {
		s, err := pki.OpenWithCRL(filepath.Join(dir, pki.CACertFile), filepath.Join(dir, pki.CRLFile),
			filepath.Join(dir, id+".crt"), filepath.Join(dir, id+".key"), nil)
		if err != nil {
			t.Fatalf("%s: %v", id, err)
		}
		if got := s.Identity().String(); got != want {
			t.Errorf("%s: identity %s, want %s", id, got, want)
		}
	}
	pwFile := filepath.Join(dir, "admin-password")
	fi, err := os.Stat(pwFile)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("admin-password has mode %v, want 0600", fi.Mode().Perm())
	}
	before := map[string][]byte{}
	for _, f := range []string{pki.CACertFile, pki.CAKeyFile, pki.GossipKeyFile, "n1.crt", "n1.key", "admin-password"} {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		before[f] = b
	}
	if pw := strings.TrimSpace(string(before["admin-password"])); len(pw) < 40 {
		t.Errorf("generated password %d characters long, want 256 bits", len(pw))
	}
	if err := ca(append(args, "--node", "n3")); err != nil {
		t.Fatal(err)
	}
	for f, b := range before {
		if now, _ := os.ReadFile(filepath.Join(dir, f)); string(now) != string(b) {
			t.Errorf("the second run changed %s", f)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "n3.crt")); err != nil {
		t.Errorf("the second run did not issue n3's certificate: %v", err)
	}
	if err := os.Remove(filepath.Join(dir, "n2.key")); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"bootstrap"}, "--dir is required"},
		{args, "n2.crt is there but not its key"},
		{[]string{"bootstrap", "--dir", dir, "--node", "x", "--gateway", "x"}, `"x" is given twice`},
		{[]string{"bootstrap", "--dir", t.TempDir(), "--node", "../x"}, `id "../x"`},
		{[]string{"bootstrap", "--dir", dir, "--cluster-id", "staging", "--node", "n1"}, `the CA of cluster "prod", not "staging"`},
	} {
		err := ca(tc.args)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("meridian ca %s: %v, want an error with %q", strings.Join(tc.args, " "), err, tc.want)
		}
	}
}
