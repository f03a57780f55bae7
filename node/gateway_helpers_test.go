package node_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"github.com/meridian-registry/meridian/gateway/auth"
	"github.com/meridian-registry/meridian/node/clustertest/admin"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/Shopify/toxiproxy/v2"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/opencontainers/go-digest"
	"github.com/rs/zerolog"

	"github.com/meridian-registry/meridian/gateway"
	"github.com/meridian-registry/meridian/node"
	"github.com/meridian-registry/meridian/node/clustertest"
	"github.com/meridian-registry/meridian/node/membership"
)

// dirGeo is a three-region cluster whose regions are directories: node i
// runs in geoRegions[i] (us-east, eu-west, ap-south, then us-east again).
// A standalone gateway cannot open another region's directory, so it reads
// and writes every region through that region's nodes (the remote driver).
type dirGeo struct {
	c       *clustertest.Cluster
	regions []node.RegionConfig
}

func newDirGeo(t *testing.T, size int, opts ...clustertest.Option) *dirGeo {
	t.Helper()
	g := &dirGeo{}
	for _, r := range geoRegions[:3] {
		g.regions = append(g.regions, node.RegionConfig{Name: r, Store: "file://" + t.TempDir()})
	}
	g.c = clustertest.New(t, size, append([]clustertest.Option{clustertest.WithConfig(func(i int, c *node.Config) {
		c.BlobDir = ""
		c.Regions = g.regions
		c.Region = geoRegions[i]
		c.Replication.SyncTimeout = 20 * time.Second
	})}, opts...)...)
	return g
}

// gatewayRegions is the cluster's region list as a gateway is configured
// with it.
func (g *dirGeo) gatewayRegions() []gateway.RegionStore {
	var out []gateway.RegionStore
	for _, r := range g.regions {
		out = append(out, gateway.RegionStore{Name: r.Name, Store: r.Store})
	}
	return out
}

// waitTopology waits until every running node has applied the region
// list: a blob pushed before the leader records it is placed in the
// uploading region only, and copied elsewhere only once it is recorded.
func (g *dirGeo) waitTopology(t *testing.T, ctx context.Context) {
	t.Helper()
	waitFor(t, ctx, "every node to know the three regions", func() bool {
		for _, i := range g.c.Running() {
			n := g.c.Node(i)
			if n == nil {
				return false
			}
			if rs, err := n.Consensus().Store().Regions(ctx); err != nil || len(rs) != len(g.regions) {
				return false
			}
		}
		return true
	})
}

// waitPlaced waits until every running node records each blob as placed in
// every region: with directory regions, a blob whose only copy is in a
// stopped node's region cannot be read (nor copied elsewhere) until the
// node is back.
func (g *dirGeo) waitPlaced(t *testing.T, ctx context.Context, blobs []digest.Digest) {
	t.Helper()
	var last string
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		last = g.unplaced(ctx, blobs)
		if last == "" {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for blobs to be placed in every region: %v; %s", ctx.Err(), last)
		case <-tick.C:
		}
	}
}

// unplaced describes the first blob some node does not record in every
// region ("" when there is none).
func (g *dirGeo) unplaced(ctx context.Context, blobs []digest.Digest) string {
	for _, i := range g.c.Running() {
		n := g.c.Node(i)
		if n == nil {
			return fmt.Sprintf("node %d stopped", i)
		}
		for _, b := range blobs {
			rec, err := n.Consensus().Store().Blob(ctx, b.String())
			if err != nil || len(rec.GetRegions()) != len(g.regions) {
				return fmt.Sprintf("node %d: blob %s placed in %v (%v)", i, b, rec.GetRegions(), err)
			}
		}
	}
	return ""
}

// latencyDialer is one gateway's network to the nodes: a toxiproxy proxy in
// front of each node's gRPC address, adding that node's latency. The
// gateway measures distance by pinging over the gRPC connections that carry
// its calls, so the proxy's latency is the node's distance as this gateway
// sees it. Nodes keep their gRPC address across restarts, so a proxy
// outlives the node behind it. cut and heal partition the gateway from one
// node while gossip still says the node is alive.
type latencyDialer struct {
	proxies map[string]string // node gRPC address → proxy address
	addrs   []string          // node i's gRPC address

	mu       sync.Mutex
	cuts     map[string]bool
	conns    map[string][]net.Conn
	attempts map[string][]time.Time // dials to each address, refused ones too
	answers  map[string][]time.Time // connections on which the node sent bytes, when it first did
}

// newLatencyDialer puts a proxy with delays[i] of latency (applied to the
// replies) in front of node i. The proxies stop with the test.
func newLatencyDialer(t *testing.T, c *clustertest.Cluster, delays ...time.Duration) *latencyDialer {
	t.Helper()
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	d := &latencyDialer{proxies: map[string]string{}, cuts: map[string]bool{},
		conns: map[string][]net.Conn{}, attempts: map[string][]time.Time{}, answers: map[string][]time.Time{}}
	for i, delay := range delays {
		upstream := c.Config(i).GRPCAddr
		p := toxiproxy.NewProxy(srv, fmt.Sprintf("node-%d", i), "127.0.0.1:0", upstream)
		if err := p.Start(); err != nil {
			t.Fatalf("proxy for node %d: %v", i, err)
		}
		t.Cleanup(p.Stop)
		if delay > 0 {
			toxic := fmt.Sprintf(`{"name":"latency","type":"latency","stream":"downstream","attributes":{"latency":%d}}`, delay.Milliseconds())
			if _, err := p.Toxics.AddToxicJson(strings.NewReader(toxic)); err != nil {
				t.Fatalf("latency toxic for node %d: %v", i, err)
			}
		}
		d.proxies[upstream] = p.Listen
		d.addrs = append(d.addrs, upstream)
	}
	return d
}

// dial is the gateway's Dial hook. An address with no proxy is refused, so
// a connection cannot bypass the latencies unnoticed.
func (d *latencyDialer) dial(ctx context.Context, addr string) (net.Conn, error) {
	d.mu.Lock()
	d.attempts[addr] = append(d.attempts[addr], time.Now())
	cut := d.cuts[addr]
	d.mu.Unlock()
	p, ok := d.proxies[addr]
	switch {
	case !ok:
		return nil, fmt.Errorf("latency dialer: no proxy for %s", addr)
	case cut:
		return nil, fmt.Errorf("latency dialer: %s is cut off", addr)
	}
	var nd net.Dialer
	conn, err := nd.DialContext(ctx, "tcp", p)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cuts[addr] {
		conn.Close()
		return nil, fmt.Errorf("latency dialer: %s is cut off", addr)
	}
	d.conns[addr] = append(d.conns[addr], conn)
	return &answeredConn{Conn: conn, answered: func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		d.answers[addr] = append(d.answers[addr], time.Now())
	}}, nil
}

// cut refuses new connections to node i and closes the open ones.
func (d *latencyDialer) cut(i int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	addr := d.addrs[i]
	d.cuts[addr] = true
	for _, c := range d.conns[addr] {
		c.Close()
	}
	d.conns[addr] = nil
}

// heal lets connections to node i through again.
func (d *latencyDialer) heal(i int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.cuts, d.addrs[i])
}

// dialsSince lists the connection attempts to node i since t.
func (d *latencyDialer) dialsSince(i int, t time.Time) []time.Time {
	return d.since(d.attempts, i, t)
}

// answeredSince reports whether node i has answered on a connection since
// t (the proxy accepts connections while the node is down, then closes
// them without a byte).
func (d *latencyDialer) answeredSince(i int, t time.Time) bool {
	return len(d.since(d.answers, i, t)) > 0
}

// answeredConn calls answered on its first read that returns bytes.
type answeredConn struct {
	net.Conn
	once     sync.Once
	answered func()
}

func (c *answeredConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.once.Do(c.answered)
	}
	return n, err
}

func (d *latencyDialer) since(log map[string][]time.Time, i int, t time.Time) []time.Time {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []time.Time
	for _, at := range log[d.addrs[i]] {
		if !at.Before(t) {
			out = append(out, at)
		}
	}
	return out
}

// startGateway starts a standalone gateway in region, joined to g's
// cluster through node 0 and reaching the nodes through dial. It is closed
// when the test ends; adjust may change its configuration first.
func startGateway(t *testing.T, g *dirGeo, id, region string, dial *latencyDialer, adjust func(*gateway.StandaloneConfig)) *gateway.Standalone {
	t.Helper()
	cfg := gatewayConfig(t, g, id, region, dial)
	if adjust != nil {
		adjust(&cfg)
	}
	gw, err := gateway.NewStandalone(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := gw.Start(ctx); err != nil {
		t.Fatalf("start gateway %s: %v", id, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if err := gw.Close(ctx); err != nil {
			t.Errorf("close gateway %s: %v", id, err)
		}
	})
	return gw
}

func gatewayConfig(t *testing.T, g *dirGeo, id, region string, dial *latencyDialer) gateway.StandaloneConfig {
	cfg := gateway.StandaloneConfig{
		ID:            id,
		ClusterID:     g.c.Config(0).ClusterID,
		Region:        region,
		HTTPAddr:      "127.0.0.1:0",
		GossipAddr:    "127.0.0.1:0",
		Join:          []string{g.c.Config(0).GossipAddr},
		GossipTimings: membership.LocalTimings(),
		Regions:       g.gatewayRegions(),
		Gateway:       gateway.DefaultConfig(),
		Logger:        clustertest.TestLogger(t, slog.LevelWarn).With("gw", id),
		// The gateway authenticates requests from the cluster's access
		// state, which it fetches with the admin's credentials (no TLS).
		Access:         auth.New(auth.Config{Via: id}),
		AccessUsername: admin.AdminUser,
		AccessPassword: admin.AdminPassword,
	}
	if dial != nil {
		cfg.Dial = dial.dial
	}
	return cfg
}

// nodeIDs lists a gateway's view of the nodes, nearest first, for messages.
func nodeIDs(gw *gateway.Standalone) string {
	var parts []string
	for _, n := range gw.Upstream().Nodes() {
		parts = append(parts, fmt.Sprintf("%s(rtt %v known %v healthy %v)", n.ID, n.RTT.Round(100*time.Microsecond), n.Known, n.Healthy))
	}
	return "[" + strings.Join(parts, " ") + "]"
}

// preferred reports whether gw lists want live nodes, all measured and
// healthy, and sends its calls to node id first.
func preferred(gw *gateway.Standalone, id string, want int) bool {
	nodes := gw.Upstream().Nodes()
	if len(nodes) != want || nodes[0].ID != id {
		return false
	}
	for _, n := range nodes {
		if !n.Known || !n.Healthy {
			return false
		}
	}
	return true
}

// waitPreferred waits until gw prefers node id, failing with gw's view.
func waitPreferred(t *testing.T, ctx context.Context, gw *gateway.Standalone, id string, want int) {
	t.Helper()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !preferred(gw, id, want) {
		select {
		case <-ctx.Done():
			t.Fatalf("gateway %s never preferred %s over its %d nodes: %s", gw.ID(), id, want, nodeIDs(gw))
		case <-tick.C:
		}
	}
}

// gwRef is s (repo:tag) on gateway gw.
func gwRef(t *testing.T, gw *gateway.Standalone, s string) name.Reference {
	t.Helper()
	r, err := name.ParseReference(gw.HTTPAddr()+"/"+s, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// pullFrom is pullAndCompare against any registry host (a gateway).
func pullFrom(ctx context.Context, tr http.RoundTripper, host, s string, want v1.Image, opts ...remote.Option) error {
	r, err := name.ParseReference(host+"/"+s, name.Insecure)
	if err != nil {
		return err
	}
	got, err := remote.Image(r, append([]remote.Option{remote.WithContext(ctx), remote.WithTransport(tr)}, opts...)...)
	if err != nil {
		return fmt.Errorf("pull %s from %s: %w", s, host, err)
	}
	gd, err := got.Digest()
	if err != nil {
		return err
	}
	if wd, _ := want.Digest(); gd != wd {
		return fmt.Errorf("pull %s from %s: digest %s, want %s", s, host, gd, wd)
	}
	layers, err := want.Layers()
	if err != nil {
		return err
	}
	for _, wl := range layers {
		d, err := wl.Digest()
		if err != nil {
			return err
		}
		gl, err := got.LayerByDigest(d)
		if err != nil {
			return fmt.Errorf("pull %s from %s: layer %s: %w", s, host, d, err)
		}
		wb, err := readAll(wl.Compressed)
		if err != nil {
			return err
		}
		gb, err := readAll(gl.Compressed)
		if err != nil {
			return fmt.Errorf("pull %s from %s: layer %s: %w", s, host, d, err)
		}
		if !bytes.Equal(wb, gb) {
			return fmt.Errorf("pull %s from %s: layer %s: %d bytes differ from the %d pushed", s, host, d, len(gb), len(wb))
		}
	}
	return nil
}

// getVerified GETs url and checks that the body hashes to dgst (sha256:…)
// and that Docker-Content-Digest names it.
func getVerified(ctx context.Context, client *http.Client, url, accept, dgst string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	h := sha256.New()
	n, err := io.Copy(h, resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: status %d", url, resp.StatusCode)
	}
	if err != nil {
		return fmt.Errorf("GET %s: body broke after %d bytes: %w", url, n, err)
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != dgst {
		return fmt.Errorf("GET %s: %d bytes hash to %s, want %s", url, n, got, dgst)
	}
	if hd := resp.Header.Get("Docker-Content-Digest"); hd != dgst {
		return fmt.Errorf("GET %s: Docker-Content-Digest %q, want %s", url, hd, dgst)
	}
	return nil
}

// failures counts outcomes of concurrent requests and keeps the first few
// errors for the report.
type failures struct {
	mu     sync.Mutex
	ok     int
	failed int
	first  []string
}

func (f *failures) record(err error, at time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err == nil {
		f.ok++
		return
	}
	f.failed++
	if len(f.first) < 5 {
		f.first = append(f.first, at.Format("15:04:05.000")+" "+err.Error())
	}
}

func (f *failures) counts() (ok, failed int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ok, f.failed
}

func (f *failures) String() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failed == 0 {
		return fmt.Sprintf("%d ok, none failed", f.ok)
	}
	return fmt.Sprintf("%d ok, %d failed; first failures:\n  %s", f.ok, f.failed, strings.Join(f.first, "\n  "))
}

// loop runs fn in workers goroutines until stop is called, recording each
// outcome; stop returns once they have all returned.
func loop(workers int, rec *failures, fn func(ctx context.Context, worker, k int) error) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for k := 0; ctx.Err() == nil; k++ {
				rctx, rcancel := context.WithTimeout(ctx, 30*time.Second)
				start := time.Now()
				err := fn(rctx, w, k)
				rcancel()
				if ctx.Err() != nil {
					return // stopped mid-request: not an outcome
				}
				rec.record(err, start)
			}
		})
	}
	return func() {
		cancel()
		wg.Wait()
	}
}

// waitMore waits until rec counts n more successes than it did at call
// time, failing early if any request failed.
func waitMore(t *testing.T, ctx context.Context, rec *failures, n int, what string) {
	t.Helper()
	before, _ := rec.counts()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, _ := rec.counts()
		if ok >= before+n {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %d more successful requests %s: %v; %s", n, what, ctx.Err(), rec)
		case <-tick.C:
		}
	}
}
