package node

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"github.com/meridian-registry/meridian/node/clustertest/admin"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// testNode is a node started in-process for a test, with the registry host
// ("127.0.0.1:port") that go-containerregistry references use.
type testNode struct {
	*Node
	t    *testing.T
	host string
}

// startNode starts a one-voter node with every listener (HTTP, Raft, gRPC,
// gossip) on a 127.0.0.1:0 port, in a fresh data directory, waits until it is ready, and closes it when the test ends.
// Options adjust DefaultConfig before New.
func startNode(t *testing.T, opts ...func(*Config)) *testNode {
	t.Helper()
	cfg := DefaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.HTTPAddr = "127.0.0.1:0"
	cfg.RaftAddr = "127.0.0.1:0"
	cfg.GRPCAddr = "127.0.0.1:0"
	cfg.GossipAddr = "127.0.0.1:0"
	cfg.NodeID = "n1"
	cfg.Auth.AdminPasswordFile = admin.PasswordFile(t)
	for _, o := range opts {
		o(&cfg)
	}
	n, err := New(cfg, testLogger(t))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := n.Start(ctx); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		// net/http's Shutdown waits up to 5s for a connection that a
		// client dialled but never used; the clients' pools hold a few.
		closeIdleClientConns()
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		if err := n.Close(ctx); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	if err := n.WaitReady(ctx); err != nil {
		t.Fatalf("WaitReady: %v", err)
	}
	return &testNode{Node: n, t: t, host: n.HTTPAddr()}
}

// closeIdleClientConns closes the idle connections of the transports the
// tests' clients use.
func closeIdleClientConns() {
	for _, rt := range []http.RoundTripper{http.DefaultTransport, remote.DefaultTransport} {
		if c, ok := rt.(interface{ CloseIdleConnections() }); ok {
			c.CloseIdleConnections()
		}
	}
}

// ref parses "repo:tag" or "repo@digest" on this node.
func (tn *testNode) ref(s string) name.Reference {
	tn.t.Helper()
	r, err := name.ParseReference(tn.host+"/"+s, name.Insecure)
	if err != nil {
		tn.t.Fatalf("parse reference %q: %v", s, err)
	}
	return r
}

// repo names a repository on this node.
func (tn *testNode) repo(s string) name.Repository {
	tn.t.Helper()
	r, err := name.NewRepository(tn.host+"/"+s, name.Insecure)
	if err != nil {
		tn.t.Fatalf("parse repository %q: %v", s, err)
	}
	return r
}

// url is the absolute URL of an API path on this node.
func (tn *testNode) url(path string) string {
	if strings.HasPrefix(path, "http://") {
		return path
	}
	return "http://" + tn.host + path
}

// do sends a raw HTTP request and returns the response with its body read.
func (tn *testNode) do(method, path string, body []byte, header http.Header) (*http.Response, []byte) {
	tn.t.Helper()
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, tn.url(path), r)
	if err != nil {
		tn.t.Fatalf("%s %s: %v", method, path, err)
	}
	for k, vs := range header {
		req.Header[k] = vs
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		tn.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		tn.t.Fatalf("%s %s: reading body: %v", method, path, err)
	}
	return resp, b
}

// testLogger sends the node's warnings and errors to the test log, and
// nothing once the test has finished (Raft may still log while closing).
func testLogger(t *testing.T) *slog.Logger {
	w := &testLogWriter{t: t}
	t.Cleanup(w.stop)
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

type testLogWriter struct {
	mu   sync.Mutex
	t    *testing.T
	done bool
}

func (w *testLogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Logf("node: %s", bytes.TrimRight(p, "\n"))
	}
	return len(p), nil
}

func (w *testLogWriter) stop() {
	w.mu.Lock()
	w.done = true
	w.mu.Unlock()
}

// sha256Hex hashes everything r yields.
func sha256Hex(t *testing.T, r io.Reader) string {
	t.Helper()
	h := sha256.New()
	if _, err := io.Copy(h, r); err != nil {
		t.Fatalf("read: %v", err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// layerHashes reads every layer of img fully and returns the sha256 of its
// compressed bytes, in manifest order.
func layerHashes(t *testing.T, img v1.Image) []string {
	t.Helper()
	layers, err := img.Layers()
	if err != nil {
		t.Fatalf("layers: %v", err)
	}
	var sums []string
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			t.Fatalf("open layer: %v", err)
		}
		sums = append(sums, sha256Hex(t, rc))
		rc.Close()
	}
	return sums
}

// checkImage pulls ref and verifies that it is byte for byte want: the
// manifest digest, the config digest and bytes, and every layer's digest and
// bytes.
func checkImage(t *testing.T, ref name.Reference, want v1.Image, opts ...remote.Option) {
	t.Helper()
	got, err := remote.Image(ref, opts...)
	if err != nil {
		t.Fatalf("pull %s: %v", ref, err)
	}
	mustEqualDigest(t, ref.String()+" manifest", want.Digest, got.Digest)
	mustEqualDigest(t, ref.String()+" config", want.ConfigName, got.ConfigName)
	wantCfg, err := want.RawConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	gotCfg, err := got.RawConfigFile()
	if err != nil {
		t.Fatalf("pull %s config: %v", ref, err)
	}
	if !bytes.Equal(wantCfg, gotCfg) {
		t.Errorf("%s: config bytes differ", ref)
	}
	wantLayers, _ := want.Layers()
	gotLayers, err := got.Layers()
	if err != nil {
		t.Fatalf("pull %s layers: %v", ref, err)
	}
	if len(gotLayers) != len(wantLayers) {
		t.Fatalf("%s: %d layers, want %d", ref, len(gotLayers), len(wantLayers))
	}
	for i := range wantLayers {
		mustEqualDigest(t, ref.String()+" layer", wantLayers[i].Digest, gotLayers[i].Digest)
	}
	wantSums, gotSums := layerHashes(t, want), layerHashes(t, got)
	for i := range wantSums {
		if gotSums[i] != wantSums[i] {
			t.Errorf("%s: layer %d has sha256 %s, want %s", ref, i, gotSums[i], wantSums[i])
		}
	}
}

func mustEqualDigest(t *testing.T, what string, want, got func() (v1.Hash, error)) {
	t.Helper()
	w, err := want()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	g, err := got()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if g != w {
		t.Errorf("%s: digest %s, want %s", what, g, w)
	}
}

func mustDigest(t *testing.T, f interface{ Digest() (v1.Hash, error) }) v1.Hash {
	t.Helper()
	d, err := f.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}
