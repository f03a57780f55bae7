package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meridian-registry/meridian/node/clustertest/admin"
)

// dockerHostIP is an address of this host that the docker engine reaches
// and does not treat as an insecure registry (it skips TLS checks for
// 127.0.0.0/8): the first non-loopback IPv4 address.
func dockerHostIP(t *testing.T) string {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Skip(err)
	}
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil && !ipn.IP.IsLoopback() {
			return ipn.IP.String()
		}
	}
	t.Skip("no non-loopback IPv4 address for the docker engine to reach")
	return ""
}

// The docker CLI, a real client, pushes and pulls over HTTPS when the
// engine trusts the cluster CA (/etc/docker/certs.d/<host:port>/ca.crt),
// and refuses the registry when it does not. Authentication is on: a push
// before docker login is refused; after it (the token flow) it works.
func TestDockerOverHTTPS(t *testing.T) {
	if err := exec.Command("docker", "info").Run(); err != nil {
		t.Skip("no docker engine runs here")
	}
	e2eNeedBinary(t)
	ip := dockerHostIP(t)
	dir := t.TempDir()
	pkiDir := filepath.Join(dir, "pki")
	docker := func(args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "docker", args...)
		// Its own client config: the login stays with this test.
		cmd.Env = append(os.Environ(), "DOCKER_CONFIG="+filepath.Join(dir, "docker-config"))
		if args[0] == "login" {
			cmd.Stdin = strings.NewReader(admin.AdminPassword + "\n")
		}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	e2eMeridian(t, "ca", "init", "--dir", pkiDir)
	e2eMeridian(t, "ca", "issue", "--dir", pkiDir, "--role", "node", "--id", "web", "--ip", ip)

	ready := filepath.Join(dir, "ready.json")
	p := e2eStart(t, ready, e2eEnv(), slices.Concat([]string{"serve", "--node-id", "web", "--data-dir", filepath.Join(dir, "data"),
		"--ready-file", ready, "--http-tls-cert", filepath.Join(pkiDir, "web.crt"), "--http-tls-key", filepath.Join(pkiDir, "web.key")},
		e2eLoopback, []string{"--http-addr", ip + ":0"})...)
	p.waitWritten()
	host := p.ready.HTTPAddr

	certsDir := filepath.Join("/etc/docker/certs.d", host)
	if err := os.MkdirAll(certsDir, 0o755); err != nil {
		t.Skipf("cannot give the docker engine the CA: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(certsDir) })
	caPEM, err := os.ReadFile(filepath.Join(pkiDir, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(certsDir, "ca.crt"), caPEM, 0o644); err != nil {
		t.Fatal(err)
	}

	// An image of our own, FROM scratch: nothing to pull from anywhere.
	ctxDir := filepath.Join(dir, "image")
	os.MkdirAll(ctxDir, 0o755)
	stamp := fmt.Sprint(time.Now().UnixNano())
	os.WriteFile(filepath.Join(ctxDir, "hello"), []byte("hello "+stamp+"\n"), 0o644)
	os.WriteFile(filepath.Join(ctxDir, "Dockerfile"), []byte("FROM scratch\nCOPY hello /hello\n"), 0o644)
	tag := host + "/docker/hello:" + stamp
	if out, err := docker("build", "-q", "-t", tag, ctxDir); err != nil {
		t.Fatalf("docker build: %v\n%s", err, out)
	}
	t.Cleanup(func() { docker("rmi", "-f", tag) })
	if out, err := docker("push", tag); err == nil || !strings.Contains(strings.ToLower(out), "unauthorized") && !strings.Contains(out, "no basic auth credentials") {
		t.Fatalf("docker push before login: %v\n%s", err, out)
	}
	if out, err := docker("login", host, "-u", admin.AdminUser, "--password-stdin"); err != nil || !strings.Contains(out, "Login Succeeded") {
		t.Fatalf("docker login: %v\n%s", err, out)
	}
	if out, err := docker("push", tag); err != nil {
		t.Fatalf("docker push over HTTPS: %v\n%s", err, out)
	}
	if out, err := docker("rmi", tag); err != nil {
		t.Fatalf("docker rmi: %v\n%s", err, out)
	}
	if out, err := docker("pull", tag); err != nil {
		t.Fatalf("docker pull over HTTPS: %v\n%s", err, out)
	}

	// Without the CA the engine refuses the registry's certificate.
	os.RemoveAll(certsDir)
	docker("rmi", tag)
	out, err := docker("pull", tag)
	var exitErr *exec.ExitError
	if err == nil || !errors.As(err, &exitErr) || !strings.Contains(out, "certificate") {
		t.Errorf("docker pull without the CA: %v\n%s", err, out)
	}
	p.stop()
}
