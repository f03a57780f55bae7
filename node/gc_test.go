package node_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/opencontainers/go-digest"
	"google.golang.org/protobuf/proto"

	"github.com/meridian-registry/meridian/node"
	"github.com/meridian-registry/meridian/node/clustertest"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
	"github.com/meridian-registry/meridian/replication"
)

// runGC runs a collection with no grace through node i and fails the test
// on an error.
func runGC(t *testing.T, ctx context.Context, adm pb.AdminClient, dry bool) *pb.RunGCResponse {
	t.Helper()
	resp, err := adm.RunGC(ctx, &pb.RunGCRequest{DryRun: dry, GraceNanos: proto.Int64(0)})
	if err == nil {
		err = resp.Result.Err()
	}
	if err != nil {
		t.Fatalf("RunGC(dry=%v): %v", dry, err)
	}
	return resp
}

// TestGeoGCFreesEveryRegion deletes an image in a three-region cluster
// (two real S3 servers and a directory) and checks that garbage collection
// removes its bytes from every region's store, keeps the blob another
// image shares, and lets the same image be pushed again afterwards.
func TestGeoGCFreesEveryRegion(t *testing.T) {
	g := newGeo(t, nil, nil)
	ctx := within(t, 3*time.Minute)
	doomed, err := random.Image(2048, 2)
	if err != nil {
		t.Fatal(err)
	}
	kept := pushImages(t, ctx, g.c, 1, "geo/kept", 1)[0]
	// The kept image shares its config with nothing, but mounting one of
	// its layers into the doomed repository must not free it.
	if err := remote.Write(ref(t, g.c, 0, "geo/doomed:v1"), doomed, remoteOpts(ctx, g.c)...); err != nil {
		t.Fatal(err)
	}
	g.waitReplicated(t, ctx, 0)
	doomedBlobs, keptBlobs := imageBlobs(t, doomed), imageBlobs(t, kept)
	for _, region := range []string{"us-east", "eu-west", "ap-south"} {
		for _, d := range doomedBlobs {
			if err := verifyStored(g.store(t, region), d); err != nil {
				t.Fatalf("before gc, %s in %s: %v", d, region, err)
			}
		}
	}

	// A layer the manifest still references cannot be deleted.
	layerURL := fmt.Sprintf("%s/v2/geo/doomed/blobs/%s", g.c.URL(2), doomedBlobs[1])
	if code, body := httpDo(t, g.c, http.MethodDelete, layerURL); code != http.StatusForbidden || !strings.Contains(body, "DENIED") {
		t.Fatalf("DELETE of a referenced layer = %d %s; want 403 DENIED", code, body)
	}
	dgst, err := doomed.Digest()
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Delete(ref(t, g.c, 2, "geo/doomed@"+dgst.String()), remoteOpts(ctx, g.c)...); err != nil {
		t.Fatal(err)
	}

	adm := adminClient(t, g.c, 3) // a follower in us-east: a real run is forwarded
	dry := runGC(t, ctx, adm, true)
	condemned := map[string]bool{}
	for _, b := range dry.Blobs {
		if b.Condemned {
			condemned[b.Digest] = true
		}
	}
	for _, d := range doomedBlobs {
		if !condemned[d.String()] {
			t.Fatalf("dry run does not condemn %s: %v", d, dry.Blobs)
		}
	}
	for _, d := range keptBlobs {
		if condemned[d.String()] {
			t.Fatalf("dry run condemns %s of the kept image", d)
		}
	}
	// A dry run changes nothing.
	for _, d := range doomedBlobs {
		if err := verifyStored(g.store(t, "eu-west"), d); err != nil {
			t.Fatalf("after the dry run, %s: %v", d, err)
		}
	}

	run := runGC(t, ctx, adm, false)
	if run.Run.GetBlobsCondemned() != int64(len(doomedBlobs)) {
		t.Fatalf("run condemned %d blobs; want %d (%+v)", run.Run.GetBlobsCondemned(), len(doomedBlobs), run.Run)
	}
	waitFor(t, ctx, "every region to remove the condemned blobs", func() bool {
		st, err := adm.GCStatus(ctx, &pb.GCStatusRequest{})
		if err != nil {
			return false
		}
		for _, r := range st.Regions {
			if r.BlobsPending != 0 || r.BlobsFreed < int64(len(doomedBlobs)) {
				return false
			}
		}
		return len(st.Regions) == 3
	})
	for _, region := range []string{"us-east", "eu-west", "ap-south"} {
		for _, d := range doomedBlobs {
			if _, err := g.store(t, region).Stat(ctx, d); !errors.Is(err, replication.ErrBlobNotFound) {
				t.Fatalf("after gc, %s in %s: %v; want gone", d, region, err)
			}
		}
		for _, d := range keptBlobs {
			if err := verifyStored(g.store(t, region), d); err != nil {
				t.Fatalf("after gc, kept %s in %s: %v", d, region, err)
			}
		}
	}
	mustPullFull(t, ctx, g.c, 1, "geo/kept:v0", kept)

	// The same bytes push again from scratch and replicate everywhere.
	if err := remote.Write(ref(t, g.c, 1, "geo/doomed:v2"), doomed, remoteOpts(ctx, g.c)...); err != nil {
		t.Fatalf("pushing a collected image again: %v", err)
	}
	g.waitReplicated(t, ctx, 0)
	for _, d := range doomedBlobs {
		if err := verifyStored(g.store(t, "ap-south"), d); err != nil {
			t.Fatalf("re-pushed %s in ap-south: %v", d, err)
		}
	}
	mustPullFull(t, ctx, g.c, 2, "geo/doomed:v2", doomed)
}

// TestGCRacingPushesLoseNothing pushes images through every node while the
// leader collects garbage with no grace period, over and over. A push may
// be refused (its layers collected before its manifest came), but every
// manifest the registry acknowledged must stay fully pullable: no run may
// take a blob that a concurrent push linked.
func TestGCRacingPushesLoseNothing(t *testing.T) {
	c := clustertest.New(t, 3, clustertest.WithConfig(func(i int, cfg *node.Config) { cfg.GC.Interval = 0 }))
	ctx := within(t, 3*time.Minute)
	leader, err := c.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	adm := adminClient(t, c, leader)

	var (
		mu    sync.Mutex
		acked = map[string]v1.Image{}
	)
	var refused atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := 0; ; k++ {
				select {
				case <-stop:
					return
				default:
				}
				img, err := random.Image(512, 2)
				if err != nil {
					t.Error(err)
					return
				}
				// Workers share one repository, so links and collection of
				// the same repository interleave.
				tag := fmt.Sprintf("race/app:w%d-%d", w, k)
				err = remote.Write(ref(t, c, w%3, tag), img, remoteOpts(ctx, c)...)
				var terr *transport.Error
				switch {
				case err == nil:
					mu.Lock()
					acked[tag] = img
					mu.Unlock()
				case errors.As(err, &terr):
					refused.Add(1) // MANIFEST_BLOB_UNKNOWN or a 503: refused, never acknowledged
				default:
					t.Errorf("push %s: %v", tag, err)
					return
				}
				// Half the images are deleted again, so runs have work.
				if err == nil && k%2 == 0 {
					d, _ := img.Digest()
					if err := remote.Delete(ref(t, c, (w+1)%3, "race/app@"+d.String()), remoteOpts(ctx, c)...); err != nil {
						t.Errorf("delete %s: %v", tag, err)
						return
					}
					mu.Lock()
					delete(acked, tag)
					mu.Unlock()
				}
			}
		}()
	}
	runs := 0
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		runGC(t, ctx, adm, false)
		runs++
	}
	close(stop)
	wg.Wait()
	// One more run after the pushes: whatever is left unreferenced goes,
	// and the acknowledged images must survive it too.
	runGC(t, ctx, adm, false)
	st, err := adm.GCStatus(ctx, &pb.GCStatusRequest{})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, "removals to finish", func() bool {
		st, err = adm.GCStatus(ctx, &pb.GCStatusRequest{})
		return err == nil && st.Regions[0].BlobsPending == 0
	})
	mu.Lock()
	defer mu.Unlock()
	if len(acked) < 10 || st.Regions[0].BlobsFreed == 0 {
		t.Fatalf("too little happened to prove anything: %d acknowledged images kept, %d blobs freed", len(acked), st.Regions[0].BlobsFreed)
	}
	for tag, img := range acked {
		mustPullFull(t, ctx, c, 0, tag, img)
	}
	t.Logf("%d gc runs, %d images kept and verified, %d pushes refused, %d blobs freed", runs, len(acked), refused.Load(), st.Regions[0].BlobsFreed)
}

// httpDo sends an empty request with the harness's admin credentials and
// returns the status and body.
func httpDo(t *testing.T, c *clustertest.Cluster, method, url string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := resp.Body.Read(buf)
		b.Write(buf[:n])
		if err != nil {
			break
		}
	}
	return resp.StatusCode, b.String()
}

// mustPullFull pulls s through node i and checks the manifest, every
// layer's bytes and the config's bytes against want.
func mustPullFull(t *testing.T, ctx context.Context, c *clustertest.Cluster, i int, s string, want v1.Image) {
	t.Helper()
	if err := pullAndCompare(ctx, c, i, s, want); err != nil {
		t.Fatal(err)
	}
	cfg, err := want.ConfigName()
	if err != nil {
		t.Fatal(err)
	}
	repo := strings.SplitN(s, ":", 2)[0]
	if code, body := httpDo(t, c, http.MethodGet, fmt.Sprintf("%s/v2/%s/blobs/%s", c.URL(i), repo, cfg)); code != http.StatusOK {
		t.Fatalf("config of %s: %d %s", s, code, body)
	} else if digest.FromString(body).String() != cfg.String() {
		t.Fatalf("config of %s: bytes do not match %s", s, cfg)
	}
}
