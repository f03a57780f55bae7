package gateway_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meridian-registry/meridian/gateway"
	"github.com/meridian-registry/meridian/node"
	"github.com/meridian-registry/meridian/node/clustertest"
	"github.com/meridian-registry/meridian/node/membership"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
	"github.com/meridian-registry/meridian/replication"
)

// TestUpstreamPushPull pushes and pulls an image through a gateway whose
// metadata travels over gRPC to a three-node cluster, and checks that
// business outcomes arrive as the same errors an in-process node gives.
func TestUpstreamPushPull(t *testing.T) {
	c := clustertest.New(t, 3)
	ctx := within(t, 2*time.Minute)
	env := newUpstreamEnv(t, ctx, c, "", 100*time.Millisecond)

	img := randomImage(t)
	if err := remote.Write(env.ref(t, "up/app:v1"), img, remote.WithContext(ctx)); err != nil {
		t.Fatalf("push through the upstream gateway: %v", err)
	}
	got, err := remote.Image(env.ref(t, "up/app:v1"), remote.WithContext(ctx))
	if err != nil {
		t.Fatalf("pull: %v", err)
	}
	if gd, wd := mustDigest(t, got), mustDigest(t, img); gd != wd {
		t.Fatalf("pulled %s, pushed %s", gd, wd)
	}
	layers, _ := got.Layers()
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			t.Fatalf("pull layer: %v", err)
		}
		rc.Close()
	}
	if tags, err := remote.List(env.ref(t, "up/app:v1").Context(), remote.WithContext(ctx)); err != nil || len(tags) != 1 || tags[0] != "v1" {
		t.Fatalf("tags: %v, %v; want [v1]", tags, err)
	}
	if resp := env.get(t, "/v2/up/app/manifests/missing"); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("GET a missing tag: status %d, want 404", resp.StatusCode)
	}
	// A pull by tag is one round trip: the node resolves the tag itself.
	env.net.reset()
	resp := env.get(t, "/v2/up/app/manifests/v1")
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Docker-Content-Digest") != mustDigest(t, img).String() {
		t.Fatalf("GET by tag: status %d, digest %q; want 200 and %s", resp.StatusCode, resp.Header.Get("Docker-Content-Digest"), mustDigest(t, img))
	}
	if m, tg := env.net.total("GetManifest"), env.net.total("GetTag"); m != 1 || tg != 0 {
		t.Errorf("GET by tag made %d GetManifest and %d GetTag calls; want 1 and 0", m, tg)
	}

	md := env.up.Metadata()
	if _, err := md.Tag(ctx, "up/app", "missing"); !errors.Is(err, pb.ErrTagUnknown) {
		t.Fatalf("Tag of a missing tag: %v, want %v", err, pb.ErrTagUnknown)
	}
	rec, err := md.Manifest(ctx, "up/app", mustDigest(t, img).String())
	if err != nil {
		t.Fatal(err)
	}
	// A compare-and-swap against the wrong digest is a business result: no
	// retry on another node, and the same error as in process.
	env.net.reset()
	err = md.Commit(ctx, &pb.Command{Intent: &pb.Command_PutManifest{PutManifest: &pb.PutManifest{
		Repository: "up/app", Digest: rec.Digest, MediaType: rec.MediaType, Content: rec.Content,
		Tags: []string{"v1"}, IfMatch: "sha256:" + strings.Repeat("0", 64)}}})
	if !errors.Is(err, pb.ErrPreconditionFailed) {
		t.Fatalf("PutManifest with a stale If-Match: %v, want %v", err, pb.ErrPreconditionFailed)
	}
	if n := env.net.total("Commit"); n != 1 {
		t.Errorf("the refused PutManifest was sent %d times, want once", n)
	}
	if pol, err := md.Policy(ctx, "up/app"); err != nil || pol.MinRegions != 1 {
		t.Errorf("Policy: %+v, %v; want min_regions 1", pol, err)
	}
	if d, ok := env.up.RegionDistance("local"); !ok || d <= 0 {
		t.Errorf("RegionDistance(local) = %v, %v; want a measured distance", d, ok)
	}
	if conn, err := env.up.RegionConn("local")(ctx); err != nil || conn == nil {
		t.Errorf("RegionConn(local): %v", err)
	}
	if _, err := env.up.RegionConn("elsewhere")(ctx); !errors.Is(err, pb.ErrUnavailable) {
		t.Errorf("RegionConn of an unknown region: %v, want %v", err, pb.ErrUnavailable)
	}
}

// TestUpstreamReadsCarryOwnWrites: after a push through the gateway, every
// read it sends names, as min_index, the newest index a node acknowledged
// to it, so the node answering has applied the push first (the node side
// is TestGatewayReadWaitsForMinIndex). Without it, a tags list right after
// a push could come from a follower that has not applied the push yet.
func TestUpstreamReadsCarryOwnWrites(t *testing.T) {
	c := clustertest.New(t, 3)
	ctx := within(t, 2*time.Minute)
	env := newUpstreamEnv(t, ctx, c, "", 100*time.Millisecond)
	if err := remote.Write(env.ref(t, "ryw/app:v1"), randomImage(t), remote.WithContext(ctx)); err != nil {
		t.Fatalf("push: %v", err)
	}
	_, committed := env.net.indexes()
	if committed == 0 {
		t.Fatal("no Commit answer carried a log index")
	}
	env.net.reset()
	if tags, err := remote.List(env.ref(t, "ryw/app:v1").Context(), remote.WithContext(ctx)); err != nil || len(tags) != 1 {
		t.Fatalf("tags: %v, %v; want [v1]", tags, err)
	}
	if resp := env.get(t, "/v2/ryw/app/manifests/v1"); resp.StatusCode != http.StatusOK {
		t.Fatalf("GET by tag: status %d", resp.StatusCode)
	}
	reads, _ := env.net.indexes()
	if len(reads) < 2 {
		t.Fatalf("recorded %d reads, want the tags list and the manifest GET", len(reads))
	}
	for _, r := range reads {
		if r.minIndex < committed {
			t.Errorf("%s carried min_index %d, below the push's index %d", r.method, r.minIndex, committed)
		}
	}
}

// TestUpstreamPrefersNearest checks that metadata reads go to the node in
// the gateway's zone while every node is about as near, and to the node
// with the shortest measured round trip once the others are farther.
func TestUpstreamPrefersNearest(t *testing.T) {
	zones := []string{"zone-a", "zone-b", "zone-c"}
	c := clustertest.New(t, 3, clustertest.WithConfig(func(i int, cfg *node.Config) { cfg.Zone = zones[i] }))
	ctx := within(t, 2*time.Minute)
	env := newUpstreamEnv(t, ctx, c, "zone-b", 50*time.Millisecond)
	id := func(i int) string { return c.Config(i).NodeID }

	// Undelayed, the three are within a millisecond: the zone decides.
	env.waitPreferred(t, ctx, id(1))
	if err := remote.Write(env.ref(t, "near/app:v1"), randomImage(t), remote.WithContext(ctx)); err != nil {
		t.Fatal(err)
	}
	env.checkReadsGoTo(t, ctx, c.Config(1).GRPCAddr)

	// 20ms more to nodes 0 and 1: measured distance beats the zone.
	env.net.setDelay(c.Config(0).GRPCAddr, 20*time.Millisecond)
	env.net.setDelay(c.Config(1).GRPCAddr, 20*time.Millisecond)
	env.waitPreferred(t, ctx, id(2))
	env.checkReadsGoTo(t, ctx, c.Config(2).GRPCAddr)
	waitFor(t, ctx, "the delayed nodes measured at 20ms or so", func() bool {
		nodes := env.up.Nodes()
		return len(nodes) == 3 && nodes[0].ID == id(2) && nodes[1].RTT > 10*time.Millisecond && nodes[2].RTT > 10*time.Millisecond &&
			env.gauge(t, "meridian_gateway_upstream_rtt_seconds", id(0)) > 0.01
	})

	// Move the delay: node 0 becomes the nearest.
	env.net.setDelay(c.Config(0).GRPCAddr, 0)
	env.net.setDelay(c.Config(2).GRPCAddr, 20*time.Millisecond)
	env.waitPreferred(t, ctx, id(0))
	env.checkReadsGoTo(t, ctx, c.Config(0).GRPCAddr)
}

// TestUpstreamFailover loses the preferred node twice during a stream of
// pulls, first to a network failure that gossip does not see yet, then to a
// node stop, and checks that no pull fails and that the node comes back.
func TestUpstreamFailover(t *testing.T) {
	c := clustertest.New(t, 3)
	ctx := within(t, 2*time.Minute)
	env := newUpstreamEnv(t, ctx, c, "", 50*time.Millisecond)
	if err := remote.Write(env.ref(t, "fail/app:v1"), randomImage(t), remote.WithContext(ctx)); err != nil {
		t.Fatal(err)
	}
	pulls := env.pullLoop(t, "/v2/fail/app/manifests/v1", 4)

	// A network failure: the node is alive in gossip, its connection breaks.
	cut := env.up.Nodes()[0]
	pulls.waitServed(t, ctx, 20)
	env.net.setDown(cut.Addr, true)
	waitFor(t, ctx, "the cut node to lose first place", func() bool {
		nodes := env.up.Nodes()
		return len(nodes) > 0 && nodes[0].ID != cut.ID
	})
	pulls.waitServed(t, ctx, 50)
	env.net.setDown(cut.Addr, false)
	env.waitHealthy(t, ctx, cut.ID)

	// A stop: the node leaves gossip and shuts down its gRPC server.
	stopped := env.up.Nodes()[0]
	i := indexOf(c, stopped.ID)
	c.Stop(i)
	waitFor(t, ctx, "the stopped node to lose first place", func() bool {
		nodes := env.up.Nodes()
		return len(nodes) > 0 && nodes[0].ID != stopped.ID
	})
	pulls.waitServed(t, ctx, 50)
	if err := c.Restart(i); err != nil {
		t.Fatal(err)
	}
	env.waitHealthy(t, ctx, stopped.ID)
	pulls.waitServed(t, ctx, 20)

	if served, failed := pulls.stop(); failed > 0 {
		t.Errorf("%d of %d pulls failed while the preferred node was lost", failed, served+failed)
	}
}

// TestUpstreamResend checks when a call is sent to another node after the
// first failed: a read always; a write when it provably never left, and
// for idempotent entries also after it may have been delivered.
func TestUpstreamResend(t *testing.T) {
	c := clustertest.New(t, 3)
	ctx := within(t, 2*time.Minute)
	// No pings after the first round: only calls change what the upstream
	// believes, so the test knows which node each call tries first.
	env := newUpstreamEnv(t, ctx, c, "", time.Hour)
	img := randomImage(t)
	for _, tag := range []string{"a", "b"} {
		if err := remote.Write(env.ref(t, "resend/app:"+tag), img, remote.WithContext(ctx)); err != nil {
			t.Fatal(err)
		}
	}
	md := env.up.Metadata()
	deleteTag := func(tag string) *pb.Command {
		return &pb.Command{Intent: &pb.Command_DeleteTag{DeleteTag: &pb.DeleteTag{Repository: "resend/app", Tag: tag}}}
	}

	// A read: the nearest node is unreachable, the next one answers, and
	// the unreachable one drops to last place.
	first := env.up.Nodes()[0]
	env.net.setDown(first.Addr, true)
	env.net.reset()
	if _, err := md.Tag(ctx, "resend/app", "a"); err != nil {
		t.Fatalf("Tag with the nearest node unreachable: %v", err)
	}
	if n, all := env.net.calls(first.Addr, "GetTag"), env.net.total("GetTag"); n != 1 || all != 2 {
		t.Errorf("GetTag attempts: %d to the unreachable node, %d in all; want 1 and 2", n, all)
	}
	if f := env.counter(t, "meridian_gateway_upstream_failovers_total"); f != 1 {
		t.Errorf("failovers_total = %v, want 1", f)
	}
	if nodes := env.up.Nodes(); nodes[2].ID != first.ID || nodes[2].Healthy {
		t.Errorf("Nodes() = %+v; want %s last and failing", nodes, first.ID)
	}
	if env.gauge(t, "meridian_gateway_upstream_preferred", first.ID) != 0 {
		t.Errorf("the unreachable node is still the preferred one in the metrics")
	}

	// A write that no connection carried: resent, even a delete.
	second := env.up.Nodes()[0]
	env.net.setDown(second.Addr, true)
	env.net.reset()
	if err := md.Commit(ctx, deleteTag("a")); err != nil {
		t.Fatalf("DeleteTag with the nearest node unreachable: %v", err)
	}
	if n, all := env.net.calls(second.Addr, "Commit"), env.net.total("Commit"); n != 1 || all != 2 {
		t.Errorf("Commit attempts: %d to the unreachable node, %d in all; want 1 and 2", n, all)
	}

	// Delivered, then the connection broke before the answer: a delete is
	// not sent again; the client gets 503 and decides. (Every replica has
	// the tag first, so its absence proves the delete applied.)
	if err := c.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}
	third := env.up.Nodes()[0]
	if !third.Healthy || third.ID == first.ID || third.ID == second.ID {
		t.Fatalf("Nodes() = %+v; want the one node left healthy first", env.up.Nodes())
	}
	env.net.reset()
	err := env.deliverThenCut(t, ctx, third, deleteTag("b"), func() bool {
		_, err := c.Node(indexOf(c, third.ID)).Consensus().Store().Tag(ctx, "resend/app", "b")
		return errors.Is(err, pb.ErrTagUnknown)
	})
	if !errors.Is(err, pb.ErrUnavailable) {
		t.Errorf("DeleteTag cut off after delivery: %v, want %v", err, pb.ErrUnavailable)
	}
	if n := env.net.total("Commit"); n != 1 {
		t.Errorf("the delivered DeleteTag was sent %d times, want once", n)
	}

	// The same for an idempotent entry (a blob link with its placement):
	// sent again, to a node that failed before (no node is healthy now)
	// but answers again.
	env.net.setDown(first.Addr, false)
	env.net.setDown(second.Addr, false)
	env.net.setDown(third.Addr, false)
	nearest := env.up.Nodes()[0]
	layers, _ := img.Layers()
	ld, _ := layers[0].Digest()
	size, _ := layers[0].Size()
	link := &pb.Command{Intent: &pb.Command_LinkBlob{LinkBlob: &pb.LinkBlob{
		Repository: "resend/other", Digest: ld.String(), Size: size, PlacedRegion: "local"}}}
	env.net.reset()
	err = env.deliverThenCut(t, ctx, nearest, link, func() bool {
		_, err := c.Node(indexOf(c, nearest.ID)).Consensus().Store().LinkedBlob(ctx, "resend/other", ld.String())
		return err == nil
	})
	if err != nil {
		t.Errorf("LinkBlob cut off after delivery: %v, want it resent and committed", err)
	}
	// Twice or more: a node just reachable again may still be waiting to
	// reconnect, and refuse the call unsent.
	if n := env.net.total("Commit"); n < 2 {
		t.Errorf("the delivered LinkBlob was sent %d times, want it sent again", n)
	}
}

// upstreamEnv is a gateway process in miniature: a gossip member of role
// gateway, an Upstream over a test network, and the OCI API on top.
type upstreamEnv struct {
	up  *gateway.Upstream
	net *testNet
	reg *prometheus.Registry
	srv *httptest.Server
}

func newUpstreamEnv(t *testing.T, ctx context.Context, c *clustertest.Cluster, zone string, ping time.Duration, adjust ...func(*gateway.UpstreamConfig)) *upstreamEnv {
	t.Helper()
	logger := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	mc := membership.DefaultConfig()
	mc.Meta = membership.Meta{ID: "gateway-test", ClusterID: c.Config(0).ClusterID, Region: "local", Zone: zone,
		Role: membership.RoleGateway, Version: membership.ProtocolVersion}
	mc.BindAddr = "127.0.0.1:0"
	mc.Timings = membership.LocalTimings()
	mc.Logger = logger
	gossip, err := membership.New(mc)
	if err != nil {
		t.Fatal(err)
	}
	if err := gossip.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { gossip.Close() })
	if err := gossip.Join(ctx, []string{c.Config(0).GossipAddr}); err != nil {
		t.Fatal(err)
	}

	tn := newTestNet(t)
	reg := prometheus.NewRegistry()
	ucfg := gateway.UpstreamConfig{
		ID: "gateway-test", Region: "local", Zone: zone, Members: gossip.Members, Dial: tn.dial,
		PingInterval: ping, Logger: logger, Registerer: reg,
	}
	for _, f := range adjust {
		f(&ucfg)
	}
	up, err := gateway.NewUpstream(ucfg)
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); up.Run(runCtx) }()
	t.Cleanup(func() { cancel(); <-done })

	stores := replication.NewRegions("local")
	d, err := replication.OpenStore(ctx, replication.StoreConfig{Region: "local", URL: "file://" + c.Config(0).BlobDir})
	if err != nil {
		t.Fatal(err)
	}
	stores.Add("local", d)
	gcfg := gateway.DefaultConfig()
	gcfg.Logger = logger
	g, err := gateway.New(gcfg, up.Metadata(), stores)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(g.Handler())
	t.Cleanup(srv.Close)

	env := &upstreamEnv{up: up, net: tn, reg: reg, srv: srv}
	waitFor(t, ctx, "every node measured", func() bool {
		nodes := up.Nodes()
		for _, n := range nodes {
			if !n.Known || !n.Healthy {
				return false
			}
		}
		return len(nodes) == c.Size()
	})
	return env
}

func (e *upstreamEnv) ref(t *testing.T, s string) name.Reference {
	t.Helper()
	r, err := name.ParseReference(strings.TrimPrefix(e.srv.URL, "http://")+"/"+s, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func (e *upstreamEnv) get(t *testing.T, path string) *http.Response {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, e.srv.URL+path, nil)
	req.Header.Set("Accept", "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json")
	resp, err := e.srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp
}

// waitPreferred waits until id comes first in Nodes() and the preferred
// gauge says so.
func (e *upstreamEnv) waitPreferred(t *testing.T, ctx context.Context, id string) {
	t.Helper()
	waitFor(t, ctx, "node "+id+" preferred", func() bool {
		nodes := e.up.Nodes()
		return len(nodes) > 0 && nodes[0].ID == id && e.gauge(t, "meridian_gateway_upstream_preferred", id) == 1
	})
}

func (e *upstreamEnv) waitHealthy(t *testing.T, ctx context.Context, id string) {
	t.Helper()
	waitFor(t, ctx, "node "+id+" healthy", func() bool {
		for _, n := range e.up.Nodes() {
			if n.ID == id {
				return n.Healthy && n.Known
			}
		}
		return false
	})
}

// checkReadsGoTo pulls a manifest a few times and checks that every
// metadata read went to addr.
func (e *upstreamEnv) checkReadsGoTo(t *testing.T, ctx context.Context, addr string) {
	t.Helper()
	e.net.reset()
	for range 10 {
		if _, err := e.up.Metadata().Repositories(ctx, "", 10); err != nil {
			t.Fatal(err)
		}
	}
	if n, all := e.net.calls(addr, "ListRepositories"), e.net.total("ListRepositories"); n != 10 || all != 10 {
		t.Errorf("%d of %d reads went to %s, want 10 of 10", n, all, addr)
	}
}

// deliverThenCut proposes e with the answers of node n held back until
// delivered() says the node got it, then breaks n's connections, and
// returns what Commit returned.
func (e *upstreamEnv) deliverThenCut(t *testing.T, ctx context.Context, n gateway.UpstreamNode, entry *pb.Command, delivered func() bool) error {
	t.Helper()
	e.net.waitReady(t, ctx, n.Addr)
	e.net.setHold(n.Addr, true)
	defer e.net.setHold(n.Addr, false)
	errc := make(chan error, 1)
	go func() { errc <- e.up.Metadata().Commit(ctx, entry) }()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for e.net.calls(n.Addr, "Commit") == 0 || !delivered() {
		select {
		case err := <-errc:
			t.Fatalf("Commit returned before the write reached %s: %v", n.ID, err)
		case <-ctx.Done():
			t.Fatalf("waiting for the write to reach %s: %v", n.ID, ctx.Err())
		case <-tick.C:
		}
	}
	e.net.setDown(n.Addr, true)
	return <-errc
}

func (e *upstreamEnv) gauge(t *testing.T, name, node string) float64 {
	t.Helper()
	mfs, err := e.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "node" && l.GetValue() == node {
					return m.GetGauge().GetValue()
				}
			}
		}
	}
	return -1
}

func (e *upstreamEnv) counter(t *testing.T, name string) float64 {
	t.Helper()
	mfs, err := e.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	return -1
}

// pulls GETs a manifest from several goroutines until stopped.
type pulls struct {
	served, failed atomic.Int64
	stopc          chan struct{}
	wg             sync.WaitGroup
	mu             sync.Mutex
	errs           []string
}

func (e *upstreamEnv) pullLoop(t *testing.T, path string, workers int) *pulls {
	p := &pulls{stopc: make(chan struct{})}
	for range workers {
		p.wg.Go(func() {
			for {
				select {
				case <-p.stopc:
					return
				default:
				}
				req, _ := http.NewRequest(http.MethodGet, e.srv.URL+path, nil)
				req.Header.Set("Accept", "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json")
				resp, err := e.srv.Client().Do(req)
				if err == nil {
					resp.Body.Close()
					if resp.StatusCode != http.StatusOK {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
				}
				if err != nil {
					p.failed.Add(1)
					p.mu.Lock()
					if len(p.errs) < 5 {
						p.errs = append(p.errs, err.Error())
						t.Logf("pull failed: %v", err)
					}
					p.mu.Unlock()
					continue
				}
				p.served.Add(1)
			}
		})
	}
	t.Cleanup(func() { p.stop() })
	return p
}

// waitServed waits until n more pulls succeed.
func (p *pulls) waitServed(t *testing.T, ctx context.Context, n int64) {
	t.Helper()
	target := p.served.Load() + n
	waitFor(t, ctx, fmt.Sprintf("%d more pulls", n), func() bool { return p.served.Load() >= target })
}

func (p *pulls) stop() (served, failed int64) {
	select {
	case <-p.stopc:
	default:
		close(p.stopc)
	}
	p.wg.Wait()
	return p.served.Load(), p.failed.Load()
}

// testNet is the gateway's network to the nodes: one pooled gRPC
// connection per address, with latency, outages and held answers injected
// per address, and every call counted.
type testNet struct {
	t       *testing.T
	mu      sync.Mutex
	delay   map[string]time.Duration
	down    map[string]bool
	hold    map[string]bool
	conns   map[string][]*testConn
	clients map[string]*grpc.ClientConn
	counts  map[string]map[string]int // address → method → calls
	// reads lists every read's method and min_index; committed is the
	// highest index a Commit answer carried.
	reads     []indexedRead
	committed uint64
}

type indexedRead struct {
	method   string
	minIndex uint64
}

func newTestNet(t *testing.T) *testNet {
	n := &testNet{t: t, delay: map[string]time.Duration{}, down: map[string]bool{}, hold: map[string]bool{},
		conns: map[string][]*testConn{}, clients: map[string]*grpc.ClientConn{}, counts: map[string]map[string]int{}}
	t.Cleanup(func() {
		n.mu.Lock()
		clients := n.clients
		n.clients = map[string]*grpc.ClientConn{}
		n.mu.Unlock()
		for _, c := range clients {
			c.Close() // not under mu: closing waits for readers that take it
		}
	})
	return n
}

func (n *testNet) dial(addr string) (grpc.ClientConnInterface, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if c, ok := n.clients[addr]; ok {
		return c, nil
	}
	bo := backoff.DefaultConfig
	bo.BaseDelay, bo.MaxDelay = 20*time.Millisecond, 200*time.Millisecond
	c, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: bo, MinConnectTimeout: time.Second}),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return n.connect(ctx, addr) }),
		grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			short := method[strings.LastIndex(method, "/")+1:]
			n.count(addr, short)
			err := invoker(ctx, method, req, reply, cc, opts...)
			n.recordIndexes(short, req, reply)
			return err
		}))
	if err != nil {
		return nil, err
	}
	n.clients[addr] = c
	return c, nil
}

// waitReady waits until the connection to addr is established.
func (n *testNet) waitReady(t *testing.T, ctx context.Context, addr string) {
	t.Helper()
	if _, err := n.dial(addr); err != nil {
		t.Fatal(err)
	}
	n.mu.Lock()
	c := n.clients[addr]
	n.mu.Unlock()
	for {
		s := c.GetState()
		if s == connectivity.Ready {
			return
		}
		c.Connect()
		if !c.WaitForStateChange(ctx, s) {
			t.Fatalf("waiting for a connection to %s: %v (state %v)", addr, ctx.Err(), s)
		}
	}
}

func (n *testNet) connect(ctx context.Context, addr string) (net.Conn, error) {
	n.mu.Lock()
	down := n.down[addr]
	n.mu.Unlock()
	if down {
		return nil, fmt.Errorf("test network: %s is unreachable", addr)
	}
	var d net.Dialer
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	c := &testConn{Conn: raw, net: n, addr: addr, closed: make(chan struct{})}
	n.mu.Lock()
	n.conns[addr] = append(n.conns[addr], c)
	n.mu.Unlock()
	return c, nil
}

func (n *testNet) count(addr, method string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.counts[addr] == nil {
		n.counts[addr] = map[string]int{}
	}
	n.counts[addr][method]++
}

// recordIndexes notes a read's min_index and a Commit answer's index.
func (n *testNet) recordIndexes(method string, req, reply any) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if r, ok := req.(interface{ GetMinIndex() uint64 }); ok {
		n.reads = append(n.reads, indexedRead{method, r.GetMinIndex()})
	}
	if c, ok := reply.(*pb.CommitResponse); ok {
		n.committed = max(n.committed, c.GetIndex())
	}
}

// indexes returns the reads recorded and the highest committed index.
func (n *testNet) indexes() ([]indexedRead, uint64) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Clone(n.reads), n.committed
}

func (n *testNet) calls(addr, method string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.counts[addr][method]
}

func (n *testNet) total(method string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	sum := 0
	for _, m := range n.counts {
		sum += m[method]
	}
	return sum
}

func (n *testNet) reset() {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.counts = map[string]map[string]int{}
	n.reads = nil
}

func (n *testNet) setDelay(addr string, d time.Duration) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.delay[addr] = d
}

func (n *testNet) setHold(addr string, hold bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.hold[addr] = hold
}

// setDown makes addr unreachable (new connections fail, open ones break)
// or reachable again.
func (n *testNet) setDown(addr string, down bool) {
	n.mu.Lock()
	n.down[addr] = down
	var open []*testConn
	if down {
		open, n.conns[addr] = n.conns[addr], nil
	}
	n.mu.Unlock()
	for _, c := range open {
		c.Close()
	}
}

func (n *testNet) state(addr string) (time.Duration, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.delay[addr], n.hold[addr]
}

// testConn delays what it reads by the address's delay, and holds it back
// while the address's answers are held.
type testConn struct {
	net.Conn
	net    *testNet
	addr   string
	once   sync.Once
	closed chan struct{}
}

func (c *testConn) Read(b []byte) (int, error) {
	k, err := c.Conn.Read(b)
	for {
		d, held := c.net.state(c.addr)
		if !held {
			if k > 0 && d > 0 {
				select {
				case <-c.closed:
					return 0, net.ErrClosed
				case <-time.After(d):
				}
			}
			return k, err
		}
		select {
		case <-c.closed:
			return 0, net.ErrClosed
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func (c *testConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

// indexOf finds the index of node id in c.
func indexOf(c *clustertest.Cluster, id string) int {
	for i := range c.Size() {
		if c.Config(i).NodeID == id {
			return i
		}
	}
	return -1
}

func within(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// waitFor polls cond until it holds, failing the test when ctx ends.
func waitFor(t *testing.T, ctx context.Context, what string, cond func() bool) {
	t.Helper()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: %v", what, ctx.Err())
		case <-tick.C:
		}
	}
}

func randomImage(t *testing.T) v1.Image {
	t.Helper()
	img, err := random.Image(2048, 2)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func mustDigest(t *testing.T, img v1.Image) v1.Hash {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}
