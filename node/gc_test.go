package node_test

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/minio/minio-go/v7"
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

// storedBytes counts, by listing the store itself, a region's committed
// blob bytes and blobs. An S3 region keeps a blob's bytes in a data/
// object and a small link under blobs/ (replication/s3.go): the bytes are
// the data objects', the blobs the links, and every data object must have
// its link. A directory region keeps files under blobs/.
func (g *geo) storedBytes(t *testing.T, ctx context.Context, region string) (bytes, objects int64) {
	t.Helper()
	if s, ok := g.s3[region]; ok {
		var data int64
		for o := range s.Client(t).ListObjects(ctx, region, minio.ListObjectsOptions{Recursive: true}) {
			if o.Err != nil {
				t.Fatalf("list %s: %v", region, o.Err)
			}
			switch {
			case strings.HasPrefix(o.Key, "data/"):
				bytes += o.Size
				data++
			case strings.HasPrefix(o.Key, "blobs/"):
				objects++
			}
		}
		if data != objects {
			t.Fatalf("%s holds %d data objects for %d blob links", region, data, objects)
		}
		return bytes, objects
	}
	for _, r := range g.regions {
		if r.Name != region {
			continue
		}
		root := filepath.Join(strings.TrimPrefix(r.Store, "file://"), "blobs")
		err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return err
			}
			info, err := d.Info()
			if err != nil {
				return err
			}
			bytes += info.Size()
			objects++
			return nil
		})
		if err != nil {
			t.Fatalf("walk %s: %v", region, err)
		}
		return bytes, objects
	}
	t.Fatalf("no region %s", region)
	return 0, 0
}

// TestGeoGCFreesEveryRegion pushes 50 images into a three-region cluster
// (two real S3 servers and a directory), deletes half, and runs garbage
// collection through a follower. Every bucket and directory, counted by
// listing it, loses exactly the bytes of the deleted images; the rest pull
// back byte for byte through a node of every region; a referenced layer
// cannot be deleted; and a collected image can be pushed again.
func TestGeoGCFreesEveryRegion(t *testing.T) {
	g := newGeo(t, nil, func(i int, c *node.Config) { c.GC.Interval = 0 })
	ctx := within(t, 4*time.Minute)
	regions := []string{"us-east", "eu-west", "ap-south"}
	imgs := pushImages(t, ctx, g.c, 1, "geo/app", 50)
	g.waitReplicated(t, ctx, 0)
	type usage struct{ bytes, objects int64 }
	before := map[string]usage{}
	for _, r := range regions {
		b, o := g.storedBytes(t, ctx, r)
		before[r] = usage{b, o}
	}

	// A layer the manifest still references cannot be deleted.
	layerURL := fmt.Sprintf("%s/v2/geo/app/blobs/%s", g.c.URL(2), imageBlobs(t, imgs[0])[1])
	if code, body := httpDo(t, g.c, http.MethodDelete, layerURL); code != http.StatusForbidden || !strings.Contains(body, "DENIED") {
		t.Fatalf("DELETE of a referenced layer = %d %s; want 403 DENIED", code, body)
	}
	var freedBytes, freedBlobs int64
	doomed := map[string]bool{}
	for k := 0; k < len(imgs); k += 2 {
		dgst, err := imgs[k].Digest()
		if err != nil {
			t.Fatal(err)
		}
		if err := remote.Delete(ref(t, g.c, k%3, "geo/app@"+dgst.String()), remoteOpts(ctx, g.c)...); err != nil {
			t.Fatal(err)
		}
		for _, d := range imageBlobs(t, imgs[k]) {
			doomed[d.String()] = true
			size, err := g.store(t, "us-east").Stat(ctx, d)
			if err != nil {
				t.Fatal(err)
			}
			freedBytes += size
			freedBlobs++
		}
	}

	adm := adminClient(t, g.c, 3) // a follower in us-east: the run is forwarded
	dry := runGC(t, ctx, adm, true)
	var planned int64
	for _, b := range dry.Blobs {
		if !b.Condemned || !doomed[b.Digest] {
			t.Fatalf("dry run plans %+v; want only the deleted images' blobs, condemned", b)
		}
		planned += b.Size
	}
	if planned != freedBytes {
		t.Fatalf("dry run would free %d bytes; the deleted images hold %d", planned, freedBytes)
	}
	if b, _ := g.storedBytes(t, ctx, "eu-west"); b != before["eu-west"].bytes {
		t.Fatalf("the dry run changed eu-west: %d bytes, was %d", b, before["eu-west"].bytes)
	}

	run := runGC(t, ctx, adm, false)
	if run.Run.GetBlobsCondemned() != freedBlobs || run.Run.GetBytesCondemned() != freedBytes {
		t.Fatalf("run condemned %d blobs, %d bytes; want %d, %d", run.Run.GetBlobsCondemned(), run.Run.GetBytesCondemned(), freedBlobs, freedBytes)
	}
	waitFor(t, ctx, "every region to remove the condemned blobs", func() bool {
		st, err := adm.GCStatus(ctx, &pb.GCStatusRequest{})
		if err != nil || len(st.Regions) != 3 {
			return false
		}
		for _, r := range st.Regions {
			if r.BlobsPending != 0 || r.BytesFreed != freedBytes {
				return false
			}
		}
		return true
	})
	for _, r := range regions {
		b, o := g.storedBytes(t, ctx, r)
		if before[r].bytes-b != freedBytes || before[r].objects-o != freedBlobs {
			t.Fatalf("%s lost %d bytes in %d objects; the deleted images held %d bytes in %d blobs",
				r, before[r].bytes-b, before[r].objects-o, freedBytes, freedBlobs)
		}
	}
	// What stays pulls back byte for byte through every region, and its
	// bytes are in every region's store.
	for k := 1; k < len(imgs); k += 2 {
		for i := range 3 {
			mustPullFull(t, ctx, g.c, i, fmt.Sprintf("geo/app:v%d", k), imgs[k])
		}
		for _, r := range regions {
			for _, d := range imageBlobs(t, imgs[k]) {
				if err := verifyStored(g.store(t, r), d); err != nil {
					t.Fatalf("kept %s in %s: %v", d, r, err)
				}
			}
		}
	}

	// A collected image pushes again from scratch and replicates everywhere.
	if err := remote.Write(ref(t, g.c, 1, "geo/app:again"), imgs[0], remoteOpts(ctx, g.c)...); err != nil {
		t.Fatalf("pushing a collected image again: %v", err)
	}
	g.waitReplicated(t, ctx, 0)
	for _, d := range imageBlobs(t, imgs[0]) {
		if err := verifyStored(g.store(t, "ap-south"), d); err != nil {
			t.Fatalf("re-pushed %s in ap-south: %v", d, err)
		}
	}
	mustPullFull(t, ctx, g.c, 2, "geo/app:again", imgs[0])
}

// TestGCRacingPushesLoseNothing pushes images through the nodes of three
// regions while the leader collects garbage with no grace period, over and
// over. Images share layers from a small pool across repositories, and
// half of them are deleted again, so runs condemn layers that other pushes
// are linking or uploading again at the same moment. A push may be
// refused (its layers collected before its manifest came, or a re-upload
// of a layer still being removed), but every manifest the registry
// acknowledged must end up complete: each of its blobs verified in every
// region's store, and the image pulled back through every region.
func TestGCRacingPushesLoseNothing(t *testing.T) {
	g := newDirGeo(t, 3, clustertest.WithConfig(func(i int, cfg *node.Config) { cfg.GC.Interval = 0 }))
	c := g.c
	ctx := within(t, 5*time.Minute)
	g.waitTopology(t, ctx)
	leader, err := c.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	adm := adminClient(t, c, leader)
	var pool []v1.Layer
	for range 6 {
		l, err := random.Layer(2048, types.OCILayer)
		if err != nil {
			t.Fatal(err)
		}
		pool = append(pool, l)
	}

	var (
		mu    sync.Mutex
		acked = map[string]v1.Image{}
	)
	var refused, kept atomic.Int64 // kept: acknowledged and never deleted
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
				base, err := random.Image(256, 1)
				if err == nil {
					base, err = mutate.AppendLayers(base, pool[(w+k)%len(pool)], pool[(w*k+1)%len(pool)])
				}
				if err != nil {
					t.Error(err)
					return
				}
				tag := fmt.Sprintf("race/r%d:w%d-%d", k%3, w, k)
				err = remote.Write(ref(t, c, w%3, tag), base, remoteOpts(ctx, c)...)
				var terr *transport.Error
				switch {
				case err == nil:
					mu.Lock()
					acked[tag] = base
					mu.Unlock()
					if k%2 == 1 {
						kept.Add(1)
					}
				case errors.As(err, &terr):
					refused.Add(1) // refused, never acknowledged
					continue
				default:
					t.Errorf("push %s: %v", tag, err)
					return
				}
				if k%2 == 0 {
					d, _ := base.Digest()
					repo := strings.SplitN(tag, ":", 2)[0]
					if err := remote.Delete(ref(t, c, (w+1)%3, repo+"@"+d.String()), remoteOpts(ctx, c)...); err != nil {
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
	// A run that fails while leadership moves (a loaded machine misses
	// heartbeats) collects nothing and loses nothing: run again.
	collect := func() bool {
		resp, err := adm.RunGC(ctx, &pb.RunGCRequest{GraceNanos: proto.Int64(0)})
		if err == nil {
			err = resp.Result.Err()
		}
		if err != nil && !errors.Is(err, pb.ErrUnavailable) && !errors.Is(err, pb.ErrNotLeader) {
			t.Fatalf("RunGC: %v", err)
		}
		if err != nil {
			t.Logf("RunGC: %v; running again", err)
			time.Sleep(100 * time.Millisecond)
		}
		return err == nil
	}
	// Pushes race collections for 20 s, and longer (up to 2 min) until
	// enough acknowledged images are kept to prove something: on a loaded
	// machine pushes are slow, and with no grace most lose their layers to
	// a run before their manifest comes.
	runs := 0
	start := time.Now()
	for time.Since(start) < 20*time.Second || kept.Load() < 10 && time.Since(start) < 2*time.Minute {
		if collect() {
			runs++
		}
	}
	close(stop)
	wg.Wait()
	// One more run after the pushes: whatever is left unreferenced goes,
	// and the acknowledged images must survive it too.
	for !collect() {
	}
	var st *pb.GCStatusResponse
	waitFor(t, ctx, "removals to finish in every region", func() bool {
		st, err = adm.GCStatus(ctx, &pb.GCStatusRequest{})
		if err != nil {
			return false
		}
		for _, r := range st.Regions {
			if r.BlobsPending != 0 {
				return false
			}
		}
		return true
	})
	mu.Lock()
	defer mu.Unlock()
	var blobs []digest.Digest
	for _, img := range acked {
		blobs = append(blobs, imageBlobs(t, img)...)
	}
	if len(acked) < 10 || st.Regions[0].BlobsFreed == 0 {
		t.Fatalf("too little happened to prove anything: %d acknowledged images kept, %d blobs freed", len(acked), st.Regions[0].BlobsFreed)
	}
	g.waitPlaced(t, ctx, blobs)
	for _, r := range g.regions {
		d, err := replication.OpenStore(ctx, replication.StoreConfig{Region: r.Name, URL: r.Store})
		if err != nil {
			t.Fatal(err)
		}
		for tag, img := range acked {
			for _, b := range imageBlobs(t, img) {
				if err := verifyStored(d, b); err != nil {
					t.Errorf("blob %s of acknowledged image %s in %s: %v", b, tag, r.Name, err)
				}
			}
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	for tag, img := range acked {
		for i := range 3 {
			mustPullFull(t, ctx, c, i, tag, img)
		}
	}
	t.Logf("%d gc runs, %d images kept and verified in 3 regions, %d pushes refused, %d blobs freed per region",
		runs, len(acked), refused.Load(), st.Regions[0].BlobsFreed)
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
