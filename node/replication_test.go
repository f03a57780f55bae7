package node_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/opencontainers/go-digest"

	"github.com/meridian-registry/meridian/node"
	"github.com/meridian-registry/meridian/node/clustertest"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
	"github.com/meridian-registry/meridian/replication"
	"github.com/meridian-registry/meridian/replication/s3test"
)

// geo is a three-region cluster: us-east and eu-west each on their own real
// S3 server (versitygw), ap-south on a directory. Node 0 and node 3 are in
// us-east, node 1 in eu-west, node 2 in ap-south; the voters are spread one
// per region, so losing us-east keeps a quorum.
type geo struct {
	c        *clustertest.Cluster
	s3       map[string]*s3test.Server
	regions  []node.RegionConfig
	regionOf []string
}

var geoRegions = []string{"us-east", "eu-west", "ap-south", "us-east"}

// newGeo starts the cluster; storeURL may rewrite a region's store URL (to
// put a fault proxy in front of it) and tweak each node's configuration.
func newGeo(t *testing.T, storeURL func(region, url string) string, tweak func(i int, c *node.Config)) *geo {
	t.Helper()
	g := &geo{s3: map[string]*s3test.Server{}, regionOf: geoRegions}
	for _, r := range []string{"us-east", "eu-west"} {
		s := s3test.Start(t)
		s.CreateBucket(t, r)
		g.s3[r] = s
	}
	urls := map[string]string{
		"us-east":  g.s3["us-east"].URL("us-east"),
		"eu-west":  g.s3["eu-west"].URL("eu-west"),
		"ap-south": "file://" + t.TempDir(),
	}
	for _, r := range []string{"us-east", "eu-west", "ap-south"} {
		u := urls[r]
		if storeURL != nil {
			u = storeURL(r, u)
		}
		g.regions = append(g.regions, node.RegionConfig{Name: r, Store: u})
	}
	g.c = clustertest.New(t, 4, clustertest.WithConfig(func(i int, c *node.Config) {
		c.BlobDir = ""
		c.Regions = g.regions
		c.Region = g.regionOf[i]
		c.Replication.SyncTimeout = 20 * time.Second
		if tweak != nil {
			tweak(i, c)
		}
	}))
	ctx := within(t, 2*time.Minute)
	waitFor(t, ctx, "voters spread over the three regions", func() bool {
		l, err := g.c.Leader(ctx)
		if err != nil {
			return false
		}
		servers, err := g.c.Node(l).Consensus().Servers()
		if err != nil {
			return false
		}
		var regions []string
		for _, s := range servers {
			if s.Voter {
				var idx int
				fmt.Sscanf(s.ID, "node-%d", &idx)
				regions = append(regions, g.regionOf[idx])
			}
		}
		slices.Sort(regions)
		return slices.Equal(regions, []string{"ap-south", "eu-west", "us-east"})
	})
	return g
}

// store opens region's store directly, as a test would inspect a bucket.
func (g *geo) store(t *testing.T, region string) replication.Driver {
	t.Helper()
	for _, r := range g.regions {
		if r.Name == region {
			d, err := replication.OpenStore(context.Background(), replication.StoreConfig{Region: r.Name, URL: r.Store})
			if err != nil {
				t.Fatal(err)
			}
			return d
		}
	}
	t.Fatalf("no region %s", region)
	return nil
}

// waitReplicated waits until no region misses a blob, as node i sees it.
func (g *geo) waitReplicated(t *testing.T, ctx context.Context, i int) {
	t.Helper()
	waitFor(t, ctx, "replication to catch up", func() bool {
		for _, r := range []string{"us-east", "eu-west", "ap-south"} {
			lag, err := g.c.Node(i).Consensus().Store().RegionLag(ctx, r)
			if err != nil || lag.Blobs != 0 {
				return false
			}
		}
		return true
	})
}

// imageBlobs lists the config and layer digests of img.
func imageBlobs(t *testing.T, img v1.Image) []digest.Digest {
	t.Helper()
	cfg, err := img.ConfigName()
	if err != nil {
		t.Fatal(err)
	}
	out := []digest.Digest{digest.Digest(cfg.String())}
	layers, _ := img.Layers()
	for _, l := range layers {
		d, _ := l.Digest()
		out = append(out, digest.Digest(d.String()))
	}
	return out
}

// verifyStored reads dgst from d and checks its bytes hash to it.
func verifyStored(d replication.Driver, dgst digest.Digest) error {
	rc, err := d.Open(context.Background(), dgst, 0)
	if err != nil {
		return err
	}
	defer rc.Close()
	v := dgst.Verifier()
	if _, err := io.Copy(v, rc); err != nil {
		return err
	}
	if !v.Verified() {
		return fmt.Errorf("%s: stored bytes do not match the digest", dgst)
	}
	return nil
}

// pushImages pushes n random images through node via, 8 at a time.
func pushImages(t *testing.T, ctx context.Context, c *clustertest.Cluster, via int, repo string, n int) []v1.Image {
	t.Helper()
	imgs := make([]v1.Image, n)
	errs := make([]error, n)
	sem := make(chan struct{}, 8)
	var wg sync.WaitGroup
	for k := range n {
		imgs[k] = randomImage(t, 3000+int64(k), 2)
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			errs[k] = remote.Write(ref(t, c, via, fmt.Sprintf("%s:v%d", repo, k)), imgs[k], remoteOpts(ctx, c)...)
		}()
	}
	wg.Wait()
	for k, err := range errs {
		if err != nil {
			t.Fatalf("push image %d through node %d: %v", k, via, err)
		}
	}
	return imgs
}

// metric reads one sample from node i's /metrics (0 when absent).
func metric(t *testing.T, c *clustertest.Cluster, i int, series string) float64 {
	t.Helper()
	resp, err := c.Client().Get(c.URL(i) + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			var f float64
			fmt.Sscan(v, &f)
			return f
		}
	}
	return 0
}

// TestGeoReplication pushes 50 images in us-east, checks that every blob
// becomes present and verified in eu-west's bucket and ap-south's directory,
// that pulls through eu-west are served from eu-west's own store, and then
// that losing the whole of us-east (its nodes and its S3 server) loses no
// image and does not stop pushes.
func TestGeoReplication(t *testing.T) {
	g := newGeo(t, nil, nil)
	c := g.c
	ctx := within(t, 4*time.Minute)
	imgs := pushImages(t, ctx, c, 0, "geo/app", 50)
	g.waitReplicated(t, ctx, 1)

	var blobs []digest.Digest
	for _, img := range imgs {
		blobs = append(blobs, imageBlobs(t, img)...)
	}
	for _, region := range []string{"eu-west", "ap-south"} {
		d := g.store(t, region)
		for _, b := range blobs {
			if err := verifyStored(d, b); err != nil {
				t.Fatalf("region %s: %v", region, err)
			}
		}
		rec, err := c.Node(2).Consensus().Store().Blob(ctx, blobs[0].String())
		if err != nil || !slices.Contains(rec.Regions, region) {
			t.Fatalf("placement of %s: %v, %v; want it to list %s", blobs[0], rec.GetRegions(), err, region)
		}
	}

	// Pulls through eu-west's node read eu-west's store, not us-east's.
	euBefore := metric(t, c, 1, `meridian_gateway_blob_reads_total{how="stream",region="eu-west"}`)
	usBefore := metric(t, c, 1, `meridian_gateway_blob_reads_total{how="stream",region="us-east"}`)
	for k, img := range imgs {
		if err := pullAndCompare(ctx, c, 1, fmt.Sprintf("geo/app:v%d", k), img); err != nil {
			t.Fatal(err)
		}
	}
	eu := metric(t, c, 1, `meridian_gateway_blob_reads_total{how="stream",region="eu-west"}`) - euBefore
	us := metric(t, c, 1, `meridian_gateway_blob_reads_total{how="stream",region="us-east"}`) - usBefore
	if eu < float64(len(imgs)*2) || us != 0 {
		t.Fatalf("pulls through eu-west: %v blob reads from eu-west, %v from us-east; want every layer from eu-west", eu, us)
	}

	// Lose us-east: both of its nodes and its object store.
	c.Stop(0)
	c.Stop(3)
	g.s3["us-east"].Stop()
	for _, via := range []int{1, 2} {
		for k, img := range imgs {
			if err := pullAndCompare(ctx, c, via, fmt.Sprintf("geo/app:v%d", k), img); err != nil {
				t.Fatalf("after losing us-east, through node %d: %v", via, err)
			}
		}
	}
	// Pushes continue: through eu-west, pulled back through ap-south.
	img := randomImage(t, 5000, 2)
	waitFor(t, ctx, "a push after losing us-east", func() bool {
		return remote.Write(ref(t, c, 1, "geo/after:v1"), img, remoteOpts(ctx, c)...) == nil
	})
	if err := pullAndCompare(ctx, c, 2, "geo/after:v1", img); err != nil {
		t.Fatal(err)
	}
}

// TestGeoMinRegions: with min_regions 2, a blob PUT answers 201 only once a
// second region holds the blob, so losing the first region right after the
// push loses nothing.
func TestGeoMinRegions(t *testing.T) {
	g := newGeo(t, nil, func(i int, c *node.Config) {
		c.Replication.Policies = []node.PolicyConfig{{Prefix: "prod/", MinRegions: 2}}
	})
	c := g.c
	ctx := within(t, 3*time.Minute)
	waitFor(t, ctx, "the seeded policy", func() bool {
		p, err := c.Node(0).Consensus().Store().Policy(ctx, "prod/app")
		return err == nil && p.MinRegions == 2
	})
	img := randomImage(t, 8000, 3)
	if err := remote.Write(ref(t, c, 0, "prod/app:v1"), img, remoteOpts(ctx, c)...); err != nil {
		t.Fatal(err)
	}
	for _, b := range imageBlobs(t, img) {
		rec, err := c.Node(0).Consensus().Store().Blob(ctx, b.String())
		if err != nil || len(rec.Regions) < 2 {
			t.Fatalf("blob %s acknowledged in %v (%v); want at least 2 regions", b, rec.GetRegions(), err)
		}
	}
	c.Stop(0)
	c.Stop(3)
	g.s3["us-east"].Stop()
	for _, via := range []int{1, 2} {
		if err := pullAndCompare(ctx, c, via, "prod/app:v1", img); err != nil {
			t.Fatalf("after losing us-east, through node %d: %v", via, err)
		}
	}
}

// TestGeoSyncTimeout: when no second region can take a copy in time, the
// blob PUT answers 503 with Retry-After, the blob stays committed, and the
// same PUT answers 201 once the copy exists.
func TestGeoSyncTimeout(t *testing.T) {
	g := newGeo(t, nil, func(i int, c *node.Config) {
		c.Replication.SyncTimeout = 2 * time.Second
	})
	c := g.c
	ctx := within(t, 3*time.Minute)
	adm := adminClient(t, c, 0)
	// Only eu-west besides us-east, whose store we now stop: copies cannot
	// be made until it is back.
	resp, err := adm.SetPolicy(ctx, &pb.SetPolicyRequest{Policy: &pb.Policy{Prefix: "sync/", Regions: []string{"us-east", "eu-west"}, MinRegions: 2}})
	if err != nil || resp.Result.Err() != nil {
		t.Fatalf("set policy: %v %v", err, resp.GetResult())
	}
	g.s3["eu-west"].Stop()

	content := []byte("a blob that must be in two regions")
	dgst := digest.FromBytes(content)
	client := c.Client()
	post, err := client.Post(c.URL(0)+"/v2/sync/app/blobs/uploads/", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	post.Body.Close()
	loc := post.Header.Get("Location")
	put := func() *http.Response {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPut, c.URL(0)+loc+map[bool]string{true: "&", false: "?"}[strings.Contains(loc, "?")]+"digest="+dgst.String(), strings.NewReader(string(content)))
		r, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, r.Body)
		r.Body.Close()
		return r
	}
	r := put()
	if r.StatusCode != http.StatusServiceUnavailable || r.Header.Get("Retry-After") == "" {
		pol, perr := c.Node(0).Consensus().Store().Policy(ctx, "sync/app")
		rec, berr := c.Node(0).Consensus().Store().Blob(ctx, dgst.String())
		t.Fatalf("PUT with eu-west down: %d, Retry-After %q; want 503 with Retry-After (node 0 sees policy %+v %v, blob %v %v)",
			r.StatusCode, r.Header.Get("Retry-After"), pol, perr, rec, berr)
	}
	rec, err := c.Node(0).Consensus().Store().Blob(ctx, dgst.String())
	if err != nil || !slices.Equal(rec.Regions, []string{"us-east"}) {
		t.Fatalf("after the 503 the blob is placed in %v (%v); want [us-east]", rec.GetRegions(), err)
	}
	// Once eu-west is back the replicator's next attempt copies the blob;
	// the same PUT then answers 201.
	g.s3["eu-west"].Restart()
	waitFor(t, ctx, "the retried PUT to answer 201", func() bool {
		r := put()
		if r.StatusCode != http.StatusCreated && r.StatusCode != http.StatusServiceUnavailable {
			t.Fatalf("PUT retried after eu-west came back: %d, want 201 (or 503 while the copy is pending)", r.StatusCode)
		}
		return r.StatusCode == http.StatusCreated
	})
}

// TestGeoStoreFailure: a region's store that answers errors slows its
// replication but loses nothing, and the backlog drains once it recovers.
func TestGeoStoreFailure(t *testing.T) {
	var proxy *s3test.FaultProxy
	var proxyMu sync.Mutex
	g := newGeo(t, func(region, url string) string {
		if region != "eu-west" {
			return url
		}
		// Point eu-west at a fault proxy in front of its server.
		proxyMu.Lock()
		defer proxyMu.Unlock()
		host := strings.SplitN(strings.SplitN(url, "@", 2)[1], "/", 2)[0]
		proxy = s3test.NewFaultProxy(t, host)
		return strings.Replace(url, host, proxy.Addr(), 1)
	}, nil)
	c := g.c
	ctx := within(t, 4*time.Minute)
	proxy.SetMode(s3test.Fail)
	imgs := pushImages(t, ctx, c, 0, "flaky/app", 10)
	waitFor(t, ctx, "copies into eu-west to fail", func() bool {
		return metric(t, c, 1, `meridian_replication_copies_total{region="eu-west",result="failed"}`) > 0
	})
	lag, err := c.Node(1).Consensus().Store().RegionLag(ctx, "eu-west")
	if err != nil || lag.Blobs == 0 {
		t.Fatalf("eu-west lag while its store fails: %+v, %v; want a backlog", lag, err)
	}
	// Pulls through eu-west still work, from the other regions.
	for k, img := range imgs {
		if err := pullAndCompare(ctx, c, 1, fmt.Sprintf("flaky/app:v%d", k), img); err != nil {
			t.Fatal(err)
		}
	}
	proxy.SetMode(s3test.Pass)
	g.waitReplicated(t, ctx, 1)
	d := g.store(t, "eu-west")
	for _, img := range imgs {
		for _, b := range imageBlobs(t, img) {
			if err := verifyStored(d, b); err != nil {
				t.Fatal(err)
			}
		}
	}
}
