package node

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"

	"github.com/meridian-registry/meridian/consensus"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// GCConfig schedules garbage collection (docs/operations.md#garbage-collection).
type GCConfig struct {
	// Interval is how often the leader runs a collection (0: only when
	// `meridian gc run` asks).
	Interval time.Duration `yaml:"interval"`
	// Grace is how long a blob link must have gone unreferenced by any
	// manifest of its repository before a run takes it. It covers pushes in
	// flight: layers are uploaded before the manifest that uses them.
	Grace time.Duration `yaml:"grace"`
	// Untagged, when set, also collects manifests that no tag, no index and
	// no live subject has kept for this long (0: untagged manifests stay,
	// since clients may pull them by digest).
	Untagged time.Duration `yaml:"untagged"`
	// PullResolution is how coarsely manifest pulls are recorded for
	// retention's keep-pulled-within rules: pull times are truncated to it
	// and each member sends a manifest's pull at most once per period.
	PullResolution time.Duration `yaml:"pull_resolution"`
}

func defaultGCConfig() GCConfig {
	return GCConfig{Interval: time.Hour, Grace: 24 * time.Hour, PullResolution: 10 * time.Minute}
}

func (c GCConfig) validate() error {
	if c.Interval < 0 || c.Grace < 0 || c.Untagged < 0 || c.PullResolution < 0 {
		return errors.New("gc.interval, gc.grace, gc.untagged and gc.pull_resolution cannot be negative")
	}
	return nil
}

// runPullLog sends the pulls this node served to the cluster.
func (n *Node) runPullLog() {
	defer n.wg.Done()
	ctx, cancel := context.WithCancel(context.Background())
	go func() { <-n.stop; cancel() }()
	n.gateway.RunPullLog(ctx)
}

// gcBatch bounds the candidates of one CollectGarbage entry, so a large
// run is many small entries rather than one that stalls the log.
const gcBatch = 256

// gcMetrics are the leader's view of collection runs; bytes freed per
// region are counted by each region's replicator.
type gcMetrics struct {
	runs       *prometheus.CounterVec
	candidates prometheus.Gauge
	condemned  prometheus.Counter
	duration   prometheus.Histogram
}

func newGCMetrics(reg prometheus.Registerer) (*gcMetrics, error) {
	m := &gcMetrics{
		runs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "meridian", Subsystem: "gc", Name: "runs_total",
			Help: "Garbage-collection runs this node led, by outcome (ok, failed, dry_run).",
		}, []string{"result"}),
		candidates: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "meridian", Subsystem: "gc", Name: "candidates",
			Help: "Blobs and manifests the last run on this node found to collect.",
		}),
		condemned: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "meridian", Subsystem: "gc", Name: "condemned_bytes_total",
			Help: "Bytes of blobs runs on this node condemned (every region then frees them).",
		}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "meridian", Subsystem: "gc", Name: "duration_seconds",
			Help:    "How long garbage-collection runs took, planning and committing.",
			Buckets: prometheus.ExponentialBuckets(0.001, 4, 12),
		}),
	}
	for _, c := range []prometheus.Collector{m.runs, m.candidates, m.condemned, m.duration} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// gcRunner lets one collection run at a time on a node.
type gcRunner struct{ mu sync.Mutex }

// runGC plans a collection from this node's state (the leader's, for a
// real run) and, unless dry, commits it in batches. The state machine
// re-checks each candidate, so a run never takes what a concurrent push
// linked; the answer's Run holds what the entries actually did.
func (n *Node) runGC(ctx context.Context, req *pb.RunGCRequest) (*pb.RunGCResponse, error) {
	if !n.consensus.IsLeader() {
		return nil, fmt.Errorf("%w: garbage collection runs on the leader", pb.ErrNotLeader)
	}
	if !n.gc.mu.TryLock() {
		return nil, pb.Errorf(pb.Code_CODE_UNAVAILABLE, "a garbage-collection run is already under way on this node")
	}
	defer n.gc.mu.Unlock()
	began := time.Now()
	grace, untagged := n.cfg.GC.Grace, n.cfg.GC.Untagged
	if req.GraceNanos != nil {
		grace = time.Duration(*req.GraceNanos)
	}
	if req.UntaggedNanos != nil {
		untagged = time.Duration(*req.UntaggedNanos)
	}
	if grace < 0 || untagged < 0 {
		return nil, pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "grace and untagged cannot be negative")
	}
	resp := &pb.RunGCResponse{DryRun: req.DryRun, UnreferencedBeforeUnixNano: began.Add(-grace).UnixNano()}
	if untagged > 0 {
		resp.UntaggedBeforeUnixNano = began.Add(-untagged).UnixNano()
	}
	plan, err := n.consensus.Store().PlanGC(ctx, resp.UnreferencedBeforeUnixNano, resp.UntaggedBeforeUnixNano)
	if err != nil {
		n.gcMetrics.runs.WithLabelValues("failed").Inc()
		return nil, err
	}
	for _, b := range plan.Blobs {
		resp.Blobs = append(resp.Blobs, &pb.GCBlob{Digest: b.Digest, Size: b.Size, Unlinked: b.Unlinked, Condemned: b.Condemned})
	}
	resp.Manifests = plan.Manifests
	n.gcMetrics.candidates.Set(float64(len(resp.Blobs) + len(resp.Manifests)))
	if req.DryRun {
		n.gcMetrics.runs.WithLabelValues("dry_run").Inc()
		resp.DurationNanos = int64(time.Since(began))
		return resp, nil
	}
	resp.RunId = newRunID(began)
	err = n.commitGC(ctx, resp, plan, began)
	resp.DurationNanos = int64(time.Since(began))
	n.gcMetrics.duration.Observe(time.Since(began).Seconds())
	if err != nil {
		n.gcMetrics.runs.WithLabelValues("failed").Inc()
		return nil, err
	}
	n.gcMetrics.runs.WithLabelValues("ok").Inc()
	n.gcMetrics.condemned.Add(float64(resp.Run.GetBytesCondemned()))
	n.logger.Info("garbage collection", "run", resp.RunId, "candidates", len(resp.Blobs)+len(resp.Manifests),
		"blobs_condemned", resp.Run.GetBlobsCondemned(), "bytes_condemned", resp.Run.GetBytesCondemned(),
		"links_dropped", resp.Run.GetLinksDropped(), "manifests_deleted", resp.Run.GetManifestsDeleted(),
		"took", time.Since(began).Round(time.Millisecond))
	return resp, nil
}

// commitGC proposes the plan in entries of at most gcBatch items,
// manifests first (a manifest deleted now leaves its blobs for a later
// run, after their own grace), and reads back what the run did. A run with nothing to collect still
// commits one entry, so `gc status` shows when collection last ran.
func (n *Node) commitGC(ctx context.Context, resp *pb.RunGCResponse, plan *consensus.GCPlan, began time.Time) error {
	entry := func() *pb.CollectGarbage {
		return &pb.CollectGarbage{
			RunId: resp.RunId, RunStartedUnixNano: began.UnixNano(),
			UnreferencedBeforeUnixNano: resp.UnreferencedBeforeUnixNano, UntaggedBeforeUnixNano: resp.UntaggedBeforeUnixNano,
		}
	}
	var batches []*pb.CollectGarbage
	for _, ms := range inBatches(plan.Manifests, gcBatch) {
		c := entry()
		c.Manifests = ms
		batches = append(batches, c)
	}
	digests := make([]string, len(plan.Blobs))
	for i, b := range plan.Blobs {
		digests[i] = b.Digest
	}
	for _, ds := range inBatches(digests, gcBatch) {
		c := entry()
		c.Blobs = ds
		batches = append(batches, c)
	}
	if len(batches) == 0 {
		batches = append(batches, entry())
	}
	for _, b := range batches {
		if err := n.consensus.Propose(ctx, &pb.LogEntry{Command: &pb.LogEntry_CollectGarbage{CollectGarbage: b}}); err != nil {
			return err
		}
	}
	run, _, err := n.consensus.Store().GCStatus(ctx, nil)
	if err != nil {
		return err
	}
	if run.GetRunId() == resp.RunId {
		resp.Run = run
	}
	return nil
}

// inBatches splits items into runs of at most size, so a large run is many
// small log entries rather than one that stalls the log.
func inBatches[T any](items []T, size int) [][]T {
	var out [][]T
	for len(items) > 0 {
		n := min(size, len(items))
		out = append(out, items[:n])
		items = items[n:]
	}
	return out
}

func newRunID(t time.Time) string {
	b := make([]byte, 4)
	rand.Read(b)
	return t.UTC().Format("20060102T150405Z") + "-" + hex.EncodeToString(b)
}

// gcStatus is the last run and, per region, what was freed and what is
// still to remove.
func (n *Node) gcStatus(ctx context.Context) (*pb.GCStatusResponse, error) {
	run, regions, err := n.consensus.Store().GCStatus(ctx, n.cfg.regionNames())
	if err != nil {
		return nil, err
	}
	return &pb.GCStatusResponse{
		LastRun: run, Regions: regions,
		IntervalNanos: int64(n.cfg.GC.Interval), GraceNanos: int64(n.cfg.GC.Grace), UntaggedNanos: int64(n.cfg.GC.Untagged),
	}, nil
}

// scheduleGC makes the leader apply the retention rules and run a
// collection every gc.interval.
func (n *Node) scheduleGC() {
	defer n.wg.Done()
	if n.cfg.GC.Interval <= 0 {
		return
	}
	t := time.NewTicker(n.cfg.GC.Interval)
	defer t.Stop()
	for {
		select {
		case <-n.stop:
			return
		case <-t.C:
		}
		if !n.consensus.IsLeader() {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), max(n.cfg.GC.Interval, time.Minute))
		go func() {
			select {
			case <-n.stop:
				cancel()
			case <-ctx.Done():
			}
		}()
		// Retention first: what it deletes becomes garbage for later runs.
		if _, err := n.runRetention(ctx, false, &pb.Actor{Principal: "system", Via: n.cfg.NodeID}); err != nil {
			n.logger.Warn("scheduled retention", "err", err)
		}
		if _, err := n.runGC(ctx, &pb.RunGCRequest{}); err != nil {
			n.logger.Warn("scheduled garbage collection", "err", err)
		}
		cancel()
	}
}

// manageLifecycle commits an admin's lifecycle change: a repository
// delete, an immutability rule or a quota. The node validates it like any command.
func (n *Node) manageLifecycle(ctx context.Context, req *pb.ManageLifecycleRequest) error {
	cmd := &pb.Command{}
	switch c := req.GetChange().(type) {
	case *pb.ManageLifecycleRequest_DeleteRepository:
		cmd.Intent = &pb.Command_DeleteRepository{DeleteRepository: c.DeleteRepository}
	case *pb.ManageLifecycleRequest_SetImmutableRule:
		cmd.Intent = &pb.Command_SetImmutableRule{SetImmutableRule: c.SetImmutableRule}
	case *pb.ManageLifecycleRequest_DeleteImmutableRule:
		cmd.Intent = &pb.Command_DeleteImmutableRule{DeleteImmutableRule: c.DeleteImmutableRule}
	case *pb.ManageLifecycleRequest_SetQuota:
		cmd.Intent = &pb.Command_SetQuota{SetQuota: c.SetQuota}
	case *pb.ManageLifecycleRequest_DeleteQuota:
		cmd.Intent = &pb.Command_DeleteQuota{DeleteQuota: c.DeleteQuota}
	case *pb.ManageLifecycleRequest_SetRetentionRule:
		cmd.Intent = &pb.Command_SetRetentionRule{SetRetentionRule: c.SetRetentionRule}
	case *pb.ManageLifecycleRequest_DeleteRetentionRule:
		cmd.Intent = &pb.Command_DeleteRetentionRule{DeleteRetentionRule: c.DeleteRetentionRule}
	default:
		return invalid("no lifecycle change in the request")
	}
	return n.commit(ctx, cmd)
}

// RunGC runs a collection on the leader, dry runs too: its state holds
// every write acknowledged so far, so the plan is what a run would take.
// A run can outlast the usual apply timeout on a large registry, so the
// caller's deadline bounds it.
func (s adminServer) RunGC(ctx context.Context, req *pb.RunGCRequest) (*pb.RunGCResponse, error) {
	var resp *pb.RunGCResponse
	err := s.n.onLeader(ctx, func(ctx context.Context, cc grpc.ClientConnInterface) error {
		r, err := pb.NewAdminClient(cc).RunGC(forwardContext(ctx), req)
		if err != nil {
			return fromGRPC(err)
		}
		resp = r
		return nil
	}, func(ctx context.Context) (err error) {
		resp, err = s.n.runGC(ctx, req)
		return err
	})
	if r, gerr := answer(adminError(err)); gerr != nil {
		return nil, gerr
	} else if r != nil {
		return &pb.RunGCResponse{Result: r}, nil
	}
	return resp, nil
}

func (s adminServer) GCStatus(ctx context.Context, _ *pb.GCStatusRequest) (*pb.GCStatusResponse, error) {
	resp, err := s.n.gcStatus(ctx)
	if err != nil {
		return nil, pb.ToStatus(err)
	}
	return resp, nil
}

func (s adminServer) ManageLifecycle(ctx context.Context, req *pb.ManageLifecycleRequest) (*pb.ManageLifecycleResponse, error) {
	r, gerr := answer(adminError(s.n.manageLifecycle(ctx, req)))
	if gerr != nil {
		return nil, gerr
	}
	return &pb.ManageLifecycleResponse{Result: r}, nil
}

func (s adminServer) ListLifecycle(ctx context.Context, _ *pb.ListLifecycleRequest) (*pb.ListLifecycleResponse, error) {
	rules, err := s.n.consensus.Store().ImmutableRules(ctx)
	if err != nil {
		return nil, pb.ToStatus(err)
	}
	quotas, err := s.n.consensus.Store().QuotaUsages(ctx)
	if err != nil {
		return nil, pb.ToStatus(err)
	}
	retention, err := s.n.consensus.Store().RetentionRules(ctx)
	if err != nil {
		return nil, pb.ToStatus(err)
	}
	return &pb.ListLifecycleResponse{ImmutableRules: rules, Quotas: quotas, RetentionRules: retention}, nil
}
