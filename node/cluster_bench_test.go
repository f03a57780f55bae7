package node_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meridian-registry/meridian/node"
	"github.com/meridian-registry/meridian/node/clustertest"
)

// The cluster benchmarks run three real nodes on loopback in this process,
// with the default configuration (fsync on, hashicorp/raft's default
// timeouts), and drive them over HTTP like registry clients. The cluster's
// targets: ≥ 2,000 tag updates/s with 32 writers, p50 < 10 ms with one
// writer, first push ≤ 5 s after the leader is killed. Nothing here
// asserts them; the figures are reported with b.ReportMetric.

const benchRepo = "bench/app"

// benchCluster is a three-node cluster with a config and a layer pushed
// into benchRepo, so manifests over them can be pushed by tag.
type benchCluster struct {
	*clustertest.Cluster
	reg rawRegistry
	img smallImage
	// seq makes every manifest pushed distinct across runs.
	seq atomic.Int64
}

// newBenchCluster starts the cluster; with mtls its nodes run mutual TLS on
// gRPC and Raft and encrypted gossip, as production clusters do.
func newBenchCluster(b *testing.B, readConsistency string, mtls bool) *benchCluster {
	b.Helper()
	defaults := node.DefaultConfig()
	var p *securePKI
	c := clustertest.New(b, 3,
		// Raft logs its heartbeat failures at ERROR during a failover;
		// benchmark logs are always printed, so keep them quiet.
		clustertest.WithLogLevel(slog.LevelError+4),
		clustertest.WithConfig(func(_ int, cfg *node.Config) {
			cfg.RaftHeartbeatTimeout = defaults.RaftHeartbeatTimeout
			cfg.RaftElectionTimeout = defaults.RaftElectionTimeout
			if readConsistency != "" {
				cfg.ReadConsistency = readConsistency
			}
			if mtls {
				if p == nil {
					p = newSecurePKI(b, cfg.ClusterID)
				}
				p.secure(cfg)
			}
		}))
	ctx, cancel := context.WithTimeout(b.Context(), time.Minute)
	defer cancel()
	if err := c.WaitVoters(ctx, 3); err != nil {
		b.Fatal(err)
	}
	leader, err := c.Leader(ctx)
	if err != nil {
		b.Fatal(err)
	}
	bc := &benchCluster{Cluster: c, reg: rawRegistry{c: c, client: c.Client()}}
	if bc.img, err = bc.reg.pushSmallImage(ctx, leader, benchRepo); err != nil {
		b.Fatal(err)
	}
	return bc
}

// putTag pushes a new manifest under tag through node i and returns its
// digest.
func (bc *benchCluster) putTag(ctx context.Context, i int, tag string) (string, error) {
	r, err := bc.reg.putTag(ctx, i, benchRepo, tag, bc.img.manifest("bench", int(bc.seq.Add(1))))
	if err == nil && r.status != http.StatusCreated {
		err = fmt.Errorf("PUT %s through node %d: %v", tag, i, r)
	}
	return r.digest, err
}

// BenchmarkTagUpdate measures tag updates committed through Raft: each
// operation PUTs a new small manifest by tag through the nodes in turn
// (two of three are forwarded to the leader), with cluster TLS off and on.
func BenchmarkTagUpdate(b *testing.B) {
	for _, mtls := range []bool{false, true} {
		bc := newBenchCluster(b, "", mtls)
		for _, writers := range []int{1, 32} {
			b.Run(fmt.Sprintf("mtls=%v/writers=%d", mtls, writers), func(b *testing.B) {
				runConcurrently(b, writers, "updates/s", func(ctx context.Context, w, k int) error {
					_, err := bc.putTag(ctx, k%3, fmt.Sprintf("w%d", w))
					return err
				})
			})
		}
		bc.Close()
	}
}

// BenchmarkTagRead measures GETs of a manifest by tag through the two
// followers with 32 concurrent readers, with local and with strong read
// consistency (strong reads each confirm a read index with the leader,
// batched).
func BenchmarkTagRead(b *testing.B) {
	const readers, tags = 32, 32
	for _, run := range []struct {
		mode string
		mtls bool
	}{{"local", false}, {"strong", false}, {"local", true}, {"strong", true}} {
		mode := run.mode
		bc := newBenchCluster(b, mode, run.mtls)
		ctx, cancel := context.WithTimeout(b.Context(), time.Minute)
		want := make([]string, tags)
		for k := range tags {
			d, err := bc.putTag(ctx, k%3, fmt.Sprintf("r%d", k))
			if err != nil {
				b.Fatal(err)
			}
			want[k] = d
		}
		if err := bc.WaitConverged(ctx); err != nil {
			b.Fatal(err)
		}
		leader, err := bc.Leader(ctx)
		if err != nil {
			b.Fatal(err)
		}
		cancel()
		followers := []int{(leader + 1) % 3, (leader + 2) % 3}
		b.Run(fmt.Sprintf("mtls=%v/%s", run.mtls, mode), func(b *testing.B) {
			runConcurrently(b, readers, "reads/s", func(ctx context.Context, _, k int) error {
				via, tag := followers[k%2], k%tags
				r, err := bc.reg.getManifest(ctx, via, http.MethodGet, benchRepo, fmt.Sprintf("r%d", tag))
				if err == nil {
					err = r.served(want[tag])
				}
				if err != nil {
					return fmt.Errorf("GET r%d through node %d: %w", tag, via, err)
				}
				return nil
			})
		})
		bc.Close()
	}
}

// runConcurrently runs b.N operations spread over workers goroutines and
// reports their rate (in unit) and latency percentiles. op gets the
// worker's number and the operation's.
func runConcurrently(b *testing.B, workers int, unit string, op func(ctx context.Context, w, k int) error) {
	ctx, cancel := context.WithTimeout(b.Context(), 5*time.Minute)
	defer cancel()
	lat := make([]time.Duration, b.N)
	var (
		next     atomic.Int64
		mu       sync.Mutex
		failures int
		firstErr error
		wg       sync.WaitGroup
	)
	b.ResetTimer()
	start := time.Now()
	for w := range workers {
		wg.Go(func() {
			for {
				k := int(next.Add(1)) - 1
				if k >= b.N {
					return
				}
				t0 := time.Now()
				err := op(ctx, w, k)
				lat[k] = time.Since(t0)
				if err != nil {
					mu.Lock()
					if failures++; firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	if failures > 0 {
		b.Fatalf("%d of %d operations failed; first: %v", failures, b.N, firstErr)
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), unit)
	reportPercentiles(b, lat, "")
}

// reportPercentiles reports the p50 and p99 of samples in milliseconds,
// as <prefix>p50-ms and <prefix>p99-ms.
func reportPercentiles(b *testing.B, samples []time.Duration, prefix string) {
	s := slices.Clone(samples)
	slices.Sort(s)
	at := func(q float64) float64 {
		return float64(s[min(len(s)-1, int(q*float64(len(s))))]) / float64(time.Millisecond)
	}
	b.ReportMetric(at(0.50), prefix+"p50-ms")
	b.ReportMetric(at(0.99), prefix+"p99-ms")
}

// BenchmarkLeaderFailover stops the leader and measures the time from the
// start of the stop until a push through one of the two survivors
// succeeds (failover-ms). elected-ms is when a survivor became leader, and
// stop-ms the part spent in the old leader's graceful Close, which a crash
// would not take. The stopped node restarts and the cluster converges
// between iterations, off the clock. With hashicorp/raft's default 1 s
// timeouts an iteration takes about 2.5 s: -benchtime 200x runs for about
// 8.5 minutes.
func BenchmarkLeaderFailover(b *testing.B) {
	bc := newBenchCluster(b, "", false)
	var failovers, elections, stops []time.Duration
	attempts := 0
	for b.Loop() {
		b.StopTimer()
		ctx, cancel := context.WithTimeout(b.Context(), 2*time.Minute)
		if err := bc.WaitConverged(ctx); err != nil {
			b.Fatal(err)
		}
		leader, err := bc.Leader(ctx)
		if err != nil {
			b.Fatal(err)
		}
		survivors := []int{(leader + 1) % 3, (leader + 2) % 3}
		b.StartTimer()

		start := time.Now()
		elected := bc.watchElection(ctx, start, survivors)
		bc.Stop(leader)
		stops = append(stops, time.Since(start))
		// Each push waits for a leader up to the apply timeout itself; a
		// failed one is tried again through the other survivor.
		var errs []error
		pushCtx, pushCancel := context.WithTimeout(ctx, time.Minute)
		pushed := pollUntil(pushCtx, func() bool {
			_, err := bc.putTag(pushCtx, survivors[attempts%2], "failover")
			attempts++
			errs = append(errs, err)
			return err == nil
		})
		pushCancel()
		if !pushed {
			b.Fatalf("no push succeeded within a minute of stopping leader node %d: %v", leader, errors.Join(errs...))
		}
		failovers = append(failovers, time.Since(start))
		select {
		case d := <-elected:
			elections = append(elections, d)
		case <-ctx.Done():
			b.Fatalf("a push succeeded, but no survivor of %v ever led", survivors)
		}

		b.StopTimer()
		if err := bc.Restart(leader); err != nil {
			b.Fatal(err)
		}
		if err := bc.Node(leader).WaitReady(ctx); err != nil {
			b.Fatal(err)
		}
		cancel()
		b.StartTimer()
	}
	b.ReportMetric(meanMillis(failovers), "failover-ms")
	reportPercentiles(b, failovers, "failover-")
	b.ReportMetric(float64(slices.Max(failovers))/float64(time.Millisecond), "failover-max-ms")
	b.ReportMetric(meanMillis(elections), "elected-ms")
	b.ReportMetric(meanMillis(stops), "stop-ms")
	b.ReportMetric(float64(attempts)/float64(len(failovers)), "pushes/failover")
	// The timer only ran during failovers: ns/op would repeat failover-ms.
	b.ReportMetric(0, "ns/op")
}

// watchElection reports, once, how long after start one of survivors
// became leader.
func (bc *benchCluster) watchElection(ctx context.Context, start time.Time, survivors []int) <-chan time.Duration {
	elected := make(chan time.Duration, 1)
	go func() {
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		for {
			for _, i := range survivors {
				if n := bc.Node(i); n != nil && n.Consensus().IsLeader() {
					elected <- time.Since(start)
					return
				}
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	return elected
}

func meanMillis(ds []time.Duration) float64 {
	var sum time.Duration
	for _, d := range ds {
		sum += d
	}
	return float64(sum) / float64(len(ds)) / float64(time.Millisecond)
}
