package node_test

// Integration tests of the standalone gateway (gateway.NewStandalone) in
// front of a three-region cluster of real nodes: it prefers the nearest
// node as measured over its own connections, keeps serving while nodes stop
// and restart or are cut off from it, lets an upload session move between
// gateways, and refuses a cluster configured with other regions. Each
// gateway reaches the nodes through toxiproxy proxies of its own, whose
// latencies set how far each node is from it.

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"

	"github.com/meridian-registry/meridian/gateway"
	"github.com/meridian-registry/meridian/node/membership"
)

const manifestAccept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"

// TestGatewayNearestNode: two gateways that see the same three nodes at
// different distances each prefer their own nearest; when gateway A's
// nearest node stops, reads through A keep succeeding and A moves to the
// next nearest; when it comes back, A prefers it again.
func TestGatewayNearestNode(t *testing.T) {
	g := newDirGeo(t, 3)
	c := g.c
	ctx := within(t, 2*time.Minute)
	ms := time.Millisecond
	linkA := newLatencyDialer(t, c, 0, 15*ms, 30*ms)
	a := startGateway(t, g, "gw-a", "us-east", linkA, nil)
	b := startGateway(t, g, "gw-b", "eu-west", newLatencyDialer(t, c, 30*ms, 0, 15*ms), nil)
	waitPreferred(t, ctx, a, "node-0", 3)
	waitPreferred(t, ctx, b, "node-1", 3)
	t.Logf("gateway A sees %s; gateway B sees %s", nodeIDs(a), nodeIDs(b))
	g.waitTopology(t, ctx)

	img := randomImage(t, 64<<10, 2)
	if err := remote.Write(gwRef(t, a, "near/app:v1"), img, remoteOpts(ctx, c)...); err != nil {
		t.Fatalf("push through gateway A: %v", err)
	}
	// With node 0 down, us-east's directory is out of reach: reads must
	// find every blob in another region.
	blobs := imageBlobs(t, img)
	g.waitPlaced(t, ctx, blobs)

	imgDigest := mustDigest(t, img).String()
	client := &http.Client{Transport: c.Transport()}
	base := "http://" + a.HTTPAddr() + "/v2/near/app/"
	rec := &failures{}
	stop := loop(2, rec, func(ctx context.Context, _, k int) error {
		if err := getVerified(ctx, client, base+"manifests/v1", manifestAccept, imgDigest); err != nil {
			return err
		}
		b := blobs[k%len(blobs)]
		return getVerified(ctx, client, base+"blobs/"+b.String(), "", b.String())
	})
	defer stop()
	waitMore(t, ctx, rec, 10, "before stopping node 0")

	c.Stop(0)
	waitPreferred(t, ctx, a, "node-1", 2)
	waitMore(t, ctx, rec, 10, "with node 0 stopped")
	t.Logf("node 0 stopped: gateway A sees %s", nodeIDs(a))

	restarted := time.Now()
	if err := c.Restart(0); err != nil {
		t.Fatal(err)
	}
	if err := c.Node(0).WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	// Preferred over a new connection: what the gateway knew of node 0
	// before the stop does not count.
	waitFor(t, ctx, "the restarted node 0 to answer gateway A", func() bool { return linkA.answeredSince(0, restarted) })
	waitPreferred(t, ctx, a, "node-0", 3)
	t.Logf("node 0 preferred again %v after its restart began: gateway A sees %s", time.Since(restarted).Round(time.Millisecond), nodeIDs(a))
	waitMore(t, ctx, rec, 10, "after node 0 came back")
	stop()
	if _, failed := rec.counts(); failed > 0 {
		t.Fatalf("reads through gateway A while its nearest node stopped and restarted: %s", rec)
	}
	t.Logf("reads through gateway A: %s", rec)
	waitPreferred(t, ctx, b, "node-1", 3)
}

// TestGatewayPullsThroughRollingRestarts: pulls through a gateway succeed,
// byte for byte, while every node in turn stops and restarts.
func TestGatewayPullsThroughRollingRestarts(t *testing.T) {
	g := newDirGeo(t, 3)
	c := g.c
	ctx := within(t, 3*time.Minute)
	ms := time.Millisecond
	link := newLatencyDialer(t, c, 0, 10*ms, 20*ms)
	gw := startGateway(t, g, "gw-rolling", "us-east", link, nil)
	waitPreferred(t, ctx, gw, "node-0", 3)
	g.waitTopology(t, ctx)

	const images = 4
	imgs := make([]v1.Image, images)
	var blobs []digest.Digest
	for k := range imgs {
		imgs[k] = randomImage(t, 32<<10+int64(k), 2)
		if err := remote.Write(gwRef(t, gw, fmt.Sprintf("rolling/app:v%d", k)), imgs[k], remoteOpts(ctx, c)...); err != nil {
			t.Fatalf("push image %d through the gateway: %v", k, err)
		}
		blobs = append(blobs, imageBlobs(t, imgs[k])...)
	}
	// A region whose only node is stopped cannot be read: every blob must
	// be in every region before the restarts begin.
	g.waitPlaced(t, ctx, blobs)

	rec := &failures{}
	stop := loop(3, rec, func(ctx context.Context, w, k int) error {
		i := (w + k) % images
		return pullFrom(ctx, c.Transport(), gw.HTTPAddr(), fmt.Sprintf("rolling/app:v%d", i), imgs[i], noRetries...)
	})
	defer stop()
	waitMore(t, ctx, rec, 6, "before the restarts")
	for i := range 3 {
		c.Stop(i)
		waitMore(t, ctx, rec, 6, fmt.Sprintf("with node %d stopped", i))
		restarted := time.Now()
		if err := c.Restart(i); err != nil {
			t.Fatal(err)
		}
		if err := c.Node(i).WaitReady(ctx); err != nil {
			t.Fatal(err)
		}
		if err := c.WaitConverged(ctx); err != nil {
			t.Fatal(err)
		}
		waitFor(t, ctx, fmt.Sprintf("the gateway to use node %d again", i), func() bool {
			if !link.answeredSince(i, restarted) {
				return false
			}
			for _, n := range gw.Upstream().Nodes() {
				if n.ID == fmt.Sprintf("node-%d", i) {
					return n.Healthy && n.Known
				}
			}
			return false
		})
		waitMore(t, ctx, rec, 6, fmt.Sprintf("after node %d restarted", i))
		if _, failed := rec.counts(); failed > 0 {
			break
		}
	}
	stop()
	if _, failed := rec.counts(); failed > 0 {
		t.Fatalf("pulls through the gateway during rolling restarts: %s", rec)
	}
	t.Logf("pulls through the gateway during rolling restarts: %s", rec)
}

// TestGatewayUploadAcrossGateways: an upload session begun on one gateway
// continues on another, including after the first has shut down: gateways
// keep no session state.
func TestGatewayUploadAcrossGateways(t *testing.T) {
	g := newDirGeo(t, 3)
	c := g.c
	ctx := within(t, 2*time.Minute)
	ms := time.Millisecond
	a := startGateway(t, g, "gw-a", "us-east", newLatencyDialer(t, c, 0, 15*ms, 30*ms), nil)
	b := startGateway(t, g, "gw-b", "eu-west", newLatencyDialer(t, c, 30*ms, 0, 15*ms), nil)
	waitPreferred(t, ctx, a, "node-0", 3)
	waitPreferred(t, ctx, b, "node-1", 3)
	g.waitTopology(t, ctx)

	const chunks, chunkSize = 6, 256 << 10
	data := make([]byte, chunks*chunkSize)
	rand.Read(data)
	dgst := digest.FromBytes(data)
	client := &http.Client{Transport: c.Transport()}
	do := func(method, url string, body []byte, header map[string]string, want int) *http.Response {
		t.Helper()
		req, err := http.NewRequestWithContext(ctx, method, url, bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range header {
			req.Header.Set(k, v)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, url, err)
		}
		msg, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Fatalf("%s %s: status %d, want %d: %s", method, url, resp.StatusCode, want, msg)
		}
		return resp
	}

	hostA, hostB := "http://"+a.HTTPAddr(), "http://"+b.HTTPAddr()
	loc := do(http.MethodPost, hostA+"/v2/moving/app/blobs/uploads/", nil, nil, http.StatusAccepted).Header.Get("Location")
	aClosed := false
	for k := range chunks {
		host := hostB
		if k%2 == 0 && !aClosed {
			host = hostA
		}
		start, end := k*chunkSize, (k+1)*chunkSize
		resp := do(http.MethodPatch, host+loc, data[start:end], map[string]string{
			"Content-Type":  "application/octet-stream",
			"Content-Range": fmt.Sprintf("%d-%d", start, end-1),
		}, http.StatusAccepted)
		if got, want := resp.Header.Get("Range"), fmt.Sprintf("0-%d", end-1); got != want {
			t.Fatalf("chunk %d through %s: Range %q, want %q", k, host, got, want)
		}
		loc = resp.Header.Get("Location")
		if k == chunks/2-1 {
			cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			err := a.Close(cctx)
			cancel()
			if err != nil {
				t.Fatalf("close gateway A: %v", err)
			}
			aClosed = true
			if _, err := client.Get(hostA + "/v2/"); err == nil {
				t.Fatal("gateway A still answers after Close")
			}
		}
	}
	sep := "?"
	if strings.Contains(loc, "?") {
		sep = "&"
	}
	resp := do(http.MethodPut, hostB+loc+sep+"digest="+dgst.String(), nil, nil, http.StatusCreated)
	if got := resp.Header.Get("Docker-Content-Digest"); got != dgst.String() {
		t.Fatalf("PUT: Docker-Content-Digest %q, want %s", got, dgst)
	}
	for _, host := range []string{hostB, c.URL(1), c.URL(2)} {
		if err := getVerified(ctx, client, host+"/v2/moving/app/blobs/"+dgst.String(), "", dgst.String()); err != nil {
			t.Fatalf("blob uploaded across gateways: %v", err)
		}
	}

	// An image whose layer is that blob: the push finds it present and
	// uploads only the config and the manifest.
	img, err := mutate.AppendLayers(empty.Image, static.NewLayer(data, types.OCILayer))
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(gwRef(t, b, "moving/app:v1"), img, remoteOpts(ctx, c)...); err != nil {
		t.Fatalf("push through gateway B: %v", err)
	}
	if err := pullFrom(ctx, c.Transport(), b.HTTPAddr(), "moving/app:v1", img); err != nil {
		t.Fatal(err)
	}
	if err := pullAndCompare(ctx, c, 0, "moving/app:v1", img); err != nil {
		t.Fatal(err)
	}
}

// TestGatewayRefusesOtherTopology: a gateway configured with another region
// list than the cluster's does not start, and says why.
func TestGatewayRefusesOtherTopology(t *testing.T) {
	g := newDirGeo(t, 3)
	tests := []struct {
		name   string
		adjust func(r []gateway.RegionStore) []gateway.RegionStore
	}{
		{"extra region", func(r []gateway.RegionStore) []gateway.RegionStore {
			return append(r, gateway.RegionStore{Name: "sa-east", Store: "file://" + t.TempDir()})
		}},
		{"missing region", func(r []gateway.RegionStore) []gateway.RegionStore { return r[:2] }},
		{"other store", func(r []gateway.RegionStore) []gateway.RegionStore {
			r[1].Store = "file://" + t.TempDir()
			return r
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := gatewayConfig(t, g, "gw-"+strings.ReplaceAll(tt.name, " ", "-"), "us-east", nil)
			cfg.Regions = tt.adjust(cfg.Regions)
			gw, err := gateway.NewStandalone(cfg)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			err = gw.Start(ctx)
			if err == nil {
				gw.Close(context.Background())
				t.Fatal("a gateway with another region list started")
			}
			if !errors.Is(err, membership.ErrClusterMismatch) || !strings.Contains(err.Error(), "region list") {
				t.Fatalf("Start: %v; want a cluster mismatch naming the region list", err)
			}
			// Start cleaned up after itself; Close stays safe to call.
			if err := gw.Close(context.Background()); err != nil {
				t.Fatalf("Close after a failed Start: %v", err)
			}
		})
	}
}

// TestGatewayNodeBackAfterPartition: while a gateway cannot reach its
// nearest node (which gossip still lists as alive), reads go on through the
// others; once the network heals, the node is back in rotation within
// seconds, however long the partition lasted. The gateway retries a node it
// cannot connect to with gRPC's backoff, so the backoff must stay short: a
// node whose partition healed is otherwise left out for up to two minutes.
func TestGatewayNodeBackAfterPartition(t *testing.T) {
	g := newDirGeo(t, 3)
	c := g.c
	ctx := within(t, 2*time.Minute)
	ms := time.Millisecond
	link := newLatencyDialer(t, c, 0, 15*ms, 30*ms)
	gw := startGateway(t, g, "gw-cut", "us-east", link, nil)
	waitPreferred(t, ctx, gw, "node-0", 3)
	g.waitTopology(t, ctx)

	img := randomImage(t, 64<<10, 2)
	if err := remote.Write(gwRef(t, gw, "cut/app:v1"), img, remoteOpts(ctx, c)...); err != nil {
		t.Fatalf("push through the gateway: %v", err)
	}
	// us-east is reached only through node 0: while it is cut off, every
	// blob must be readable from another region.
	g.waitPlaced(t, ctx, imageBlobs(t, img))
	rec := &failures{}
	stop := loop(2, rec, func(ctx context.Context, _, _ int) error {
		return pullFrom(ctx, c.Transport(), gw.HTTPAddr(), "cut/app:v1", img, noRetries...)
	})
	defer stop()
	waitMore(t, ctx, rec, 5, "before the partition")

	cutAt := time.Now()
	link.cut(0)
	waitFor(t, ctx, "the gateway to move to node 1", func() bool {
		nodes := gw.Upstream().Nodes()
		return len(nodes) == 3 && nodes[0].ID == "node-1" && nodes[2].ID == "node-0" && !nodes[2].Healthy
	})
	waitMore(t, ctx, rec, 5, "while node 0 is cut off")
	if _, failed := rec.counts(); failed > 0 {
		t.Fatalf("pulls while the gateway's nearest node is cut off: %s", rec)
	}
	// Heal just after a connection attempt at least 30 s into the
	// partition, so the next attempt comes one whole backoff step later.
	waitFor(t, ctx, "a connection attempt 30s into the partition", func() bool {
		return len(link.dialsSince(0, cutAt.Add(30*time.Second))) > 0
	})
	link.heal(0)
	healed := time.Now()
	var gaps []string
	prev := cutAt
	for _, at := range link.dialsSince(0, cutAt) {
		gaps = append(gaps, at.Sub(prev).Round(100*ms).String())
		prev = at
	}
	back, cancel := context.WithTimeout(ctx, 12*time.Second)
	defer cancel()
	for !preferred(gw, "node-0", 3) {
		select {
		case <-back.Done():
			t.Fatalf("node 0 not back in rotation %v after the partition healed (%v long): %s; connection attempts during the partition, as gaps from the cut and between them: %v",
				time.Since(healed).Round(100*ms), healed.Sub(cutAt).Round(100*ms), nodeIDs(gw), gaps)
		case <-time.After(20 * ms):
		}
	}
	t.Logf("node 0 back %v after a %v partition (attempt gaps %v)", time.Since(healed).Round(100*ms), healed.Sub(cutAt).Round(100*ms), gaps)
	waitMore(t, ctx, rec, 5, "after the partition healed")
	stop()
	if _, failed := rec.counts(); failed > 0 {
		t.Fatalf("pulls through a partition between the gateway and its nearest node: %s", rec)
	}
}
