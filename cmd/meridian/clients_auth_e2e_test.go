package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/meridian-registry/meridian/node/clustertest/admin"
)

// helm, skopeo and podman, real clients, against a node over HTTPS with a
// robot account: refused without credentials, then helm registry login
// with helm push and helm pull of a chart, skopeo copy and inspect with
// --creds, and podman login, build (FROM scratch), push and pull. Each is
// left out when its client is not installed (make test installs helm with
// go install, skopeo and podman from Debian's packages).
func TestHelmSkopeoPodmanWithCredentials(t *testing.T) {
	helm, skopeo, podman := os.Getenv("MERIDIAN_HELM"), os.Getenv("MERIDIAN_SKOPEO"), os.Getenv("MERIDIAN_PODMAN")
	if helm == "" && skopeo == "" && podman == "" {
		t.Skip("MERIDIAN_HELM, MERIDIAN_SKOPEO and MERIDIAN_PODMAN are not set; `make test` installs the clients and sets them")
	}
	e2eNeedBinary(t)
	dir := t.TempDir()
	p, pkiDir := e2eServeHTTPS(t, dir)
	host := p.ready.HTTPAddr

	// Ready means the first admin exists.
	p.poll("HTTPS readyz", time.Minute, func() error {
		resp, err := httpsClient(t, pkiDir).Get("https://" + host + "/readyz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s", resp.Status)
		}
		return nil
	})
	cmd := exec.Command(e2eBinary, "robot", "create", "charts", "--scope", "charts:pull,push", "--addr", p.ready.GRPCAddr)
	cmd.Env = e2eEnv()
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("robot create: %v", err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	user, secret := "robot+charts", lines[len(lines)-1]

	home := filepath.Join(dir, "home")
	env := []string{"HOME=" + home, "SSL_CERT_FILE=" + filepath.Join(pkiDir, "ca.crt"), "DOCKER_CONFIG=" + filepath.Join(home, "docker"),
		"XDG_CONFIG_HOME=" + filepath.Join(home, "config"), "XDG_CACHE_HOME=" + filepath.Join(home, "cache"),
		"XDG_DATA_HOME=" + filepath.Join(home, "data"), "XDG_RUNTIME_DIR=" + filepath.Join(home, "run"), "REGISTRY_AUTH_FILE=" + filepath.Join(home, "auth.json")}
	os.MkdirAll(filepath.Join(home, "run"), 0o700)
	// podman and skopeo read it before they try the registry.
	os.WriteFile(filepath.Join(home, "auth.json"), []byte(`{"auths":{}}`), 0o600)
	run := func(bin string, args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		c := exec.CommandContext(ctx, bin, args...)
		c.Dir = dir
		c.Env = e2eEnv(env...)
		b, err := c.CombinedOutput()
		return string(b), err
	}
	must := func(bin string, args ...string) string {
		t.Helper()
		out, err := run(bin, args...)
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", filepath.Base(bin), strings.Join(args, " "), err, out)
		}
		return out
	}
	refused := func(what, out string, err error) {
		t.Helper()
		low := strings.ToLower(out)
		if err == nil || !(strings.Contains(low, "unauthorized") || strings.Contains(low, "401") || strings.Contains(low, "authentication required")) {
			t.Errorf("%s without credentials: %v\n%s", what, err, out)
		}
	}
	if helm != "" {
		must(helm, "create", "mychart")
		must(helm, "package", "mychart", "-d", dir)
		chart := filepath.Join(dir, "mychart-0.1.0.tgz")
		out, err := run(helm, "push", chart, "oci://"+host+"/charts")
		refused("helm push", out, err)
		must(helm, "registry", "login", host, "-u", user, "-p", secret)
		out = must(helm, "push", chart, "oci://"+host+"/charts")
		if !strings.Contains(out, "Digest:") {
			t.Errorf("helm push printed no digest:\n%s", out)
		}
		pulled := filepath.Join(dir, "pulled")
		os.MkdirAll(pulled, 0o755)
		must(helm, "pull", "oci://"+host+"/charts/mychart", "--version", "0.1.0", "-d", pulled)
		if _, err := os.Stat(filepath.Join(pulled, "mychart-0.1.0.tgz")); err != nil {
			t.Errorf("helm pull: %v", err)
		}
	}
	if skopeo != "" {
		// The source image, pushed by the admin.
		ref, _ := name.ParseReference(host + "/charts/src:v1")
		img, _ := random.Image(2048, 2)
		tr := admin.Transport(httpsTransport(t, pkiDir))
		if err := remote.Write(ref, img, remote.WithTransport(tr)); err != nil {
			t.Fatal(err)
		}
		want, _ := img.Digest()
		caDir := caDirOf(t, dir, pkiDir)
		certs := "--cert-dir=" + caDir
		out, err := run(skopeo, "inspect", certs, "docker://"+host+"/charts/src:v1")
		refused("skopeo inspect", out, err)
		out = must(skopeo, "inspect", certs, "--creds", user+":"+secret, "--format", "{{.Digest}}", "docker://"+host+"/charts/src:v1")
		if strings.TrimSpace(out) != want.String() {
			t.Errorf("skopeo inspect: digest %q, want %s", out, want)
		}
		must(skopeo, "copy", "--src-cert-dir", caDir, "--dest-cert-dir", caDir, "--src-creds", user+":"+secret,
			"--dest-creds", user+":"+secret, "docker://"+host+"/charts/src:v1", "docker://"+host+"/charts/copy:v1")
		got, err := remote.Image(mustRef(t, host+"/charts/copy:v1"), remote.WithTransport(tr))
		if err != nil {
			t.Fatal(err)
		}
		if d, _ := got.Digest(); d != want {
			t.Errorf("skopeo's copy has digest %s, want %s", d, want)
		}
	}
	if podman != "" {
		// Storage of its own in the test's directory, vfs: nothing of the
		// host's podman is touched.
		// (podman wants a run root of at most 50 characters).
		runroot, err := os.MkdirTemp("", "mpod")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(runroot) })
		store := []string{"--root", filepath.Join(dir, "podman"), "--runroot", runroot, "--storage-driver", "vfs"}
		pod := func(args ...string) []string { return append(slices.Clone(store), args...) }
		image := host + "/charts/podman:v1"
		ctxDir := filepath.Join(dir, "podman-build")
		os.MkdirAll(ctxDir, 0o755)
		os.WriteFile(filepath.Join(ctxDir, "Containerfile"), []byte("FROM scratch\nCOPY hello /hello\n"), 0o644)
		os.WriteFile(filepath.Join(ctxDir, "hello"), []byte("hello from podman\n"), 0o644)
		must(podman, pod("build", "-q", "-t", image, ctxDir)...)
		out, err := run(podman, pod("push", "--cert-dir", caDirOf(t, dir, pkiDir), image)...)
		refused("podman push", out, err)
		must(podman, pod("login", "--cert-dir", caDirOf(t, dir, pkiDir), "-u", user, "-p", secret, host)...)
		must(podman, pod("push", "--cert-dir", caDirOf(t, dir, pkiDir), image)...)
		must(podman, pod("rmi", image)...)
		must(podman, pod("pull", "--cert-dir", caDirOf(t, dir, pkiDir), image)...)
	}
	p.stop()
}

// caDirOf is a directory holding only the cluster CA, as skopeo and podman
// take it (*.crt trusted; a *.key there would be taken for a client
// certificate).
func caDirOf(t *testing.T, dir, pkiDir string) string {
	caDir := filepath.Join(dir, "ca-only")
	if _, err := os.Stat(filepath.Join(caDir, "ca.crt")); err == nil {
		return caDir
	}
	os.MkdirAll(caDir, 0o700)
	caPEM, err := os.ReadFile(filepath.Join(pkiDir, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(caDir, "ca.crt"), caPEM, 0o600)
	return caDir
}

func mustRef(t *testing.T, s string) name.Reference {
	t.Helper()
	r, err := name.ParseReference(s)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func httpsTransport(t *testing.T, pkiDir string) *http.Transport {
	t.Helper()
	caPEM, err := os.ReadFile(filepath.Join(pkiDir, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	return &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}}
}

func httpsClient(t *testing.T, pkiDir string) *http.Client {
	return &http.Client{Transport: httpsTransport(t, pkiDir), Timeout: 10 * time.Second}
}
