package consensus

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

const nodeTestTimeout = 30 * time.Second

// listenExcept opens a 127.0.0.1:0 listener on a port other than avoid.
func listenExcept(tb testing.TB, avoid string) net.Listener {
	tb.Helper()
	var spare []net.Listener
	defer func() {
		for _, l := range spare {
			l.Close()
		}
	}()
	for range 20 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			tb.Fatal(err)
		}
		if ln.Addr().String() != avoid {
			return ln
		}
		spare = append(spare, ln)
	}
	tb.Fatalf("could not get a port other than %s", avoid)
	return nil
}

// startNode opens a single-voter node on dataDir and waits for it to lead.
func startNode(tb testing.TB, dataDir string, tweak ...func(*Config)) *Node {
	tb.Helper()
	cfg := DefaultConfig()
	cfg.NodeID = "node-1"
	cfg.DataDir = dataDir
	cfg.Bootstrap = true
	cfg.HeartbeatTimeout = 200 * time.Millisecond
	cfg.ElectionTimeout = 200 * time.Millisecond
	cfg.Logger = testLogger()
	for _, f := range tweak {
		f(&cfg)
	}
	if cfg.RaftListener == nil {
		cfg.RaftListener = listenExcept(tb, "")
	}
	n := NewNode(cfg)
	ctx, cancel := context.WithTimeout(context.Background(), nodeTestTimeout)
	defer cancel()
	if err := n.Open(ctx); err != nil {
		cfg.RaftListener.Close()
		tb.Fatalf("Open: %v", err)
	}
	tb.Cleanup(func() { n.Close() })
	if err := n.WaitLeader(ctx); err != nil {
		tb.Fatalf("WaitLeader: %v", err)
	}
	waitFor(tb, nodeTestTimeout, "the node to lead", n.IsLeader)
	return n
}

func waitUploadKey(tb testing.TB, n *Node) []byte {
	tb.Helper()
	var k []byte
	waitFor(tb, nodeTestTimeout, "the leader to install the upload key", func() bool {
		var err error
		k, err = n.Store().UploadKey(context.Background())
		if err != nil {
			tb.Fatal(err)
		}
		return k != nil
	})
	if len(k) < 32 {
		tb.Fatalf("upload key of %d bytes", len(k))
	}
	return k
}

func propose(tb testing.TB, n *Node, e *pb.LogEntry) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), nodeTestTimeout)
	defer cancel()
	if err := n.Propose(ctx, e); err != nil {
		tb.Fatalf("Propose: %v", err)
	}
}

// proposeMany proposes count manifests tagged t0…, from workers goroutines.
func proposeMany(tb testing.TB, n *Node, repo string, count, workers int) {
	tb.Helper()
	var next atomic.Int64
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), nodeTestTimeout)
			defer cancel()
			for {
				i := next.Add(1) - 1
				if i >= int64(count) {
					return
				}
				c := manifest(repo, fmt.Sprintf("manifest-%d", i), fmt.Sprintf("t%d", i))
				if err := n.Propose(ctx, put(c)); err != nil {
					errs <- fmt.Errorf("proposal %d: %w", i, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		tb.Fatal(err)
	}
}

func checkTags(t *testing.T, s *Store, repo string, count int) {
	t.Helper()
	ctx := context.Background()
	tags, err := s.Tags(ctx, repo, "", -1)
	if err != nil {
		t.Fatal(err)
	}
	if len(tags) != count {
		t.Fatalf("%s has %d tags, want %d", repo, len(tags), count)
	}
	for _, i := range []int{0, count / 2, count - 1} {
		wantTag(t, s, repo, fmt.Sprintf("t%d", i), digestOf(fmt.Sprintf("manifest-%d", i)))
	}
}

func raftAddressOf(t *testing.T, n *Node, id string) raft.ServerAddress {
	t.Helper()
	f := n.Raft().GetConfiguration()
	if err := f.Error(); err != nil {
		t.Fatal(err)
	}
	for _, s := range f.Configuration().Servers {
		if s.ID == raft.ServerID(id) {
			return s.Address
		}
	}
	t.Fatalf("server %s not in the configuration", id)
	return ""
}

func TestNodeSingleNodeLifecycle(t *testing.T) {
	dataDir := t.TempDir()
	n := startNode(t, dataDir)
	key := waitUploadKey(t, n)
	ctx := context.Background()

	// Business failures come back as *meridianpb.Error values.
	c := manifest("life/app", "v1", "latest")
	propose(t, n, put(c))
	stale := manifest("life/app", "v2", "latest")
	stale.IfMatch = digestOf("not-current")
	err := n.Propose(ctx, put(stale))
	var pe *pb.Error
	if !errors.Is(err, pb.ErrPreconditionFailed) || !errors.As(err, &pe) {
		t.Fatalf("stale If-Match: %v (%T), want a *meridianpb.Error with ErrPreconditionFailed", err, err)
	}
	if err := n.Propose(ctx, deleteTag("life/none", "x")); pb.CodeOf(err) == pb.Code_CODE_UNSPECIFIED {
		t.Fatalf("deleting a missing tag: %v, want a business error", err)
	}
	wantTag(t, n.Store(), "life/app", "latest", c.Digest)

	proposeMany(t, n, "life/many", 200, 200)
	checkTags(t, n.Store(), "life/many", 200)

	sum, idx := storeDigest(t, n.Store())
	oldAddr := n.Addr()
	if err := n.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := n.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}

	// Restart on another port: the node leads again and records its new address.
	ln := listenExcept(t, oldAddr)
	n2 := startNode(t, dataDir, func(c *Config) { c.RaftListener = ln })
	if n2.Addr() == oldAddr {
		t.Fatalf("restarted on the same address %s", oldAddr)
	}
	waitFor(t, nodeTestTimeout, "the configuration to carry the new address", func() bool {
		return raftAddressOf(t, n2, "node-1") == raft.ServerAddress(n2.Addr())
	})
	if got, gotIdx := storeDigest(t, n2.Store()); !bytes.Equal(got, sum) || gotIdx < idx {
		t.Fatalf("after restart: index %d (was %d), same state %v", gotIdx, idx, bytes.Equal(got, sum))
	}
	if k := waitUploadKey(t, n2); !bytes.Equal(k, key) {
		t.Fatal("the upload key changed across a restart")
	}
	wantTag(t, n2.Store(), "life/app", "latest", c.Digest)
	checkTags(t, n2.Store(), "life/many", 200)

	// And it still takes writes.
	propose(t, n2, put(manifest("life/app", "v3", "latest")))
	wantTag(t, n2.Store(), "life/app", "latest", digestOf("v3"))
	if _, after := storeDigest(t, n2.Store()); after <= idx {
		t.Fatalf("applied index %d did not advance past %d", after, idx)
	}
}

func TestNodeRestartAfterSnapshotAndCompaction(t *testing.T) {
	dataDir := t.TempDir()
	tweak := func(c *Config) {
		c.SnapshotThreshold = 64
		c.SnapshotInterval = 100 * time.Millisecond
		c.TrailingLogs = 16
	}
	n := startNode(t, dataDir, tweak)
	waitUploadKey(t, n)
	proposeMany(t, n, "snap/app", 500, 16)
	propose(t, n, put(manifest("snap/cas", "b", "cas")))
	if err := n.Raft().Snapshot().Error(); err != nil && !errors.Is(err, raft.ErrNothingNewToSnapshot) {
		t.Fatalf("Snapshot: %v", err)
	}
	// Entries after the snapshot that the restart replays: applied again on
	// top of the final state, the rejected If-Match would now succeed.
	x := manifest("snap/cas", "x", "cas")
	x.IfMatch = digestOf("a")
	if err := n.Propose(context.Background(), put(x)); !errors.Is(err, pb.ErrPreconditionFailed) {
		t.Fatalf("If-Match on a moved tag: %v", err)
	}
	propose(t, n, put(manifest("snap/cas", "a", "cas")))
	snaps, err := n.snapshots.List()
	if err != nil || len(snaps) == 0 {
		t.Fatalf("no snapshot taken: %v", err)
	}
	first, err := n.logs.FirstIndex()
	if err != nil {
		t.Fatal(err)
	}
	if first <= 1 {
		t.Fatalf("the log was not compacted: first index %d (snapshot at %d)", first, snaps[0].Index)
	}
	sum, idx := storeDigest(t, n.Store())
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}

	n2 := startNode(t, dataDir, tweak)
	got, gotIdx := storeDigest(t, n2.Store())
	if !bytes.Equal(got, sum) || gotIdx < idx {
		t.Fatalf("after restart: %x@%d, want %x@%d", got, gotIdx, sum, idx)
	}
	checkTags(t, n2.Store(), "snap/app", 500)
	wantNoManifest(t, n2.Store(), "snap/cas", x.Digest)
	wantTag(t, n2.Store(), "snap/cas", "cas", digestOf("a"))
	propose(t, n2, put(manifest("snap/app", "after", "after")))
	wantTag(t, n2.Store(), "snap/app", "after", digestOf("after"))

	// Once more, now that the restarted node appended after the snapshot.
	sum, idx = storeDigest(t, n2.Store())
	if err := n2.Close(); err != nil {
		t.Fatal(err)
	}
	n3 := startNode(t, dataDir, tweak)
	if got, gotIdx := storeDigest(t, n3.Store()); !bytes.Equal(got, sum) || gotIdx != idx {
		t.Fatalf("after second restart: %x@%d, want %x@%d", got, gotIdx, sum, idx)
	}
}

func TestNodeProposeWithDoneContext(t *testing.T) {
	n := startNode(t, t.TempDir())
	waitUploadKey(t, n)

	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	expired, cancel2 := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel2()
	for name, ctx := range map[string]context.Context{"cancelled": cancelled, "expired": expired} {
		t.Run(name, func(t *testing.T) {
			c := manifest("ctx/app", name, name)
			err := n.Propose(ctx, put(c))
			if !errors.Is(err, pb.ErrUnavailable) {
				t.Fatalf("Propose with a %s context: %v, want ErrUnavailable", name, err)
			}
			// A caller that already gave up must not cause a write.
			if err := n.Raft().Barrier(nodeTestTimeout).Error(); err != nil {
				t.Fatal(err)
			}
			wantNoManifest(t, n.Store(), "ctx/app", c.Digest)
		})
	}
}

// TestNodeApplyTimeoutBoundsTheWait: with no deadline on the context,
// ApplyTimeout bounds the whole proposal, including waiting for the FSM,
// which a restore (holding the store) can stall.
func TestNodeApplyTimeoutBoundsTheWait(t *testing.T) {
	n := startNode(t, t.TempDir(), func(c *Config) { c.ApplyTimeout = 500 * time.Millisecond })
	waitUploadKey(t, n)
	n.Store().mu.Lock() // the FSM cannot apply, as during a restore
	locked := true
	defer func() {
		if locked {
			n.Store().mu.Unlock()
		}
	}()
	res := make(chan error, 1)
	go func() { res <- n.Propose(context.Background(), put(manifest("stuck/app", "m", "t"))) }()
	if err := waitErr(t, res, "Propose with a stalled FSM"); !errors.Is(err, pb.ErrUnavailable) {
		t.Fatalf("Propose with a stalled FSM: %v, want ErrUnavailable", err)
	}
	n.Store().mu.Unlock()
	locked = false
	// The entry was committed; it applies once the FSM moves again.
	waitFor(t, nodeTestTimeout, "the stalled entry to apply", func() bool {
		_, err := n.Store().Tag(context.Background(), "stuck/app", "t")
		return err == nil
	})
}

func TestNodeCloseIsIdempotentAndFinal(t *testing.T) {
	n := startNode(t, t.TempDir())
	waitUploadKey(t, n)
	for i := range 3 {
		if err := n.Close(); err != nil {
			t.Fatalf("Close #%d: %v", i+1, err)
		}
	}
	if n.IsLeader() {
		t.Fatal("a closed node reports itself leader")
	}
	// A request that races shutdown gets an error, not a crash.
	ctx, cancel := context.WithTimeout(context.Background(), nodeTestTimeout)
	defer cancel()
	if err := n.Propose(ctx, put(manifest("closed/app", "m", "t"))); !errors.Is(err, pb.ErrUnavailable) {
		t.Fatalf("Propose after Close: %v, want ErrUnavailable", err)
	}
	if _, err := n.Store().Tag(ctx, "closed/app", "t"); !errors.Is(err, ErrClosed) {
		t.Fatalf("read after Close: %v, want ErrClosed", err)
	}
}

// TestNodeCloseWhileProposing closes a node under load. Proposals caught by
// the shutdown (some sit in raft's FSM queue, whose futures raft never
// answers) must end with an error within ApplyTimeout, never panic or hang.
func TestNodeCloseWhileProposing(t *testing.T) {
	n := startNode(t, t.TempDir(), func(c *Config) { c.ApplyTimeout = 2 * time.Second })
	waitUploadKey(t, n)
	var wg sync.WaitGroup
	var committed atomic.Int64
	errs := make(chan error, 16)
	for w := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx := context.Background() // no deadline: ApplyTimeout applies
			for i := 0; ; i++ {
				err := n.Propose(ctx, put(manifest("race/app", fmt.Sprintf("%d-%d", w, i), fmt.Sprintf("w%d-%d", w, i))))
				switch {
				case err == nil:
					committed.Add(1)
				case errors.Is(err, pb.ErrUnavailable), errors.Is(err, pb.ErrNotLeader):
					return // shut down under us: the expected way out
				default:
					errs <- err
					return
				}
			}
		}()
	}
	waitFor(t, nodeTestTimeout, "some proposals to commit", func() bool { return committed.Load() >= 50 })
	if err := n.Close(); err != nil {
		t.Fatalf("Close under load: %v", err)
	}
	allDone := make(chan struct{})
	go func() { wg.Wait(); close(allDone) }()
	waitClosed(t, allDone, "proposers to return after Close")
	close(errs)
	for err := range errs {
		t.Errorf("Propose racing Close: %v", err)
	}
}

func TestNodeWithoutLeader(t *testing.T) {
	// No state and no bootstrap: the node waits to be added to a cluster.
	ln := listenExcept(t, "")
	cfg := DefaultConfig()
	cfg.NodeID, cfg.DataDir, cfg.RaftListener, cfg.Logger = "lonely", t.TempDir(), ln, testLogger()
	n := NewNode(cfg)
	if err := n.Open(context.Background()); err != nil {
		ln.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := n.WaitLeader(ctx); !errors.Is(err, pb.ErrUnavailable) {
		t.Fatalf("WaitLeader without a cluster: %v, want ErrUnavailable", err)
	}
	err := n.Propose(context.Background(), put(manifest("no/leader", "m", "t")))
	if !errors.Is(err, pb.ErrNotLeader) {
		t.Fatalf("Propose on a follower: %v, want ErrNotLeader", err)
	}
	if n.IsLeader() {
		t.Fatal("IsLeader on a node that never joined")
	}
}

func TestNodeOpenRequiresIDAndListener(t *testing.T) {
	ctx := context.Background()
	ln := listenExcept(t, "")
	defer ln.Close()
	if err := NewNode(Config{DataDir: t.TempDir(), RaftListener: ln, Logger: testLogger()}).Open(ctx); err == nil {
		t.Fatal("Open without a node id succeeded")
	}
	if err := NewNode(Config{NodeID: "x", DataDir: t.TempDir(), Logger: testLogger()}).Open(ctx); err == nil {
		t.Fatal("Open without a listener succeeded")
	}
}

// BenchmarkPropose measures committed proposals per second on one node:
// parallel proposers, small PutManifest entries, synced Raft log.
func BenchmarkPropose(b *testing.B) {
	n := startNode(b, b.TempDir())
	waitUploadKey(b, n)
	var seq atomic.Int64
	b.SetParallelism(32)
	b.ResetTimer()
	b.RunParallel(func(pbt *testing.PB) {
		ctx := context.Background()
		for pbt.Next() {
			i := seq.Add(1)
			c := manifest("bench/app", fmt.Sprintf(`{"schemaVersion":2,"n":%d}`, i), fmt.Sprintf("t%d", i))
			if err := n.Propose(ctx, put(c)); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "ops/s")
}

// TestNodeKeepsAdvertisedHostName: an advertised Raft address that is a host
// name stays a name in the configuration (resolved at each dial), so servers
// that return on new IPs are still reached; bad addresses are refused.
func TestNodeKeepsAdvertisedHostName(t *testing.T) {
	ln := listenExcept(t, "")
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	name := net.JoinHostPort("localhost", port)
	n := startNode(t, t.TempDir(), func(c *Config) { c.RaftListener, c.AdvertiseRaft = ln, name })
	if got := n.Addr(); got != name {
		t.Fatalf("Addr() = %q, want %q", got, name)
	}
	if got := raftAddressOf(t, n, "node-1"); string(got) != name {
		t.Fatalf("configuration holds %q, want %q", got, name)
	}
	propose(t, n, put(manifest("repo", "m", "t")))

	for _, bad := range []string{"localhost", ":5002", "0.0.0.0:5002", "localhost:0", "localhost:http-alt-x"} {
		if _, err := advertiseAddr(bad); err == nil {
			t.Errorf("advertiseAddr(%q) accepted", bad)
		}
	}
}
