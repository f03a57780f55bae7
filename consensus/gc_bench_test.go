package consensus

import (
	"context"
	"fmt"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// BenchmarkGCPass measures one garbage-collection pass over a state of
// 100,000 manifests referencing 200,000 blobs, half of the manifests
// deleted: planning from the candidate tables (plan-s), applying the run's
// CollectGarbage entries (apply-s), and the Go heap's peak above what the
// state held before the pass (peak-heap-MiB). The state is built once per
// iteration off the clock; run it with -benchtime 1x.
func BenchmarkGCPass(b *testing.B) {
	const manifests = 100_000
	for range b.N {
		b.StopTimer()
		s := openTestStore(b, b.TempDir())
		f := &fsm{store: s, logger: testLogger()}
		var index uint64
		apply := func(e *pb.LogEntry) {
			index++
			e.Version = LogVersion
			e.TimeUnixNano = int64(index) * 1_000
			data, err := proto.Marshal(e)
			if err != nil {
				b.Fatal(err)
			}
			if res := f.Apply(&raft.Log{Index: index, Term: 1, Type: raft.LogCommand, Data: data}); res != nil {
				b.Fatalf("entry %d: %v", index, res)
			}
		}
		for i := range manifests {
			repo := fmt.Sprintf("bench/r%d", i%100)
			blobs := []string{digestOf(fmt.Sprint("config-", i)), digestOf(fmt.Sprint("layer-", i))}
			for _, d := range blobs {
				apply(placeBlob(repo, d, 1000, "us"))
			}
			m := manifest(repo, fmt.Sprint("manifest-", i), fmt.Sprint("v", i))
			m.Blobs = blobs
			apply(put(m))
		}
		for i := 0; i < manifests; i += 2 {
			apply(deleteManifest(fmt.Sprintf("bench/r%d", i%100), digestOf(fmt.Sprint("manifest-", i))))
		}
		runtime.GC()
		var base runtime.MemStats
		runtime.ReadMemStats(&base)
		var peak atomic.Uint64
		stop := make(chan struct{})
		sampled := make(chan struct{})
		go func() {
			defer close(sampled)
			var m runtime.MemStats
			for {
				runtime.ReadMemStats(&m)
				if m.HeapAlloc > peak.Load() {
					peak.Store(m.HeapAlloc)
				}
				select {
				case <-stop:
					return
				case <-time.After(5 * time.Millisecond):
				}
			}
		}()

		b.StartTimer()
		began := time.Now()
		cutoff := int64(index+1) * 1_000
		plan, err := s.PlanGC(context.Background(), cutoff, 0)
		if err != nil {
			b.Fatal(err)
		}
		planned := time.Since(began)
		c := &pb.CollectGarbage{RunId: "bench", UnreferencedBeforeUnixNano: cutoff}
		for _, bl := range plan.Blobs {
			c.Blobs = append(c.Blobs, bl.Digest)
			if len(c.Blobs) == 256 {
				apply(&pb.LogEntry{Command: &pb.LogEntry_CollectGarbage{CollectGarbage: c}})
				c = &pb.CollectGarbage{RunId: "bench", UnreferencedBeforeUnixNano: cutoff}
			}
		}
		apply(&pb.LogEntry{Command: &pb.LogEntry_CollectGarbage{CollectGarbage: c}})
		total := time.Since(began)
		b.StopTimer()
		close(stop)
		<-sampled

		if len(plan.Blobs) != manifests {
			b.Fatalf("the pass planned %d blobs; want %d", len(plan.Blobs), manifests)
		}
		run, _, err := s.GCStatus(context.Background(), nil)
		if err != nil || run.BlobsCondemned != manifests {
			b.Fatalf("the pass condemned %d blobs, %v; want %d", run.GetBlobsCondemned(), err, manifests)
		}
		b.ReportMetric(planned.Seconds(), "plan-s")
		b.ReportMetric((total - planned).Seconds(), "apply-s")
		b.ReportMetric(float64(peak.Load()-min(peak.Load(), base.HeapAlloc))/(1<<20), "peak-heap-MiB")
		s.Close()
	}
}
