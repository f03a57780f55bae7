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
