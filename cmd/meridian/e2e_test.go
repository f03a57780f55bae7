package main

// End-to-end tests of the meridian binary: built once per test run (by the
// first test that needs it, in a directory TestMain removes), run as a real
// process on 127.0.0.1:0 ports, stopped with SIGTERM and SIGKILL, and
// driven with go-containerregistry. Every identifier here starts with e2e so
// that it cannot collide with the command's own code in package main.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/meridian-registry/meridian/node/clustertest/admin"
	"hash"
	"io"
	"io/fs"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

var (
	// e2eDir holds the binary; TestMain removes it after the tests.
	e2eDir string
	// e2eBinary is the meridian binary, built once by the first test that
	// needs it (so tests of other code here do not pay for the build);
	// e2eBuildErr says why there is none.
	e2eBuildOnce sync.Once
	e2eBinary    string
	e2eBuildErr  error
)

func TestMain(m *testing.M) {
	// Nodes and gateways authenticate: the shared HTTP clients log in as
	// the first admin, whose password every node started here bootstraps
	// with (e2eEnv).
	http.DefaultTransport = admin.Transport(http.DefaultTransport)
	remote.DefaultTransport = admin.Transport(remote.DefaultTransport)
	code := m.Run()
	if e2eDir != "" {
		os.RemoveAll(e2eDir)
	}
	os.Exit(code)
}

// e2eAdminPasswordFile holds admin.AdminPassword for e2eEnv.
var e2eAdminPasswordFile = sync.OnceValue(func() string {
	f, err := os.CreateTemp("", "meridian-e2e-admin-")
	if err != nil {
		panic(err)
	}
	f.WriteString(admin.AdminPassword + "\n")
	f.Close()
	return f.Name()
})

// e2eBuild builds this package into out with the test binary's -race and
// -tags, so a race test also races the server.
func e2eBuild(out string) (string, error) {
	return e2eBuildIn(".", ".", out)
}

// e2eBuildIn builds pkg (relative to dir) into out the way e2eBuild does,
// with extra build flags.
func e2eBuildIn(dir, pkg, out string, extra ...string) (string, error) {
	args := append([]string{"build", "-o", out}, extra...)
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			switch {
			case s.Key == "-race" && s.Value == "true":
				args = append(args, "-race")
			case s.Key == "-tags" && s.Value != "":
				args = append(args, "-tags", s.Value)
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", append(args, pkg)...)
	cmd.Dir = dir
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, b)
	}
	return out, nil
}

// e2eNeedBinary skips in -short mode and fails if the build failed.
func e2eNeedBinary(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end test of the binary: skipped with -short")
	}
	e2eBuildOnce.Do(func() {
		start := time.Now()
		if e2eDir, e2eBuildErr = os.MkdirTemp("", "meridian-e2e-"); e2eBuildErr != nil {
			return
		}
		e2eBinary, e2eBuildErr = e2eBuild(filepath.Join(e2eDir, "meridian"))
		t.Logf("built meridian in %v", time.Since(start).Round(time.Millisecond))
	})
	if e2eBuildErr != nil {
		t.Fatalf("building meridian: %v", e2eBuildErr)
	}
}

// e2eEnv is the test's environment without MERIDIAN_* variables, plus extra.
//
// Nodes bootstrap with the harness's admin password; gateways fetch the
// access state, and CLI commands authenticate, as that admin.
func e2eEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "MERIDIAN_") {
			env = append(env, kv)
		}
	}
	env = append(env, "MERIDIAN_ADMIN_PASSWORD_FILE="+e2eAdminPasswordFile(),
		"MERIDIAN_USERNAME="+admin.AdminUser, "MERIDIAN_PASSWORD="+admin.AdminPassword)
	return append(env, extra...)
}

// e2eReady is the JSON a node writes to --ready-file.
type e2eReady struct {
	NodeID     string `json:"node_id"`
	GatewayID  string `json:"gateway_id"`
	Region     string `json:"region"`
	HTTPAddr   string `json:"http_addr"`
	GRPCAddr   string `json:"grpc_addr"`
	RaftAddr   string `json:"raft_addr"`
	GossipAddr string `json:"gossip_addr"`
	DataDir    string `json:"data_dir"`
	PID        int    `json:"pid"`
}

// e2eProc is one running meridian process.
type e2eProc struct {
	t         testing.TB
	name      string // in messages: "meridian", or the process's role
	cmd       *exec.Cmd
	readyFile string
	logPath   string
	exited    chan struct{}
	ready     e2eReady
}

// e2eStart runs the binary with args and env; it is killed when the test
// ends if it is still running.
func e2eStart(t testing.TB, readyFile string, env []string, args ...string) *e2eProc {
	t.Helper()
	return e2eStartBinary(t, e2eBinary, readyFile, env, args...)
}

// e2eStartBinary is e2eStart with another meridian binary.
func e2eStartBinary(t testing.TB, binary, readyFile string, env []string, args ...string) *e2eProc {
	t.Helper()
	if err := os.Remove(readyFile); err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	logFile, err := os.CreateTemp(t.TempDir(), "meridian-*.log")
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	p := &e2eProc{t: t, name: "meridian", readyFile: readyFile, logPath: logFile.Name(), exited: make(chan struct{})}
	p.cmd = exec.Command(binary, args...)
	p.cmd.Env = env
	p.cmd.Stdout, p.cmd.Stderr = logFile, logFile
	// Gone with the test process, even if it dies without cleanups.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start meridian: %v", err)
	}
	go func() {
		p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			p.cmd.Process.Kill()
			<-p.exited
		}
		if t.Failed() {
			t.Logf("%s (pid %d) log:\n%s", p.name, p.cmd.Process.Pid, p.logTail())
		}
	})
	return p
}

// e2eLoopback puts every listener of `meridian serve` on a 127.0.0.1:0 port.
var e2eLoopback = []string{
	"--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0",
	"--raft-addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0",
}

// e2eServe starts `meridian serve` on dataDir with :0 ports and waits until
// it is ready.
func e2eServe(t *testing.T, dataDir string) *e2eProc {
	t.Helper()
	ready := filepath.Join(dataDir, "..", filepath.Base(dataDir)+".ready.json")
	p := e2eStart(t, ready, e2eEnv(),
		slices.Concat([]string{"serve", "--data-dir", dataDir, "--node-id", "e2e", "--ready-file", ready}, e2eLoopback)...)
	p.waitReady()
	return p
}

func (p *e2eProc) logTail() string {
	b, _ := os.ReadFile(p.logPath)
	if len(b) > 16<<10 {
		b = b[len(b)-16<<10:]
	}
	return string(b)
}

// poll calls check until it succeeds, the process exits or the deadline
// passes.
func (p *e2eProc) poll(what string, d time.Duration, check func() error) {
	p.t.Helper()
	deadline := time.Now().Add(d)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("%s: not within %v: %v", what, d, err)
		}
		select {
		case <-p.exited:
			p.t.Fatalf("%s: %s exited (%v):\n%s", what, p.name, p.cmd.ProcessState, p.logTail())
		case <-tick.C:
		}
	}
}

// waitWritten waits for the ready file this process wrote.
func (p *e2eProc) waitWritten() e2eReady {
	p.t.Helper()
	p.poll("ready file", time.Minute, func() error {
		b, err := os.ReadFile(p.readyFile)
		if err != nil {
			return err
		}
		var r e2eReady
		if err := json.Unmarshal(b, &r); err != nil {
			return err
		}
		if r.PID != p.cmd.Process.Pid {
			return fmt.Errorf("ready file is from pid %d", r.PID)
		}
		p.ready = r
		return nil
	})
	return p.ready
}

// waitReady waits for the ready file, then for /readyz.
func (p *e2eProc) waitReady() {
	p.t.Helper()
	p.waitWritten()
	p.poll("/readyz", time.Minute, func() error {
		resp, err := http.Get(p.url("/readyz"))
		if err != nil {
			return err
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s: %s", resp.Status, b)
		}
		return nil
	})
}

func (p *e2eProc) url(path string) string {
	if strings.HasPrefix(path, "http://") {
		return path
	}
	return "http://" + p.ready.HTTPAddr + path
}

// ref parses "repo:tag" or "repo@digest" on this process.
func (p *e2eProc) ref(s string) name.Reference {
	p.t.Helper()
	r, err := name.ParseReference(p.ready.HTTPAddr+"/"+s, name.Insecure)
	if err != nil {
		p.t.Fatal(err)
	}
	return r
}

// signal sends sig and waits for the process to exit.
func (p *e2eProc) signal(sig syscall.Signal) *os.ProcessState {
	p.t.Helper()
	// Shutdown waits up to 5s for connections a client dialled but never
	// used; do not let the clients' pools hold any.
	e2eCloseIdle()
	if err := p.cmd.Process.Signal(sig); err != nil {
		p.t.Fatalf("signal %v: %v", sig, err)
	}
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		p.t.Fatalf("%s did not exit within 30s of %v:\n%s", p.name, sig, p.logTail())
	}
	return p.cmd.ProcessState
}

// stop sends SIGTERM and expects a clean exit.
func (p *e2eProc) stop() {
	p.t.Helper()
	start := time.Now()
	if st := p.signal(syscall.SIGTERM); st.ExitCode() != 0 {
		p.t.Fatalf("after SIGTERM %s exited with %v, want status 0:\n%s", p.name, st, p.logTail())
	}
	p.t.Logf("%s: SIGTERM: clean exit in %v", p.name, time.Since(start).Round(time.Millisecond))
}

// kill sends SIGKILL and waits for the process to die.
func (p *e2eProc) kill() {
	p.t.Helper()
	st := p.signal(syscall.SIGKILL)
	if ws, ok := st.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		p.t.Fatalf("after SIGKILL: %v", st)
	}
}

func e2eCloseIdle() {
	for _, rt := range []http.RoundTripper{http.DefaultTransport, remote.DefaultTransport} {
		if c, ok := rt.(interface{ CloseIdleConnections() }); ok {
			c.CloseIdleConnections()
		}
	}
}

// do sends a raw request and returns the response with its body read.
func (p *e2eProc) do(method, path string, body io.Reader, header http.Header) (*http.Response, []byte) {
	p.t.Helper()
	req, err := http.NewRequest(method, p.url(path), body)
	if err != nil {
		p.t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		p.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		p.t.Fatalf("%s %s: %v", method, path, err)
	}
	return resp, b
}

// e2eContent is what a test pushed and expects to pull back: images and
// indexes by "repo:tag".
type e2eContent struct {
	images  map[string]v1.Image
	indexes map[string]v1.ImageIndex
}

func (c *e2eContent) pushImage(t *testing.T, p *e2eProc, ref string, layers int64) {
	t.Helper()
	img, err := random.Image(128<<10, layers)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(p.ref(ref), img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	if c.images == nil {
		c.images = map[string]v1.Image{}
	}
	c.images[ref] = img
}

func (c *e2eContent) pushIndex(t *testing.T, p *e2eProc, ref string) {
	t.Helper()
	var adds []mutate.IndexAddendum
	for _, arch := range []string{"amd64", "arm64"} {
		img, err := random.Image(64<<10, 2)
		if err != nil {
			t.Fatal(err)
		}
		adds = append(adds, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{
			Platform: &v1.Platform{OS: "linux", Architecture: arch}}})
	}
	idx := mutate.AppendManifests(empty.Index, adds...)
	if err := remote.WriteIndex(p.ref(ref), idx); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	if c.indexes == nil {
		c.indexes = map[string]v1.ImageIndex{}
	}
	c.indexes[ref] = idx
}

// verify pulls everything back from p and compares it byte for byte.
func (c *e2eContent) verify(t *testing.T, p *e2eProc) {
	t.Helper()
	for ref, img := range c.images {
		e2eCheckImage(t, p.ref(ref), img)
	}
	for ref, idx := range c.indexes {
		got, err := remote.Index(p.ref(ref))
		if err != nil {
			t.Fatalf("pull %s: %v", ref, err)
		}
		wantRaw, _ := idx.RawManifest()
		gotRaw, err := got.RawManifest()
		if err != nil || !bytes.Equal(gotRaw, wantRaw) {
			t.Fatalf("%s: index differs from what was pushed (%v)", ref, err)
		}
		im, _ := idx.IndexManifest()
		for _, d := range im.Manifests {
			child, err := idx.Image(d.Digest)
			if err != nil {
				t.Fatal(err)
			}
			e2eCheckImage(t, p.ref(ref).Context().Digest(d.Digest.String()), child)
		}
	}
}

// e2eCheckImage pulls ref and compares manifest, config and every layer's
// bytes with want.
func e2eCheckImage(t *testing.T, ref name.Reference, want v1.Image) {
	t.Helper()
	got, err := remote.Image(ref)
	if err != nil {
		t.Fatalf("pull %s: %v", ref, err)
	}
	for _, part := range []struct {
		what      string
		want, got func() ([]byte, error)
	}{
		{"manifest", want.RawManifest, got.RawManifest},
		{"config", want.RawConfigFile, got.RawConfigFile},
	} {
		w, err := part.want()
		if err != nil {
			t.Fatal(err)
		}
		g, err := part.got()
		if err != nil {
			t.Fatalf("pull %s %s: %v", ref, part.what, err)
		}
		if !bytes.Equal(g, w) {
			t.Fatalf("%s: %s differs from what was pushed", ref, part.what)
		}
	}
	wantLayers, _ := want.Layers()
	gotLayers, err := got.Layers()
	if err != nil || len(gotLayers) != len(wantLayers) {
		t.Fatalf("%s: %d layers (%v), want %d", ref, len(gotLayers), err, len(wantLayers))
	}
	for i := range wantLayers {
		w, g := e2eLayerSum(t, wantLayers[i]), e2eLayerSum(t, gotLayers[i])
		if g != w {
			t.Fatalf("%s: layer %d has sha256 %s, want %s", ref, i, g, w)
		}
	}
}

func e2eLayerSum(t *testing.T, l v1.Layer) string {
	t.Helper()
	rc, err := l.Compressed()
	if err != nil {
		t.Fatalf("open layer: %v", err)
	}
	defer rc.Close()
	h := sha256.New()
	if _, err := io.Copy(h, rc); err != nil {
		t.Fatalf("read layer: %v", err)
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}

// e2eCheckBlobTree reads every committed blob under the data directory and
// fails unless each one's content hashes to its name; it returns the digests
// found. (Uploads in progress live under blobs/uploads and are not blobs.)
func e2eCheckBlobTree(t *testing.T, dataDir string) map[string]bool {
	t.Helper()
	root := filepath.Join(dataDir, "blobs", "blobs")
	found := map[string]bool{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		parts := strings.Split(rel, string(filepath.Separator))
		if len(parts) != 3 || !d.Type().IsRegular() {
			return fmt.Errorf("unexpected entry %s in the blob tree", rel)
		}
		alg, prefix, enc := parts[0], parts[1], parts[2]
		var h hash.Hash
		switch alg {
		case "sha256":
			h = sha256.New()
		case "sha512":
			h = sha512.New()
		default:
			return fmt.Errorf("unexpected algorithm directory %s", rel)
		}
		if !strings.HasPrefix(enc, prefix) {
			return fmt.Errorf("blob %s is under the wrong prefix", rel)
		}
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		if _, err := io.Copy(h, f); err != nil {
			return err
		}
		if got := hex.EncodeToString(h.Sum(nil)); got != enc {
			return fmt.Errorf("blob %s holds content with digest %s:%s: a partial or corrupt blob", rel, alg, got)
		}
		found[alg+":"+enc] = true
		return nil
	})
	if err != nil {
		t.Fatalf("blob tree: %v", err)
	}
	return found
}

// A node keeps every pushed image, index and tag across a clean stop
// (SIGTERM) and across a crash (SIGKILL), byte for byte.
func TestRestart(t *testing.T) {
	e2eNeedBinary(t)
	dataDir := filepath.Join(t.TempDir(), "data")
	var content e2eContent
	p := e2eServe(t, dataDir)
	content.pushImage(t, p, "e2e/app:v1", 3)
	content.pushImage(t, p, "e2e/app:v2", 2)
	content.pushImage(t, p, "e2e/tools/other:latest", 4)
	content.pushIndex(t, p, "e2e/multi:1.0")
	content.verify(t, p)

	t.Log("phase 1: SIGTERM and restart")
	p.stop()
	p = e2eServe(t, dataDir)
	content.verify(t, p)

	t.Log("phase 2: push more, SIGKILL and restart")
	content.pushImage(t, p, "e2e/app:v3", 3)
	content.pushImage(t, p, "e2e/fresh:1", 1)
	content.pushIndex(t, p, "e2e/multi:2.0")
	p.kill()
	e2eCheckBlobTree(t, dataDir)
	// Checked at once after /readyz: a node back from a crash is ready only
	// once it has applied what the leader had committed, even applies its
	// store lost in the crash (TestClusterReadsAfterLostApplies in node/
	// forces that case), so its last writes must be there.
	p = e2eServe(t, dataDir)
	content.verify(t, p)
	tags, err := remote.List(p.ref("e2e/app:v1").Context())
	if err != nil {
		t.Fatalf("list tags: %v", err)
	}
	if want := []string{"v1", "v2", "v3"}; !slices.Equal(tags, want) {
		t.Errorf("tags of e2e/app after a crash: %v, want %v", tags, want)
	}

	// The node that came back from a crash still takes writes.
	content.pushImage(t, p, "e2e/after-crash:1", 2)
	content.verify(t, p)
	p.stop()
}

func e2eDigest(t *testing.T, m interface{ Digest() (v1.Hash, error) }) string {
	t.Helper()
	d, err := m.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}

// Once a node that crashed is ready again, it serves every write it
// acknowledged before the crash: a new tag is found and a moved tag names
// its new digest (with one voter, tag reads are read-your-writes).
func TestReadYourWritesAfterCrash(t *testing.T) {
	e2eNeedBinary(t)
	dataDir := filepath.Join(t.TempDir(), "data")
	p := e2eServe(t, dataDir)
	for i := range 5 {
		added, moved := fmt.Sprintf("added%d", i), "moved"
		var want [2]string
		for j, tag := range []string{added, moved} {
			img, err := random.Image(1024, 1)
			if err != nil {
				t.Fatal(err)
			}
			if err := remote.Write(p.ref("crash/app:"+tag), img); err != nil {
				t.Fatalf("push: %v", err)
			}
			want[j] = e2eDigest(t, img)
		}
		p.kill()
		p = e2eServe(t, dataDir)
		for j, tag := range []string{added, moved} {
			resp, _ := p.do("HEAD", "/v2/crash/app/manifests/"+tag, nil, nil)
			if got := resp.Header.Get("Docker-Content-Digest"); resp.StatusCode != http.StatusOK || got != want[j] {
				t.Errorf("restart %d: tag %s: %s, digest %q; want 200, %s", i, tag, resp.Status, got, want[j])
			}
		}
	}
	p.stop()
}

// e2eStream is a reproducible pseudo-random byte stream.
func e2eStream(seed uint64) io.Reader {
	var s [32]byte
	s[0] = byte(seed)
	return rand.NewChaCha8(s)
}

// e2eStalling yields up to limit bytes of r, then blocks until release is
// closed and fails: a client whose upload is cut off mid-stream.
type e2eStalling struct {
	r       io.Reader
	limit   int64
	sent    atomic.Int64
	release chan struct{}
}

func (s *e2eStalling) Read(b []byte) (int, error) {
	left := s.limit - s.sent.Load()
	if left <= 0 {
		<-s.release
		return 0, errors.New("e2e: client gave up")
	}
	if int64(len(b)) > left {
		b = b[:left]
	}
	n, err := s.r.Read(b)
	s.sent.Add(int64(n))
	return n, err
}

// Killing the node while a large blob streams in leaves no partial blob
// anywhere: the digest is unknown after restart, every file in the blob tree
// hashes to its name, and the session either continues to a correct blob or
// is reported unknown.
func TestKillDuringUpload(t *testing.T) {
	e2eNeedBinary(t)
	const (
		size   = 64 << 20
		first  = 1 << 20 // completed before the crash
		inAir  = 8 << 20 // sent in the PATCH that the crash cuts off
		seed   = 7
		repo   = "e2e/big"
		stream = "application/octet-stream"
	)
	h := sha256.New()
	io.CopyN(h, e2eStream(seed), size)
	want := "sha256:" + hex.EncodeToString(h.Sum(nil))

	dataDir := filepath.Join(t.TempDir(), "data")
	p := e2eServe(t, dataDir)
	resp, body := p.do("POST", "/v2/"+repo+"/blobs/uploads/", nil, nil)
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("start upload: %s %s", resp.Status, body)
	}
	uploadID := resp.Header.Get("Docker-Upload-UUID")
	resp, body = p.do("PATCH", resp.Header.Get("Location"), io.LimitReader(e2eStream(seed), first),
		http.Header{"Content-Range": {fmt.Sprintf("0-%d", first-1)}, "Content-Type": {stream}})
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("first chunk: %s %s", resp.Status, body)
	}
	session := resp.Header.Get("Location")

	// Stream the rest; the reader stalls after inAir bytes, with the server
	// in the middle of the request.
	rest := e2eStream(seed)
	io.CopyN(io.Discard, rest, first)
	stalling := &e2eStalling{r: rest, limit: inAir, release: make(chan struct{})}
	t.Cleanup(func() {
		select {
		case <-stalling.release:
		default:
			close(stalling.release)
		}
	})
	req, err := http.NewRequest("PATCH", p.url(session), stalling)
	if err != nil {
		t.Fatal(err)
	}
	req.ContentLength = size - first
	req.Header.Set("Content-Range", fmt.Sprintf("%d-%d", first, size-1))
	req.Header.Set("Content-Type", stream)
	client := &http.Client{Transport: admin.Transport(&http.Transport{})}
	done := make(chan error, 1)
	go func() {
		resp, err := client.Do(req)
		if err == nil {
			resp.Body.Close()
			err = fmt.Errorf("the cut-off PATCH got an answer: %s", resp.Status)
		}
		done <- err
	}()
	uploadFile := filepath.Join(dataDir, "blobs", "uploads", uploadID)
	p.poll("upload bytes reach the store", time.Minute, func() error {
		fi, err := os.Stat(uploadFile)
		if err != nil {
			return err
		}
		if fi.Size() < first+inAir/2 {
			return fmt.Errorf("upload holds %d bytes", fi.Size())
		}
		return nil
	})
	p.kill()
	close(stalling.release)
	select {
	case err := <-done:
		t.Logf("the interrupted PATCH ended with: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("the interrupted PATCH did not end within 30s of the kill")
	}
	if fi, err := os.Stat(uploadFile); err == nil {
		t.Logf("after the kill the upload holds %d of %d bytes", fi.Size(), size)
	}
	if e2eCheckBlobTree(t, dataDir)[want] {
		t.Fatalf("blob %s is in the blob tree after a crash mid-upload", want)
	}

	p = e2eServe(t, dataDir)
	if resp, _ := p.do("HEAD", "/v2/"+repo+"/blobs/"+want, nil, nil); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("HEAD of the interrupted blob after restart: %s, want 404", resp.Status)
	}
	if e2eCheckBlobTree(t, dataDir)[want] {
		t.Fatalf("blob %s is in the blob tree after restart", want)
	}

	// Either the session continues from its last acknowledged chunk, or it
	// is reported unknown and the client starts over; both must end in the
	// right blob.
	var from int64
	resp, body = p.do("GET", session, nil, nil)
	switch resp.StatusCode {
	case http.StatusNoContent:
		if got, wantRange := resp.Header.Get("Range"), fmt.Sprintf("0-%d", first-1); got != wantRange {
			t.Fatalf("session Range after restart: %q, want %q (the last acknowledged offset)", got, wantRange)
		}
		t.Log("the session continues after the crash")
		from = first
	case http.StatusNotFound:
		if !strings.Contains(string(body), "BLOB_UPLOAD_UNKNOWN") {
			t.Fatalf("session status after restart: 404 without BLOB_UPLOAD_UNKNOWN: %s", body)
		}
		t.Log("the session is reported unknown after the crash; starting over")
		resp, body = p.do("POST", "/v2/"+repo+"/blobs/uploads/", nil, nil)
		if resp.StatusCode != http.StatusAccepted {
			t.Fatalf("start a new upload: %s %s", resp.Status, body)
		}
		session = resp.Header.Get("Location")
	default:
		t.Fatalf("session status after restart: %s %s, want 204 or 404", resp.Status, body)
	}
	rest = e2eStream(seed)
	io.CopyN(io.Discard, rest, from)
	resp, body = p.do("PATCH", session, io.LimitReader(rest, size-from),
		http.Header{"Content-Range": {fmt.Sprintf("%d-%d", from, size-1)}, "Content-Type": {stream}})
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("send the rest of the blob from offset %d: %s %s", from, resp.Status, body)
	}
	resp, body = p.do("PUT", resp.Header.Get("Location")+"?digest="+want, nil, nil)
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("complete the upload: %s %s", resp.Status, body)
	}
	resp, err = http.Get(p.url("/v2/" + repo + "/blobs/" + want))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	h = sha256.New()
	n, err := io.Copy(h, resp.Body)
	if err != nil || n != size || "sha256:"+hex.EncodeToString(h.Sum(nil)) != want {
		t.Fatalf("pulled %d bytes (%v) hashing to sha256:%x, want %d bytes with %s", n, err, h.Sum(nil), size, want)
	}
	if !e2eCheckBlobTree(t, dataDir)[want] {
		t.Errorf("blob %s is not in the blob tree after completing the upload", want)
	}
	p.stop()
}

// Bad command lines and configuration fail fast with a non-zero status and a
// message that names the problem.
func TestBadInput(t *testing.T) {
	e2eNeedBinary(t)
	dir := t.TempDir()
	unknownKey := filepath.Join(dir, "unknown-key.yaml")
	if err := os.WriteFile(unknownKey, []byte("data_dir: "+dir+"\nhttp_adr: 127.0.0.1:0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	serve := func(extra ...string) []string {
		return slices.Concat([]string{"serve", "--data-dir", filepath.Join(dir, "data")}, e2eLoopback, extra)
	}
	cases := []struct {
		name string
		args []string
		env  []string
		want []string // all must appear on stderr
	}{
		{name: "unknown command", args: []string{"frobnicate"}, want: []string{`unknown command "frobnicate"`}},
		{name: "unknown flag", args: serve("--no-such-flag"), want: []string{"flag provided but not defined", "-no-such-flag"}},
		{name: "stray argument", args: serve("extra"), want: []string{"unexpected arguments: extra"}},
		{name: "bad byte count", args: serve("--max-blob-size=abc"), want: []string{"max-blob-size", `"abc"`}},
		{name: "bad byte count in env", args: serve(), env: []string{"MERIDIAN_MAX_BLOB_SIZE=12XB"}, want: []string{"MERIDIAN_MAX_BLOB_SIZE", "12XB"}},
		{name: "bad duration", args: serve("--upload-ttl=forever"), want: []string{"upload-ttl", "forever"}},
		{name: "unknown YAML key", args: serve("--config", unknownKey), want: []string{unknownKey, "http_adr"}},
		{name: "missing config file", args: serve("--config", filepath.Join(dir, "absent.yaml")), want: []string{"absent.yaml", "no such file"}},
		{name: "invalid node id", args: serve("--node-id", "bad id!"), want: []string{"invalid configuration", `node_id "bad id!"`}},
		{name: "several invalid settings at once", args: serve("--node-id", "", "--log-level", "loud"), want: []string{"node_id", `log_level "loud"`}},
		{name: "byte count overflow", args: serve("--max-blob-size=16777216TiB"), want: []string{"max-blob-size"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, e2eBinary, c.args...)
			cmd.Env = e2eEnv(c.env...)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			err := cmd.Run()
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() <= 0 {
				t.Fatalf("meridian %s: %v, want a non-zero exit status\n%s", strings.Join(c.args, " "), err, stderr.String())
			}
			msg := stderr.String()
			for _, w := range c.want {
				if !strings.Contains(msg, w) {
					t.Errorf("stderr does not mention %q:\n%s", w, msg)
				}
			}
			if strings.Contains(msg, "goroutine ") || strings.Contains(msg, "panic:") {
				t.Errorf("stderr shows a crash:\n%s", msg)
			}
		})
	}
}

// `meridian serve --help` prints the flags and succeeds.
func TestServeHelp(t *testing.T) {
	e2eNeedBinary(t)
	cmd := exec.Command(e2eBinary, "serve", "--help")
	cmd.Env = e2eEnv()
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "-data-dir") || strings.Contains(string(out), "help requested") {
		t.Fatalf("serve --help: %v\n%s", err, out)
	}
}

// Settings come from defaults < the YAML file < MERIDIAN_* variables <
// flags; the ready file shows which value won.
func TestConfigPrecedence(t *testing.T) {
	e2eNeedBinary(t)
	if runtime.GOOS != "linux" {
		t.Skip("tells the layers apart by binding 127.0.0.2 and 127.0.0.3, which only Linux routes by default")
	}
	dir := t.TempDir()
	cfgFile := filepath.Join(dir, "meridian.yaml")
	yaml := fmt.Sprintf("data_dir: %s\nnode_id: from-yaml\nhttp_addr: 127.0.0.2:0\nregion: yaml-region\n",
		filepath.Join(dir, "data"))
	if err := os.WriteFile(cfgFile, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	env := []string{"MERIDIAN_NODE_ID=from-env", "MERIDIAN_HTTP_ADDR=127.0.0.3:0"}
	flags := []string{"--node-id", "from-flag", "--http-addr", "127.0.0.1:0"}
	cases := []struct {
		name      string
		env, args []string
		wantID    string
		wantHost  string
	}{
		{"file", nil, []string{"--config", cfgFile}, "from-yaml", "127.0.0.2"},
		{"file named by MERIDIAN_CONFIG", []string{"MERIDIAN_CONFIG=" + cfgFile}, nil, "from-yaml", "127.0.0.2"},
		{"env over file", env, []string{"--config", cfgFile}, "from-env", "127.0.0.3"},
		{"flag over env and file", env, slices.Concat([]string{"--config", cfgFile}, flags), "from-flag", "127.0.0.1"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ready := filepath.Join(t.TempDir(), "ready.json")
			args := slices.Concat([]string{"serve", "--ready-file", ready, "--data-dir", filepath.Join(t.TempDir(), "data"),
				"--grpc-addr", "127.0.0.1:0", "--raft-addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0"}, c.args)
			p := e2eStart(t, ready, e2eEnv(c.env...), args...)
			r := p.waitWritten()
			if r.NodeID != c.wantID {
				t.Errorf("node_id %q, want %q", r.NodeID, c.wantID)
			}
			if !strings.HasPrefix(r.HTTPAddr, c.wantHost+":") {
				t.Errorf("http_addr %q, want host %s", r.HTTPAddr, c.wantHost)
			}
			if r.Region != "yaml-region" {
				t.Errorf("region %q, want yaml-region (set only in the file)", r.Region)
			}
			p.stop()
		})
	}
}
