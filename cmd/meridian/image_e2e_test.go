package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/meridian-registry/meridian/node/clustertest/admin"
)

// TestContainerImage builds the container image the way `make image` does
// (deploy/docker/Dockerfile.local around a static binary, FROM scratch),
// runs it with a mounted admin password, and checks what an operator
// relies on: it runs as a non-root user, its HEALTHCHECK turns healthy,
// and a registry client pushes and pulls through it. It skips where no
// Docker engine runs.
func TestContainerImage(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs a container image")
	}
	if err := exec.Command("docker", "info").Run(); err != nil {
		t.Skipf("no Docker engine here (docker info: %v)", err)
	}
	docker := func(args ...string) string {
		t.Helper()
		out, err := exec.Command("docker", args...).CombinedOutput()
		if err != nil {
			t.Fatalf("docker %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return strings.TrimSpace(string(out))
	}
	ctxDir := t.TempDir()
	if err := os.Mkdir(filepath.Join(ctxDir, "data"), 0o755); err != nil {
		t.Fatal(err)
	}
	build := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(ctxDir, "meridian"), ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("static build: %v\n%s", err, out)
	}
	image := fmt.Sprintf("meridian-e2e:%d", time.Now().UnixNano())
	docker("build", "-q", "-f", filepath.Join("..", "..", "deploy", "docker", "Dockerfile.local"), "-t", image, ctxDir)
	t.Cleanup(func() { exec.Command("docker", "rmi", "-f", image).Run() })
	if user := docker("inspect", "-f", "{{.Config.User}}", image); user != "65532:65532" {
		t.Fatalf("the image runs as %q, want the non-root 65532:65532", user)
	}

	secrets := t.TempDir()
	os.Chmod(secrets, 0o755)
	// The harness's clients log in as admin with admin.AdminPassword.
	if err := os.WriteFile(filepath.Join(secrets, "admin-password"), []byte(admin.AdminPassword+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	id := docker("run", "-d", "-p", "127.0.0.1::5000", "-v", secrets+":/run/secrets:ro", image,
		"serve", "--data-dir", "/data", "--node-id", "box", "--admin-password-file", "/run/secrets/admin-password")
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := exec.Command("docker", "logs", id).CombinedOutput()
			t.Logf("container log:\n%s", out)
		}
		exec.Command("docker", "rm", "-f", id).Run()
	})
	hostPort := docker("port", id, "5000/tcp")
	hostPort = strings.Split(hostPort, "\n")[0]

	deadline := time.Now().Add(90 * time.Second)
	for {
		health := docker("inspect", "-f", "{{.State.Health.Status}}", id)
		if health == "healthy" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the container is %q 90s after it started", health)
		}
		time.Sleep(time.Second)
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	img, err := random.Image(4096, 2)
	if err != nil {
		t.Fatal(err)
	}
	ref, err := name.ParseReference(hostPort+"/box/app:v1", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img, remote.WithContext(ctx)); err != nil {
		t.Fatalf("push into the container: %v", err)
	}
	e2eCheckImage(t, ref, img)
	anonymous := &http.Client{Transport: &http.Transport{}}
	resp, err := anonymous.Get("http://" + hostPort + "/v2/box/app/tags/list")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("an anonymous request got %d, want 401", resp.StatusCode)
	}
}
