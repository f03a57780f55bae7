package node_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/meridian-registry/meridian/node"
	"github.com/meridian-registry/meridian/node/clustertest"
	"github.com/meridian-registry/meridian/replication/s3test"
)

const (
	lagBlobs    = 100
	lagBlobSize = 10 << 20
	lagPushers  = 4
	lagRepo     = "bench/geo"
)

// BenchmarkReplicationLag measures how long a blob takes to reach every
// region after its push was acknowledged, on newGeo's three regions
// (us-east and eu-west on two versitygw servers, ap-south on a directory).
// Four clients push 100 random 10 MiB blobs through node 0 (us-east), each
// in one request (POST with ?digest=, the body streamed from a generator).
// lag-p50-ms and lag-p99-ms run from a push's 201 to the moment node 0
// applies the placement that completes the blob's three regions.
// repl-MB/s is the bytes copied into the two other regions (2 × 1000 MiB,
// in MB of 10^6 bytes) over the time from the first push to the last blob
// placed everywhere; push-MB/s is the bytes acknowledged over the time to
// the last acknowledgement.
//
// The benchmark runs its whole workload once, whatever b.N: run it with
// -benchtime 1x (a larger N changes nothing but the time it takes).
func BenchmarkReplicationLag(b *testing.B) {
	g := newBenchGeo(b)
	ctx, cancel := context.WithTimeout(b.Context(), 10*time.Minute)
	defer cancel()

	// Digests first, off the clock: the push needs each one up front, and
	// the generator replays the same bytes into the request body.
	digests := make([]digest.Digest, lagBlobs)
	var wg sync.WaitGroup
	for w := range 2 {
		wg.Go(func() {
			for k := w; k < lagBlobs; k += 2 {
				d, err := digest.SHA256.FromReader(newBlobStream(uint64(k), lagBlobSize))
				if err != nil {
					b.Error(err)
					return
				}
				digests[k] = d
			}
		})
	}
	wg.Wait()
	if b.Failed() {
		b.FailNow()
	}

	var (
		acked  = make([]time.Time, lagBlobs)
		placed = make([]time.Time, lagBlobs)
		next   atomic.Int64
		errs   = make(chan error, lagPushers)
	)
	watched := make(chan error, 1)
	b.ResetTimer()
	start := time.Now()
	go func() { watched <- watchPlaced(ctx, g, digests, placed) }()
	for range lagPushers {
		wg.Go(func() {
			for {
				k := int(next.Add(1)) - 1
				if k >= lagBlobs {
					return
				}
				if err := pushStreamedBlob(ctx, g.c, 0, lagRepo, digests[k], newBlobStream(uint64(k), lagBlobSize), lagBlobSize); err != nil {
					errs <- err
					cancel()
					return
				}
				acked[k] = time.Now()
			}
		})
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		b.Fatal(err)
	}
	if err := <-watched; err != nil {
		b.Fatal(err)
	}
	b.StopTimer()

	lags := make([]time.Duration, lagBlobs)
	for k := range lagBlobs {
		// The placement can only follow the acknowledgement (min_regions
		// is 1), but the two clocks are read by different goroutines.
		lags[k] = max(0, placed[k].Sub(acked[k]))
	}
	total := float64(lagBlobs * lagBlobSize)
	b.ReportMetric(2*total/1e6/slices.MaxFunc(placed, time.Time.Compare).Sub(start).Seconds(), "repl-MB/s")
	b.ReportMetric(total/1e6/slices.MaxFunc(acked, time.Time.Compare).Sub(start).Seconds(), "push-MB/s")
	reportPercentiles(b, lags, "lag-")
	// ns/op would only repeat the run's length, whatever b.N.
	b.ReportMetric(0, "ns/op")
}

// newBenchGeo builds newGeo's cluster for a benchmark (newGeo takes a
// *testing.T): the same regions, nodes and voter spread, with the nodes'
// logs silenced, since a benchmark's log is always printed and Raft logs
// the cluster's shutdown at ERROR. A copy that keeps failing still shows:
// its blob is never placed and the benchmark fails.
func newBenchGeo(b *testing.B) *geo {
	b.Helper()
	g := &geo{s3: map[string]*s3test.Server{}, regionOf: geoRegions}
	for _, r := range []string{"us-east", "eu-west"} {
		s := s3test.Start(b)
		s.CreateBucket(b, r)
		g.s3[r] = s
	}
	g.regions = []node.RegionConfig{
		{Name: "us-east", Store: g.s3["us-east"].URL("us-east")},
		{Name: "eu-west", Store: g.s3["eu-west"].URL("eu-west")},
		{Name: "ap-south", Store: "file://" + b.TempDir()},
	}
	g.c = clustertest.New(b, 4,
		clustertest.WithLogLevel(slog.LevelError+4),
		clustertest.WithConfig(func(i int, c *node.Config) {
			c.BlobDir = ""
			c.Regions = g.regions
			c.Region = g.regionOf[i]
			c.Replication.SyncTimeout = 20 * time.Second
		}))
	ctx, cancel := context.WithTimeout(b.Context(), 2*time.Minute)
	defer cancel()
	spread := pollUntil(ctx, func() bool {
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
			var idx int
			if _, err := fmt.Sscanf(s.ID, "node-%d", &idx); err == nil && s.Voter {
				regions = append(regions, g.regionOf[idx])
			}
		}
		slices.Sort(regions)
		return slices.Equal(regions, []string{"ap-south", "eu-west", "us-east"})
	})
	if !spread {
		b.Fatal("the voters never spread over the three regions")
	}
	return g
}

// watchPlaced sets placed[k] to when node 0 first sees digests[k] placed
// in all of g's regions, and returns once every blob is.
func watchPlaced(ctx context.Context, g *geo, digests []digest.Digest, placed []time.Time) error {
	cons := g.c.Node(0).Consensus()
	left := len(digests)
	for {
		// Take the channel before reading, so no apply goes unseen.
		changed := cons.Changed()
		for k, d := range digests {
			if !placed[k].IsZero() {
				continue
			}
			rec, err := cons.Store().Blob(ctx, d.String())
			if err != nil {
				continue // not committed yet
			}
			everywhere := true
			for _, r := range g.regions {
				everywhere = everywhere && slices.Contains(rec.Regions, r.Name)
			}
			if everywhere {
				placed[k] = time.Now()
				left--
			}
		}
		if left == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%d of %d blobs not placed in every region: %w", left, len(digests), ctx.Err())
		case <-changed:
		}
	}
}

// pushStreamedBlob uploads size bytes from body as blob dgst in one
// request (POST with ?digest=) through node i.
func pushStreamedBlob(ctx context.Context, c *clustertest.Cluster, i int, repo string, dgst digest.Digest, body io.Reader, size int64) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.URL(i)+"/v2/"+repo+"/blobs/uploads/?digest="+dgst.String(), body)
	if err != nil {
		return err
	}
	req.ContentLength = size
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err := c.Client().Do(req)
	if err != nil {
		return fmt.Errorf("push %s through node %d: %w", dgst, i, err)
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 300))
	if resp.StatusCode != http.StatusCreated {
		return fmt.Errorf("push %s through node %d: status %d: %s", dgst, i, resp.StatusCode, msg)
	}
	return nil
}

// newBlobStream yields n pseudo-random bytes determined by seed, so a blob
// can be hashed and then sent without ever being held in memory.
// (ChaCha8 keeps its unread bytes between reads: the stream is the same
// however it is cut into reads.)
func newBlobStream(seed uint64, n int64) io.Reader {
	var s [32]byte
	for i := range 8 {
		s[i] = byte(seed >> (8 * i))
	}
	return io.LimitReader(rand.NewChaCha8(s), n)
}
