package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meridian-registry/meridian/node/clustertest/admin"
)

// clientBinary is a registry client the Makefile installs (MERIDIAN_CRANE,
// MERIDIAN_ORAS); tests that need one skip without it.
func clientBinary(t *testing.T, env string) string {
	t.Helper()
	bin := os.Getenv(env)
	if bin == "" {
		t.Skipf("%s is not set; `make test` installs the client and sets it", env)
	}
	return bin
}

// crane, oras and regctl, real clients, push and pull over HTTPS trusting
// the cluster CA as any Go client does (SSL_CERT_FILE), and refuse the
// registry without it. Authentication is on: without logging in each is
// refused; then crane logs in as a robot, oras as a user with push on the
// prefix, regctl as the admin (each through the token flow).
func TestClientsOverHTTPS(t *testing.T) {
	crane, oras, regctl := clientBinary(t, "MERIDIAN_CRANE"), clientBinary(t, "MERIDIAN_ORAS"), clientBinary(t, "MERIDIAN_REGCTL")
	e2eNeedBinary(t)
	dir := t.TempDir()
	p, pkiDir := e2eServeHTTPS(t, dir)
	host := p.ready.HTTPAddr
	trust := []string{"SSL_CERT_FILE=" + filepath.Join(pkiDir, "ca.crt"), "HOME=" + dir, "DOCKER_CONFIG=" + filepath.Join(dir, "docker")}
	run := func(env []string, bin string, args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin, args...)
		cmd.Dir = dir
		cmd.Env = e2eEnv(env...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	must := func(bin string, args ...string) string {
		t.Helper()
		out, err := run(trust, bin, args...)
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", filepath.Base(bin), strings.Join(args, " "), err, out)
		}
		return out
	}
	// The catalog answers anyone (listing only what the caller may pull:
	// nothing, here).
	p.poll("HTTPS answers", time.Minute, func() error {
		out, err := run(trust, crane, "catalog", host)
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})

	// Identities for the clients, made with the CLI as the docs show.
	addr := "--addr=" + p.ready.GRPCAddr
	cli := func(stdin string, args ...string) string {
		t.Helper()
		cmd := exec.Command(e2eBinary, append(args, addr)...)
		cmd.Env = e2eEnv()
		cmd.Stdin = strings.NewReader(stdin)
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("meridian %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	// The last line: clients log warnings before what they print.
	lastLine := func(out string) string {
		lines := strings.Split(strings.TrimSpace(out), "\n")
		return lines[len(lines)-1]
	}
	robotSecret := lastLine(cli("", "robot", "create", "ci", "--scope", "clients:pull,push"))
	cli("dev-password-123\n", "user", "add", "dev", "--password-stdin")
	cli("", "access", "grant", "--user", "dev", "--prefix", "clients", "--actions", "pull,push")

	// Not logged in: refused, nothing pushed.
	os.WriteFile(filepath.Join(dir, "hello.txt"), []byte("hello over https\n"), 0o644)
	for _, c := range []struct {
		bin  string
		args []string
	}{
		{crane, []string{"digest", host + "/clients/none:v1"}},
		{oras, []string{"push", host + "/clients/none:v1", "hello.txt"}},
		{regctl, []string{"image", "digest", host + "/clients/none:v1"}},
	} {
		out, err := run(trust, c.bin, c.args...)
		if err == nil || !(strings.Contains(out, "401") || strings.Contains(strings.ToLower(out), "unauthorized")) {
			t.Errorf("%s without credentials: %v\n%s", filepath.Base(c.bin), err, out)
		}
	}
	must(crane, "auth", "login", host, "-u", "robot+ci", "-p", robotSecret)
	must(oras, "login", host, "-u", "dev", "-p", "dev-password-123")
	must(regctl, "registry", "login", host, "-u", admin.AdminUser, "-p", admin.AdminPassword)

	// crane: an image made of one layer, its manifest read back, a copy.
	if out, err := exec.Command("tar", "-C", dir, "-cf", filepath.Join(dir, "layer.tar"), "hello.txt").CombinedOutput(); err != nil {
		t.Fatalf("tar: %v\n%s", err, out)
	}
	must(crane, "append", "-f", filepath.Join(dir, "layer.tar"), "-t", host+"/clients/crane:v1")
	digest := strings.TrimSpace(must(crane, "digest", host+"/clients/crane:v1"))
	must(crane, "copy", host+"/clients/crane:v1", host+"/clients/crane-copy:v1")
	if got := strings.TrimSpace(must(crane, "digest", host+"/clients/crane-copy:v1")); got != digest {
		t.Errorf("the copy's digest %s, want %s", got, digest)
	}

	// oras: a file pushed as an artifact and pulled back.
	must(oras, "push", host+"/clients/oras:v1", "hello.txt")
	pulled := filepath.Join(dir, "pulled")
	must(oras, "pull", "-o", pulled, host+"/clients/oras:v1")
	if b, err := os.ReadFile(filepath.Join(pulled, "hello.txt")); err != nil || string(b) != "hello over https\n" {
		t.Errorf("oras pulled %q, %v", b, err)
	}

	// regctl: the digest as crane saw it, and a copy.
	if got := lastLine(must(regctl, "image", "digest", host+"/clients/crane:v1")); got != digest {
		t.Errorf("regctl reads digest %s, crane %s", got, digest)
	}
	must(regctl, "image", "copy", host+"/clients/crane:v1", host+"/clients/regctl-copy:v1")
	if got := strings.TrimSpace(must(crane, "digest", host+"/clients/regctl-copy:v1")); got != digest {
		t.Errorf("regctl's copy has digest %s, want %s", got, digest)
	}

	// Without the CA every one refuses the registry's certificate.
	noTrust := []string{"HOME=" + dir, "DOCKER_CONFIG=" + filepath.Join(dir, "docker"), "SSL_CERT_FILE=" + filepath.Join(dir, "hello.txt")}
	for _, c := range []struct {
		bin  string
		args []string
	}{
		{crane, []string{"digest", host + "/clients/crane:v1"}},
		{oras, []string{"manifest", "fetch", host + "/clients/oras:v1"}},
		{regctl, []string{"image", "digest", host + "/clients/crane:v1"}},
	} {
		out, err := run(noTrust, c.bin, c.args...)
		if err == nil || !strings.Contains(out, "certificate") {
			t.Errorf("%s without the CA: %v\n%s", filepath.Base(c.bin), err, out)
		}
	}
	p.stop()
}

// e2eServeHTTPS starts `meridian serve` in dir serving the OCI API over
// HTTPS with a certificate for 127.0.0.1 from a new cluster CA in
// dir/pki, and returns it once its ready file is written, with the PKI
// directory.
func e2eServeHTTPS(t *testing.T, dir string) (*e2eProc, string) {
	t.Helper()
	pkiDir := filepath.Join(dir, "pki")
	e2eMeridian(t, "ca", "init", "--dir", pkiDir)
	e2eMeridian(t, "ca", "issue", "--dir", pkiDir, "--role", "node", "--id", "web", "--ip", "127.0.0.1")
	ready := filepath.Join(dir, "ready.json")
	p := e2eStart(t, ready, e2eEnv(), slices.Concat([]string{"serve", "--node-id", "web", "--data-dir", filepath.Join(dir, "data"),
		"--ready-file", ready, "--http-tls-cert", filepath.Join(pkiDir, "web.crt"), "--http-tls-key", filepath.Join(pkiDir, "web.key")},
		e2eLoopback)...)
	p.waitWritten()
	return p, pkiDir
}
