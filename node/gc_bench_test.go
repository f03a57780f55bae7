package node_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"

	"github.com/meridian-registry/meridian/node/clustertest/admin"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// BenchmarkPushWithGC measures image pushes (a config, a fresh 64 KiB
// layer and a manifest by tag, through the nodes in turn, 8 pushers) on a
// three-node cluster while a deleter removes earlier images, first without
// and then with a garbage-collection loop running on the leader (every
// 200 ms, a 5 s grace, so it condemns the deleted images' blobs while
// pushes go on and each region's replicator deletes their bytes). The
// target: collection slows pushes by at most 20% at p99. It reports each
// phase's p50 and p99 and the p99 ratio; b.N pushes per phase.
func BenchmarkPushWithGC(b *testing.B) {
	bc := newBenchCluster(b, "", false)
	defer bc.Close()
	ctx, cancel := context.WithTimeout(b.Context(), 20*time.Minute)
	defer cancel()
	leader, err := bc.Leader(ctx)
	if err != nil {
		b.Fatal(err)
	}
	conn, err := grpc.NewClient(bc.Config(leader).GRPCAddr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithPerRPCCredentials(admin.Credentials()))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	adm := pb.NewAdminClient(conn)

	type pushed struct{ repo, digest string }
	var (
		mu   sync.Mutex
		done []pushed
	)
	push := func(ctx context.Context, k int) error {
		repo := fmt.Sprintf("gcbench/r%d", k%16)
		layer := make([]byte, 64<<10)
		rand.Read(layer)
		var img smallImage
		var err error
		if img.Config, err = bc.reg.pushBlob(ctx, k%3, repo, "application/vnd.oci.image.config.v1+json", []byte(fmt.Sprintf(`{"k":%d,"t":%d}`, k, time.Now().UnixNano()))); err != nil {
			return err
		}
		if img.Layer, err = bc.reg.pushBlob(ctx, k%3, repo, "application/vnd.oci.image.layer.v1.tar", layer); err != nil {
			return err
		}
		r, err := bc.reg.putTag(ctx, k%3, repo, fmt.Sprintf("t%d", k), img.manifest("gc", k))
		if err == nil && r.status != http.StatusCreated {
			err = fmt.Errorf("push %s: %v", repo, r)
		}
		if err == nil {
			mu.Lock()
			done = append(done, pushed{repo, r.digest})
			mu.Unlock()
		}
		return err
	}
	// deleter removes the oldest pushed image every few milliseconds, in
	// both phases, so the only difference between them is collection.
	deleter := func(ctx context.Context) {
		for ctx.Err() == nil {
			mu.Lock()
			var p pushed
			if len(done) > 64 {
				p, done = done[0], done[1:]
			}
			mu.Unlock()
			if p.repo != "" {
				bc.reg.do(ctx, http.MethodDelete, bc.URL(0)+"/v2/"+p.repo+"/manifests/"+p.digest, nil, nil)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	phase := func(b *testing.B, gc bool) []time.Duration {
		pctx, stop := context.WithCancel(ctx)
		var wg sync.WaitGroup
		wg.Go(func() { deleter(pctx) })
		var runs atomic.Int64
		if gc {
			wg.Go(func() {
				for pctx.Err() == nil {
					resp, err := adm.RunGC(pctx, &pb.RunGCRequest{GraceNanos: proto.Int64(int64(5 * time.Second))})
					if err == nil && resp.Result.Err() == nil {
						runs.Add(1)
					}
					time.Sleep(200 * time.Millisecond)
				}
			})
		}
		lat := make([]time.Duration, b.N)
		var next atomic.Int64
		var failed atomic.Int64
		var pw sync.WaitGroup
		for range 8 {
			pw.Go(func() {
				for {
					k := int(next.Add(1)) - 1
					if k >= b.N {
						return
					}
					t0 := time.Now()
					if err := push(pctx, int(bc.seq.Add(1))); err != nil {
						failed.Add(1)
					}
					lat[k] = time.Since(t0)
				}
			})
		}
		pw.Wait()
		for gc && runs.Load() == 0 && ctx.Err() == nil {
			time.Sleep(10 * time.Millisecond) // a phase too short for a whole run
		}
		stop()
		wg.Wait()
		if f := failed.Load(); f > 0 {
			b.Fatalf("%d of %d pushes failed", f, b.N)
		}
		return lat
	}
	var without, with []time.Duration
	b.Run("without-gc", func(b *testing.B) { without = phase(b, false); reportPercentiles(b, without, "") })
	// Let the grace period pass for what the first phase deleted, so the
	// loop has garbage from its first run on.
	time.Sleep(5 * time.Second)
	b.Run("with-gc", func(b *testing.B) {
		with = phase(b, true)
		reportPercentiles(b, with, "")
		st, err := adm.GCStatus(ctx, &pb.GCStatusRequest{})
		if err == nil && len(st.Regions) > 0 {
			b.ReportMetric(float64(st.Regions[0].BlobsFreed), "blobs-freed")
		}
		if len(without) > 0 {
			b.ReportMetric(p99(with)/p99(without), "p99-ratio")
		}
	})
}

func p99(s []time.Duration) float64 {
	c := slices.Clone(s)
	slices.Sort(c)
	return float64(c[min(len(c)-1, int(0.99*float64(len(c))))])
}
