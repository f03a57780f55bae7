package compose

import (
	"bytes"
	"context"
	"debug/elf"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// versitygwVersion is the versitygw the test's S3 image is built from when
// no static binary is given: the Makefile's VERSITYGW_VERSION.
const versitygwVersion = "v1.8.0"

// The containers of us-east (the region the test takes down), the nodes,
// and every node and gateway.
var (
	usEast      = []string{"us-east-1", "us-east-2", "s3-us-east", "gateway-us-east"}
	nodes       = []string{"us-east-1", "us-east-2", "eu-west-1", "eu-west-2", "ap-south-1"}
	longRunning = append(append([]string{}, nodes...), "gateway-us-east", "gateway-eu-west")
)

// TestComposeThreeRegions runs compose.yaml as a user would, with the S3
// servers swapped for a versitygw image built here (no image can be
// pulled): it waits for every node and gateway to be healthy, logs in
// through the us-east gateway with the generated admin password, pushes two
// images built FROM scratch with the docker CLI, takes every container of
// us-east down (both nodes, its S3 server, its gateway), pulls both images
// through the eu-west gateway and compares their contents, brings us-east
// back, and waits until all five nodes have applied the same log (equal
// applied index and state digest) and no region misses a blob; then pulls
// once more through the us-east gateway.
func TestComposeThreeRegions(t *testing.T) {
	if os.Getenv("MERIDIAN_COMPOSE") != "1" {
		t.Skip("set MERIDIAN_COMPOSE=1 to run (make compose-test): it builds images and runs a 12-container cluster for a few minutes")
	}
	if out, err := exec.Command("docker", "info", "--format", "{{.ServerVersion}}").CombinedOutput(); err != nil {
		t.Skipf("no Docker engine here (docker info: %v: %s)", err, bytes.TrimSpace(out))
	}
	if _, err := exec.LookPath("docker-compose"); err != nil {
		t.Skip("docker-compose is not installed (Debian: apt-get install docker-compose)")
	}
	c := newCluster(t)
	c.up()
	c.waitHealthy(3*time.Minute, longRunning...)

	password := c.adminPassword()
	gwUS, gwEU := c.published("gateway-us-east"), c.published("gateway-eu-west")
	c.docker(time.Minute, password, "login", gwUS, "-u", "admin", "--password-stdin")
	c.docker(time.Minute, password, "login", gwEU, "-u", "admin", "--password-stdin")

	// Two images, one of two layers, with contents no other run has.
	images := []testImage{
		c.buildImage("compose/app:v1", map[string]string{"app.txt": "app " + c.project}),
		c.buildImage("compose/tools:v1", map[string]string{"a.txt": "tool a " + c.project, "b.txt": "tool b " + c.project}),
	}
	for _, img := range images {
		c.docker(2*time.Minute, "", "tag", img.local, gwUS+"/"+img.repo)
		c.docker(2*time.Minute, "", "push", gwUS+"/"+img.repo)
	}
	// Every region holds every blob before one goes away.
	c.waitConverged(3*time.Minute, "eu-west-1:5001")

	c.compose(2*time.Minute, "stop", append([]string{"-t", "10"}, usEast...)...)
	for _, img := range images {
		c.docker(time.Minute, "", "rmi", img.local, gwUS+"/"+img.repo)
	}
	for _, img := range images {
		c.pullAndCheck(gwEU, img)
	}

	c.compose(2*time.Minute, "start", usEast...)
	c.waitHealthy(3*time.Minute, longRunning...)
	c.waitConverged(3*time.Minute, "us-east-1:5001")
	// A port docker chose is chosen again when the container restarts.
	gwUS = c.published("gateway-us-east")
	c.docker(time.Minute, password, "login", gwUS, "-u", "admin", "--password-stdin")
	for _, img := range images {
		c.docker(time.Minute, "", "rmi", gwEU+"/"+img.repo)
		c.pullAndCheck(gwUS, img)
	}
}

// cluster is one compose project of compose.yaml.
type cluster struct {
	t       *testing.T
	project string
	env     []string // docker-compose's and the docker CLI's environment
	images  []string // built here; removed at the end
}

func newCluster(t *testing.T) *cluster {
	c := &cluster{t: t, project: fmt.Sprintf("meridian-compose-%d", time.Now().UnixNano()%1e10)}
	t.Cleanup(c.down)
	meridianImage := c.meridianImage()
	s3Image := c.versitygwImage()
	// A /24 of its own, so that a cluster someone runs with the defaults
	// (172.30.13) does not collide with this one.
	subnet := fmt.Sprintf("10.%d.%d", 200+rand.IntN(50), rand.IntN(256))
	c.env = append(os.Environ(),
		"DOCKER_CONFIG="+t.TempDir(), // docker login stays out of the user's config
		"MERIDIAN_IMAGE="+meridianImage,
		"MERIDIAN_S3_IMAGE="+s3Image,
		"MERIDIAN_S3_COMMAND=--port :9000 posix /data",
		"MERIDIAN_S3_ACCESS_KEY=compose-test",
		"MERIDIAN_S3_SECRET_KEY=compose-test-"+hex.EncodeToString(randomBytes(8)),
		"MERIDIAN_US_EAST_PORT=", // ports docker chooses
		"MERIDIAN_EU_WEST_PORT=",
		"MERIDIAN_SUBNET="+subnet,
		"COMPOSE_HTTP_TIMEOUT=120",
	)
	return c
}

// down removes the project, its volumes and network, and the images the
// test built, whatever happened; on failure it first keeps the logs.
func (c *cluster) down() {
	if c.t.Failed() {
		out, _ := c.run(time.Minute, "", "docker-compose", c.composeArgs("ps")...)
		c.t.Logf("docker-compose ps:\n%s", out)
		out, _ = c.run(time.Minute, "", "docker-compose", c.composeArgs("logs", "--no-color", "--tail", "40")...)
		c.t.Logf("docker-compose logs (last 40 lines each):\n%s", out)
	}
	if out, err := c.run(3*time.Minute, "", "docker-compose", c.composeArgs("--profile", "cli", "down", "-v", "--remove-orphans", "-t", "5")...); err != nil {
		c.t.Errorf("docker-compose down: %v\n%s", err, out)
	}
	for _, img := range c.images {
		c.run(time.Minute, "", "docker", "rmi", "-f", img)
	}
}

func (c *cluster) composeArgs(args ...string) []string {
	return append([]string{"-p", c.project, "-f", "compose.yaml"}, args...)
}

// run runs a command with the cluster's environment, bounded by timeout.
func (c *cluster) run(timeout time.Duration, stdin, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = c.env
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		err = fmt.Errorf("%w (gave up after %v)", err, timeout)
	}
	return string(out), err
}

func (c *cluster) must(timeout time.Duration, stdin, name string, args ...string) string {
	c.t.Helper()
	out, err := c.run(timeout, stdin, name, args...)
	if err != nil {
		c.t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(out)
}

func (c *cluster) docker(timeout time.Duration, stdin string, args ...string) string {
	c.t.Helper()
	return c.must(timeout, stdin, "docker", args...)
}

func (c *cluster) compose(timeout time.Duration, cmd string, args ...string) string {
	c.t.Helper()
	return c.must(timeout, "", "docker-compose", c.composeArgs(append([]string{cmd}, args...)...)...)
}

func (c *cluster) up() {
	c.t.Helper()
	c.compose(5*time.Minute, "up", "-d")
}

// container is the id of a service's container.
func (c *cluster) container(service string) string {
	c.t.Helper()
	id := c.compose(time.Minute, "ps", "-q", service)
	if id == "" || strings.Contains(id, "\n") {
		c.t.Fatalf("service %s has containers %q, want one", service, id)
	}
	return id
}

// waitHealthy waits until every service's container reports healthy.
func (c *cluster) waitHealthy(timeout time.Duration, services ...string) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for _, s := range services {
		id := c.container(s)
		for {
			health := c.docker(time.Minute, "", "inspect", "-f", "{{.State.Status}}/{{.State.Health.Status}}", id)
			if health == "running/healthy" {
				break
			}
			if time.Now().After(deadline) {
				c.t.Fatalf("%s is %s %v after it started", s, health, timeout)
			}
			time.Sleep(2 * time.Second)
		}
	}
}

// published is the 127.0.0.1:PORT a gateway's registry is published on.
func (c *cluster) published(service string) string {
	c.t.Helper()
	addr := c.compose(time.Minute, "port", service, "5000")
	if !strings.HasPrefix(addr, "127.0.0.1:") {
		c.t.Fatalf("%s is published on %q, want 127.0.0.1 only", service, addr)
	}
	return addr
}

// adminPassword reads the password the init service generated, the way the
// docs tell users to: docker cp out of the init container.
func (c *cluster) adminPassword() string {
	c.t.Helper()
	dir := c.t.TempDir()
	c.docker(time.Minute, "", "cp", c.container("init")+":/data/admin-password", dir)
	b, err := os.ReadFile(filepath.Join(dir, "admin-password"))
	if err != nil {
		c.t.Fatal(err)
	}
	pw := strings.TrimSpace(string(b))
	if len(pw) < 40 {
		c.t.Fatalf("the generated admin password has %d characters, want 256 random bits", len(pw))
	}
	return pw
}

// testImage is an image built here: its local tag, the repository:tag it is
// pushed as, its files and its id (the config digest, which names every
// layer's content).
type testImage struct {
	local, repo, id string
	files           map[string]string
}

// buildImage builds an image FROM scratch with one layer per file.
func (c *cluster) buildImage(repo string, files map[string]string) testImage {
	c.t.Helper()
	dir := c.t.TempDir()
	dockerfile := "FROM scratch\n"
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			c.t.Fatal(err)
		}
		dockerfile += fmt.Sprintf("COPY %s /%s\n", name, name)
	}
	if err := os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte(dockerfile), 0o644); err != nil {
		c.t.Fatal(err)
	}
	local := c.project + "-" + strings.ReplaceAll(repo, "/", "-")
	c.docker(2*time.Minute, "", "build", "-q", "-t", local, dir)
	c.images = append(c.images, local)
	id := c.docker(time.Minute, "", "inspect", "-f", "{{.Id}}", local)
	return testImage{local: local, repo: repo, id: id, files: files}
}

// pullAndCheck pulls img through gateway and checks it is the image pushed:
// the same id, and every file with its content.
func (c *cluster) pullAndCheck(gateway string, img testImage) {
	c.t.Helper()
	ref := gateway + "/" + img.repo
	c.docker(3*time.Minute, "", "pull", ref)
	c.images = append(c.images, ref)
	if id := c.docker(time.Minute, "", "inspect", "-f", "{{.Id}}", ref); id != img.id {
		c.t.Fatalf("pulled %s has id %s, pushed %s", ref, id, img.id)
	}
	// A container of a FROM scratch image can be created (not run) and
	// copied out of.
	ctr := c.docker(time.Minute, "", "create", ref, "/none")
	defer c.run(time.Minute, "", "docker", "rm", "-f", ctr)
	for name, want := range img.files {
		dir := c.t.TempDir()
		c.docker(time.Minute, "", "cp", ctr+":/"+name, dir)
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			c.t.Fatal(err)
		}
		if string(got) != want {
			c.t.Fatalf("%s pulled through %s: /%s holds %q, pushed %q", img.repo, gateway, name, got, want)
		}
	}
}

// status runs `meridian cluster status --json` in the compose file's cli
// service (the admin certificate, on the cluster's network) against addr.
func (c *cluster) status(addr string) (*pb.ClusterStatusResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "docker-compose",
		c.composeArgs("run", "--rm", "-T", "cli", "cluster", "status", "--json", "--addr", addr)...)
	cmd.Env = c.env
	var stderr bytes.Buffer
	cmd.Stderr = &stderr // docker-compose's own messages
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("cluster status: %w: %s", err, bytes.TrimSpace(stderr.Bytes()))
	}
	st := &pb.ClusterStatusResponse{}
	return st, protojson.UnmarshalOptions{DiscardUnknown: true}.Unmarshal(out, st)
}

// waitConverged waits until all five nodes are alive and have applied the
// same log (equal applied index and state digest), and no region misses a
// blob, as cluster status shows it.
func (c *cluster) waitConverged(timeout time.Duration, addr string) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	var last string
	for {
		st, err := c.status(addr)
		if err == nil {
			if last = converged(st); last == "" {
				return
			}
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("the cluster has not converged %v after asking: %s", timeout, last)
		}
		time.Sleep(2 * time.Second)
	}
}

// converged says what keeps st from showing a converged cluster, or "".
func converged(st *pb.ClusterStatusResponse) string {
	if st.LeaderId == "" {
		return "no leader"
	}
	var applied uint64
	var digest []byte
	seen := map[string]bool{}
	for _, m := range st.Members {
		if m.Role != "server" {
			continue
		}
		seen[m.Id] = true
		s := m.Status
		switch {
		case m.Health != "alive":
			return fmt.Sprintf("%s is %s", m.Id, m.Health)
		case s == nil:
			return fmt.Sprintf("%s did not answer: %s", m.Id, m.Error)
		case digest == nil:
			applied, digest = s.AppliedIndex, s.StateDigest
		case s.AppliedIndex != applied || !bytes.Equal(s.StateDigest, digest):
			return fmt.Sprintf("%s applied %d (digest %x), another node %d (digest %x)", m.Id, s.AppliedIndex, s.StateDigest, applied, digest)
		}
	}
	for _, n := range nodes {
		if !seen[n] {
			return n + " is not a member"
		}
	}
	if len(st.Regions) != 3 {
		return fmt.Sprintf("%d regions in the backlog, want 3", len(st.Regions))
	}
	for _, r := range st.Regions {
		if r.MissingBlobs != 0 {
			return fmt.Sprintf("region %s misses %d blobs", r.Region, r.MissingBlobs)
		}
	}
	return ""
}

// meridianImage is the image under test: MERIDIAN_COMPOSE_IMAGE (make
// compose-test passes the one make image built), or one built here the
// way make image builds it.
func (c *cluster) meridianImage() string {
	c.t.Helper()
	if img := os.Getenv("MERIDIAN_COMPOSE_IMAGE"); img != "" {
		return img
	}
	ctxDir := c.t.TempDir()
	if err := os.Mkdir(filepath.Join(ctxDir, "data"), 0o755); err != nil {
		c.t.Fatal(err)
	}
	build := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(ctxDir, "meridian"), "../../cmd/meridian")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		c.t.Fatalf("static build of meridian: %v\n%s", err, out)
	}
	img := c.project + "-meridian:test"
	c.images = append(c.images, img)
	c.docker(5*time.Minute, "", "build", "-q", "-f", "../docker/Dockerfile.local", "-t", img, ctxDir)
	return img
}

// versitygwImage builds the S3 servers' image FROM scratch around a static
// versitygw: MERIDIAN_COMPOSE_VERSITYGW or MERIDIAN_VERSITYGW if static,
// else one built here with CGO_ENABLED=0 at the pinned version.
func (c *cluster) versitygwImage() string {
	c.t.Helper()
	ctxDir := c.t.TempDir()
	bin := ""
	for _, v := range []string{"MERIDIAN_COMPOSE_VERSITYGW", "MERIDIAN_VERSITYGW"} {
		if p := os.Getenv(v); p != "" && isStatic(p) {
			bin = p
			break
		}
	}
	if bin == "" {
		install := exec.Command("go", "install", "github.com/versity/versitygw/cmd/versitygw@"+versitygwVersion)
		install.Env = append(os.Environ(), "CGO_ENABLED=0", "GOBIN="+ctxDir, "GOFLAGS=")
		if out, err := install.CombinedOutput(); err != nil {
			c.t.Fatalf("static build of versitygw %s: %v\n%s", versitygwVersion, err, out)
		}
		bin = filepath.Join(ctxDir, "versitygw")
	} else {
		b, err := os.ReadFile(bin)
		if err != nil {
			c.t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(ctxDir, "versitygw"), b, 0o755); err != nil {
			c.t.Fatal(err)
		}
	}
	for _, d := range []string{"data", "tmp"} {
		if err := os.Mkdir(filepath.Join(ctxDir, d), 0o755); err != nil {
			c.t.Fatal(err)
		}
	}
	// /data holds the buckets (the volume is mounted there), /tmp the
	// server's temporary files; the compose file gives the arguments.
	dockerfile := "FROM scratch\nCOPY versitygw /versitygw\nCOPY data/ /data/\nCOPY tmp/ /tmp/\nENTRYPOINT [\"/versitygw\"]\n"
	if err := os.WriteFile(filepath.Join(ctxDir, "Dockerfile"), []byte(dockerfile), 0o644); err != nil {
		c.t.Fatal(err)
	}
	img := c.project + "-versitygw:test"
	c.images = append(c.images, img)
	c.docker(5*time.Minute, "", "build", "-q", "-t", img, ctxDir)
	return img
}

// isStatic reports whether path is an ELF executable without an
// interpreter, which runs in an image FROM scratch.
func isStatic(path string) bool {
	f, err := elf.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return false
		}
	}
	return true
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rand.IntN(256))
	}
	return b
}
