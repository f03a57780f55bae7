package node_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"github.com/meridian-registry/meridian/node/clustertest/admin"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meridian-registry/meridian/consensus"
	"github.com/meridian-registry/meridian/gateway"
	"github.com/meridian-registry/meridian/node"
	"github.com/meridian-registry/meridian/node/clustertest"
	"github.com/meridian-registry/meridian/node/membership"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// TestClusterPushPull pushes through a follower and pulls through every
// node, then checks that a manifest just pushed through one node is found
// at once through another (no false 404).
func TestClusterPushPull(t *testing.T) {
	c := clustertest.New(t, 3)
	ctx := within(t, 2*time.Minute)
	if err := c.WaitVoters(ctx, 3); err != nil {
		t.Fatal(err)
	}
	leader := mustLeader(t, ctx, c)
	follower := (leader + 1) % 3

	img := randomImage(t, 4096, 3)
	if err := remote.Write(ref(t, c, follower, "push/follower:v1"), img, remoteOpts(ctx, c)...); err != nil {
		t.Fatalf("push through follower node %d: %v", follower, err)
	}
	digest := mustDigest(t, img)
	for i := range 3 {
		for _, r := range []string{"push/follower:v1", "push/follower@" + digest.String()} {
			if err := pullAndCompare(ctx, c, i, r, img); err != nil {
				t.Errorf("node %d: %v", i, err)
			}
		}
	}

	// cluster status, asked of a follower, shows every member with the same
	// state digest once the cluster has converged.
	if err := c.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}
	st, err := adminClient(t, c, follower).ClusterStatus(ctx, &pb.ClusterStatusRequest{})
	if err != nil {
		t.Fatalf("ClusterStatus: %v", err)
	}
	if st.LeaderId != c.Config(leader).NodeID || len(st.Members) != 3 {
		t.Fatalf("ClusterStatus: leader %q and %d members, want %s and 3", st.LeaderId, len(st.Members), c.Config(leader).NodeID)
	}
	for _, m := range st.Members {
		s0 := st.Members[0].GetStatus()
		if s := m.GetStatus(); s == nil || m.Suffrage != "voter" || !bytes.Equal(s.StateDigest, s0.GetStateDigest()) || s.StateDigestIndex != s0.GetStateDigestIndex() {
			t.Errorf("ClusterStatus member %s: suffrage %s, status %v, error %q; want a voter with the digest of %s", m.Id, m.Suffrage, s, m.Error, st.Members[0].Id)
		}
	}

	// Push through one node, HEAD through the next as soon as the push
	// returns: the reading node may not have applied the push yet, and
	// must confirm the miss with the leader instead of answering 404.
	client := c.Client()
	for k := range 50 {
		via, other := k%3, (k+1)%3
		img := randomImage(t, 256, 1)
		tag := fmt.Sprintf("t%d", k)
		if err := remote.Write(ref(t, c, via, "push/head:"+tag), img, remoteOpts(ctx, c)...); err != nil {
			t.Fatalf("push %d through node %d: %v", k, via, err)
		}
		want := mustDigest(t, img).String()
		for _, r := range []string{tag, want} {
			status, got, err := headManifest(ctx, client, c.URL(other), "push/head", r)
			if err != nil || status != http.StatusOK || got != want {
				t.Fatalf("push %d through node %d, HEAD %s through node %d: status %d, digest %q, err %v; want 200 with %s",
					k, via, r, other, status, got, err, want)
			}
		}
	}
}

// TestClusterLeaderLoss kills the leader (a crash: no handoff, no goodbye)
// right after it committed writes that one survivor, cut off just before,
// never received, and keeps reading them through both survivors and through
// a gateway that reads strongly: no read may fail, give a false 404 or an
// old digest, and reads must have needed the new leader. Pushes then work
// again, and the old leader restarts and converges.
func TestClusterLeaderLoss(t *testing.T) {
	c, gw := leaderLossCluster(t)
	ctx := within(t, 4*time.Minute)
	out := runLeaderLoss(t, ctx, c, gw)
	t.Logf("leader loss: %s", out)
	if out.failed > 0 || out.falseNotFound > 0 || out.stale > 0 {
		t.Errorf("reads across the failover: %s", out)
	}
	// Every read of the lagging survivor's missing content, and every
	// strong read, had to wait for the new leader: if they succeeded
	// without it, the scenario did not test the failover.
	if out.lagged < 1 || out.readIndexes < 5 {
		t.Errorf("reads that needed the new leader: %d of the lagging replica's, %d read indexes served by the survivors; want at least 1 and 5",
			out.lagged, out.readIndexes)
	}

	// Push through the survivors until one push succeeds. Each attempt is
	// a single try (no client retries), so the time is the cluster's.
	survivors := []int{out.lagging, out.other}
	small := randomImage(t, 256, 1)
	start := time.Now()
	for attempts := 1; ; attempts++ {
		via := survivors[attempts%2]
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := remote.Write(ref(t, c, via, "loss/after:v1"), small, append(remoteOpts(pctx, c), noRetries...)...)
		cancel()
		if err == nil {
			t.Logf("first push after the kill took %d attempts, %v", attempts, time.Since(start).Round(time.Millisecond))
			break
		}
		if time.Since(start) > time.Minute {
			t.Fatalf("no push succeeded within a minute after the failover (%d attempts); last: %v", attempts, err)
		}
		waitFor(t, ctx, "retry pause", after(50*time.Millisecond))
	}

	restarted := time.Now()
	if err := c.Restart(out.leader); err != nil {
		t.Fatal(err)
	}
	// Ready means caught up with the new leader, which the node reaches
	// through gossip: a node killed soon after the cluster formed may not
	// have saved its peers, and then waits for them to find it.
	if err := c.Node(out.leader).WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("the killed node %d is ready %v after its restart began", out.leader, time.Since(restarted).Round(time.Millisecond))
	if err := c.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}
	if err := pullAndCompare(ctx, c, out.leader, "loss/after:v1", small); err != nil {
		t.Errorf("restarted node %d: %v", out.leader, err)
	}
}

// TestClusterLeaderLossNeedsForwarding is TestClusterLeaderLoss's negative
// control: with read indexes skipped (every read answered from the replica
// as it stands), the same scenario must report false 404s (the lagging
// node's local misses) and old digests (the gateway's strong reads), and
// no read may reach the new leader. If it does not, the real test's checks
// could not see a broken failover either.
func TestClusterLeaderLossNeedsForwarding(t *testing.T) {
	c, gw := leaderLossCluster(t)
	for _, i := range c.Running() {
		c.Node(i).SetSkipReadIndex(true)
	}
	ctx := within(t, 4*time.Minute)
	out := runLeaderLoss(t, ctx, c, gw)
	t.Logf("leader loss without read indexes: %s", out)
	if out.falseNotFound == 0 || out.stale == 0 {
		t.Errorf("without read indexes, reads across the failover must see false 404s and old digests: %s", out)
	}
	if out.readIndexes != 0 {
		t.Errorf("without read indexes, the survivors still served %d", out.readIndexes)
	}
}

// leaderLossCluster starts three nodes in one region and a standalone
// gateway that reads strongly. The gateway's link to each node goes
// through a proxy with latency, so that it prefers the node the scenario
// cuts off (see runLeaderLoss): node i is 10ms × ((leader + 2 - i) mod 3)
// away.
func leaderLossCluster(t *testing.T) (*clustertest.Cluster, *gateway.Standalone) {
	t.Helper()
	g := &dirGeo{regions: []node.RegionConfig{{Name: "local", Store: "file://" + t.TempDir()}}}
	g.c = clustertest.New(t, 3, clustertest.WithConfig(func(_ int, cfg *node.Config) {
		cfg.BlobDir = ""
		cfg.Regions = g.regions
		cfg.Region = "local"
	}))
	ctx := within(t, 2*time.Minute)
	leader := mustLeader(t, ctx, g.c)
	delays := make([]time.Duration, 3)
	for i := range delays {
		delays[i] = time.Duration((leader+2-i+3)%3) * 10 * time.Millisecond
	}
	gw := startGateway(t, g, "gw-strong", "local", newLatencyDialer(t, g.c, delays...), func(cfg *gateway.StandaloneConfig) {
		cfg.ReadConsistency = "strong"
	})
	waitPreferred(t, ctx, gw, g.c.Config((leader+2)%3).NodeID, 3)
	g.waitTopology(t, ctx)
	return g.c, gw
}

// leaderLossOutcome is what runLeaderLoss observed.
type leaderLossOutcome struct {
	leader, lagging, other int // the killed leader, the survivor cut off before the kill, the other survivor

	ok            int // reads with the content committed before the kill
	failed        int // reads that failed (error, 5xx)
	falseNotFound int // 404s for content committed before the kill
	stale         int // strong reads that named an older digest
	// lagged counts the successful reads through the lagging survivor of
	// content its replica did not hold when the read began.
	lagged int
	// readIndexes is how many read indexes the survivors served as leader
	// after the kill.
	readIndexes uint64
	first       []string
}

func (o *leaderLossOutcome) String() string {
	s := fmt.Sprintf("%d ok, %d failed, %d false 404s, %d old digests; %d reads through the lagging node %d needed the new leader; survivors served %d read indexes",
		o.ok, o.failed, o.falseNotFound, o.stale, o.lagged, o.lagging, o.readIndexes)
	if len(o.first) > 0 {
		s += "; first problems:\n  " + strings.Join(o.first, "\n  ")
	}
	return s
}

// What getManifestAt and classify mark: wrong answers, as opposed to
// failures.
var (
	errFalseNotFound = errors.New("404 for content committed before the read began")
	errStale         = errors.New("an older digest than the one committed before the read began")
)

// lossRead is one kind of read the scenario repeats: name for messages,
// key (repository and tag) to check a replica for, want the digest
// committed before the kill.
type lossRead struct {
	name      string
	repo, tag string
	want      string
	do        func(ctx context.Context) error
}

// runLeaderLoss runs the leader-loss scenario on c (fresh from
// leaderLossCluster) and reports what the reads saw:
//
//  1. A tag is set through the leader, and every node applies it. One
//     follower, the lagging one, is then cut off, and through the leader an
//     image is pushed, five tags are set and the first tag is moved; the
//     leader and the other follower commit them.
//  2. The leader is killed right after the last write returns, and three
//     readers start: one through each survivor (local reads) for the image
//     and the tags, and one through the gateway (strong reads, which it
//     sends to the lagging node, its nearest) for the moved tag and the
//     image. Then the lagging node is healed.
//
// Until the other survivor wins an election, which needs the lagging
// node's vote, no one can answer those reads from what it holds: a local
// miss must be confirmed, and a strong read must catch up, with the new
// leader.
func runLeaderLoss(t *testing.T, ctx context.Context, c *clustertest.Cluster, gw *gateway.Standalone) *leaderLossOutcome {
	t.Helper()
	leader := mustLeader(t, ctx, c)
	out := &leaderLossOutcome{leader: leader, lagging: (leader + 2) % 3, other: (leader + 1) % 3}
	// The gateway must send its reads to the node about to lag.
	waitPreferred(t, ctx, gw, c.Config(out.lagging).NodeID, 3)
	client := c.Client()
	const repo = "loss/app"
	blobs := pushBlobs(t, ctx, c, leader, repo)
	put := func(tag string, k int) string {
		t.Helper()
		body := manifestBody(blobs, k)
		want := digestOf(body)
		got, status, err := putManifest(ctx, client, c.URL(leader), repo, tag, body)
		if err != nil || status != http.StatusCreated || got != want {
			t.Fatalf("PUT %s:%s through the leader: status %d, digest %q, %v; want 201 with %s", repo, tag, status, got, err, want)
		}
		return want
	}
	put("moving", 100)
	if err := c.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}

	c.Cut(out.lagging)
	img := randomImage(t, 4096, 2)
	if err := remote.Write(ref(t, c, leader, "loss/image:v1"), img, remoteOpts(ctx, c)...); err != nil {
		t.Fatalf("push through the leader: %v", err)
	}
	var reads []lossRead
	for k := range 5 {
		tag := fmt.Sprintf("t%d", k)
		reads = append(reads, lossRead{name: repo + ":" + tag, repo: repo, tag: tag, want: put(tag, k)})
	}
	moved := put("moving", 101)
	c.Kill(leader)
	killed := time.Now()

	lagging := c.Node(out.lagging)
	for _, r := range slices.Concat(reads, []lossRead{{repo: repo, tag: "moving", want: moved}, {repo: "loss/image", tag: "v1", want: mustDigest(t, img).String()}}) {
		if d, err := lagging.Consensus().Store().Tag(ctx, r.repo, r.tag); err == nil && d == r.want {
			t.Fatalf("setup: the lagging node %d holds %s:%s, committed while it was cut off", out.lagging, r.repo, r.tag)
		}
	}
	var base uint64
	for _, i := range []int{out.lagging, out.other} {
		base += c.Node(i).Consensus().Stats().ReadIndexes
	}

	// The readers. Each read is a single try: a failure counts.
	manifestRead := func(host, repo, tag, want string) func(ctx context.Context) error {
		return func(ctx context.Context) error {
			return getManifestAt(ctx, client, "http://"+host, repo, tag, want)
		}
	}
	imageRead := func(host string) lossRead {
		return lossRead{name: "loss/image:v1", repo: "loss/image", tag: "v1", want: mustDigest(t, img).String(),
			do: func(ctx context.Context) error {
				return classify(pullFrom(ctx, c.Transport(), host, "loss/image:v1", img, noRetries...))
			}}
	}
	readers := make([][]lossRead, 3)
	for w, host := range []string{c.Host(out.lagging), c.Host(out.other)} {
		readers[w] = append(readers[w], imageRead(host))
		for _, r := range reads {
			r.do = manifestRead(host, r.repo, r.tag, r.want)
			readers[w] = append(readers[w], r)
		}
	}
	readers[2] = []lossRead{
		{name: "moving through the gateway", repo: repo, tag: "moving", want: moved, do: manifestRead(gw.HTTPAddr(), repo, "moving", moved)},
		imageRead(gw.HTTPAddr()),
	}

	var mu sync.Mutex
	started, done := make([]int, len(readers)), make([]int, len(readers))
	record := func(w int, r lossRead, lacking bool, err error, at time.Time) {
		mu.Lock()
		defer mu.Unlock()
		done[w]++
		switch {
		case err == nil:
			out.ok++
			if w == 0 && lacking {
				out.lagged++
			}
			return
		case errors.Is(err, errFalseNotFound):
			out.falseNotFound++
		case errors.Is(err, errStale):
			out.stale++
		default:
			out.failed++
		}
		if len(out.first) < 8 {
			out.first = append(out.first, fmt.Sprintf("%v after the kill, reader %d, %s: %v", at.Sub(killed).Round(time.Millisecond), w, r.name, err))
		}
	}
	rctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for w, rs := range readers {
		wg.Go(func() {
			for k := 0; rctx.Err() == nil; k++ {
				r := rs[k%len(rs)]
				lacking := false
				if w == 0 {
					d, err := lagging.Consensus().Store().Tag(rctx, r.repo, r.tag)
					lacking = err != nil || d != r.want
				}
				mu.Lock()
				started[w]++
				mu.Unlock()
				at := time.Now()
				dctx, cancel := context.WithTimeout(rctx, 30*time.Second)
				err := r.do(dctx)
				cancel()
				if rctx.Err() != nil {
					return // stopped mid-read: not an outcome
				}
				record(w, r, lacking, err, at)
			}
		})
	}
	defer func() { stop(); wg.Wait() }()
	all := func(counts []int, n int) func() bool {
		return func() bool {
			mu.Lock()
			defer mu.Unlock()
			for _, c := range counts {
				if c < n {
					return false
				}
			}
			return true
		}
	}
	// Heal once every reader's first read is under way, and has ended or
	// had time to reach its node: reads that wait for a leader wait for
	// the heal.
	waitFor(t, ctx, "every reader to start", all(started, 1))
	halfSecond := after(500 * time.Millisecond)
	waitFor(t, ctx, "every reader's first read", func() bool { return all(done, 1)() || halfSecond() })
	c.Heal(out.lagging)
	newLeader := mustLeader(t, ctx, c)
	t.Logf("node %d killed; node %d leads %v later", leader, newLeader, time.Since(killed).Round(time.Millisecond))
	// Keep reading until every reader has gone through its reads twice
	// after the failover.
	mu.Lock()
	goal := slices.Clone(done)
	for w := range goal {
		goal[w] += 2 * len(readers[w])
	}
	mu.Unlock()
	waitFor(t, ctx, "reads after the failover", func() bool {
		mu.Lock()
		defer mu.Unlock()
		for w := range goal {
			if done[w] < goal[w] {
				return false
			}
		}
		return true
	})
	stop()
	wg.Wait()
	for _, i := range []int{out.lagging, out.other} {
		out.readIndexes += c.Node(i).Consensus().Stats().ReadIndexes
	}
	out.readIndexes -= base
	return out
}

// classify marks a pull's 404 as a false one: everything the scenario
// reads was committed before.
func classify(err error) error {
	var te *transport.Error
	if errors.As(err, &te) && te.StatusCode == http.StatusNotFound {
		return fmt.Errorf("%w: %w", errFalseNotFound, err)
	}
	return err
}

// getManifestAt GETs repo:tag and checks that it answers the manifest whose
// bytes hash to want, marking a 404 errFalseNotFound and another digest
// errStale.
func getManifestAt(ctx context.Context, client *http.Client, base, repo, tag, want string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/v2/"+repo+"/manifests/"+tag, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", manifestAccept)
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return fmt.Errorf("%w: GET %s:%s: 404", errFalseNotFound, repo, tag)
	case resp.StatusCode != http.StatusOK:
		return fmt.Errorf("GET %s:%s: status %d: %s", repo, tag, resp.StatusCode, bytes.TrimSpace(body))
	case err != nil:
		return fmt.Errorf("GET %s:%s: body: %w", repo, tag, err)
	}
	got := digestOf(body)
	if got != want {
		return fmt.Errorf("%w: GET %s:%s: %s, want %s", errStale, repo, tag, got, want)
	}
	if h := resp.Header.Get("Docker-Content-Digest"); h != want {
		return fmt.Errorf("GET %s:%s: the body hashes to %s but Docker-Content-Digest says %q", repo, tag, want, h)
	}
	return nil
}

// TestClusterSnapshotCatchUp stops a follower while 10,000 tag updates are
// committed and the log is compacted behind them; the follower restarts
// and catches up by installing a snapshot.
func TestClusterSnapshotCatchUp(t *testing.T) {
	const updates, tags, workers = 10000, 8, 32
	c := clustertest.New(t, 3, clustertest.WithConfig(func(_ int, cfg *node.Config) {
		cfg.SnapshotThreshold = 128
		cfg.SnapshotInterval = 200 * time.Millisecond
		cfg.TrailingLogs = 256
	}))
	ctx := within(t, 4*time.Minute)
	leader := mustLeader(t, ctx, c)
	follower := (leader + 1) % 3
	running := []int{leader, (leader + 2) % 3}
	const repo = "snap/app"
	blobs := pushBlobs(t, ctx, c, leader, repo)

	if err := c.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}
	behind := c.Node(follower).Consensus().Stats().LastLogIndex
	c.Stop(follower)
	stateDir := filepath.Join(c.Config(follower).DataDir, "state")
	before, err := os.Stat(stateDir)
	if err != nil {
		t.Fatal(err)
	}

	client := c.Client()
	jobs := make(chan int)
	var retries, failures atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	began := time.Now()
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range jobs {
				body := manifestBody(blobs, k)
				tag := fmt.Sprintf("t%d", k%tags)
				var err error
				for attempt := range 5 {
					via := running[(k+attempt)%2]
					var status int
					_, status, err = putManifest(ctx, client, c.URL(via), repo, tag, body)
					if err == nil && status != http.StatusCreated {
						err = fmt.Errorf("PUT %s through node %d: status %d", tag, via, status)
					}
					if err == nil || (status != 0 && status < 500) {
						break
					}
					retries.Add(1)
				}
				if err != nil {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, err)
				}
			}
		}()
	}
	for k := range updates {
		jobs <- k
	}
	close(jobs)
	wg.Wait()
	took := time.Since(began)
	t.Logf("%d tag updates with %d writers in %v (%.0f/s), %d retried", updates, workers, took.Round(time.Millisecond),
		float64(updates)/took.Seconds(), retries.Load())
	if n := failures.Load(); n > 0 {
		t.Fatalf("%d tag updates failed; first: %v", n, firstErr.Load())
	}

	// The leader must have compacted its log past what the follower holds,
	// so that only a snapshot can bring the follower up to date.
	var snapIndex uint64
	waitFor(t, ctx, "a leader snapshot past the stopped follower's log", func() bool {
		l, err := c.Leader(ctx)
		if err != nil {
			return false
		}
		snapIndex, _ = strconv.ParseUint(c.Node(l).Consensus().Raft().Stats()["last_snapshot_index"], 10, 64)
		return snapIndex > behind
	})

	if err := c.Restart(follower); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}
	// Installing a snapshot swaps the state store: the restore builds a new
	// directory beside the live one and renames it into place, so the
	// follower's state directory is no longer the one it stopped with.
	// Catching up from the log would have kept it. (The old directory
	// existed while the new one was created, so they cannot share an inode.)
	after, err := os.Stat(stateDir)
	if err != nil {
		t.Fatal(err)
	}
	if os.SameFile(before, after) {
		t.Errorf("follower node %d caught up without installing a snapshot (its log ended at %d, the leader's snapshot is at %d)",
			follower, behind, snapIndex)
	}
	followerSnap, _ := strconv.ParseUint(c.Node(follower).Consensus().Raft().Stats()["last_snapshot_index"], 10, 64)
	t.Logf("follower's log ended at index %d; leader snapshot at %d; follower's snapshot now at %d", behind, snapIndex, followerSnap)

	l := mustLeader(t, ctx, c)
	for k := range tags {
		tag := fmt.Sprintf("t%d", k)
		want, err := c.Node(l).Consensus().Store().Tag(ctx, repo, tag)
		if err != nil {
			t.Fatalf("leader tag %s: %v", tag, err)
		}
		got, err := c.Node(follower).Consensus().Store().Tag(ctx, repo, tag)
		if err != nil || got != want {
			t.Errorf("follower tag %s = %q, %v; leader has %q", tag, got, err, want)
		}
		status, served, err := headManifest(ctx, client, c.URL(follower), repo, tag)
		if err != nil || status != http.StatusOK || served != want {
			t.Errorf("HEAD %s through follower: status %d, digest %q, err %v; want %q", tag, status, served, err, want)
		}
	}
}

// TestClusterReadAfterSnapshotInstall: a node that caught up from a
// snapshot whose last entries are Raft's own (a new leader's no-op and
// barrier), not commands, still confirms a local miss with the leader and
// answers 404 at once, without waiting for the next write.
func TestClusterReadAfterSnapshotInstall(t *testing.T) {
	c := clustertest.New(t, 3, clustertest.WithConfig(func(_ int, cfg *node.Config) {
		cfg.SnapshotThreshold = 1 << 40 // snapshots only when the test asks
		cfg.TrailingLogs = 0
		cfg.ApplyTimeout = 5 * time.Second
	}))
	ctx := within(t, 2*time.Minute)
	leader := mustLeader(t, ctx, c)
	follower, next := (leader+1)%3, (leader+2)%3
	const repo = "install/app"
	blobs := pushBlobs(t, ctx, c, leader, repo)
	if err := c.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}
	c.Stop(follower)
	client := c.Client()
	if _, status, err := putManifest(ctx, client, c.URL(leader), repo, "v1", manifestBody(blobs, 1)); err != nil || status != http.StatusCreated {
		t.Fatalf("PUT: status %d, %v", status, err)
	}

	// A new leader's term begins with entries the state machine never sees.
	resp, err := adminClient(t, c, leader).TransferLeadership(ctx, &pb.TransferLeadershipRequest{Id: c.Config(next).NodeID})
	if err != nil || resp.Result.Err() != nil {
		t.Fatalf("TransferLeadership: %v, %v", err, resp.GetResult())
	}
	waitFor(t, ctx, "node "+strconv.Itoa(next)+" to lead", func() bool {
		l, err := c.Leader(ctx)
		return err == nil && l == next
	})
	if err := c.Node(next).WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Node(next).Consensus().Raft().Snapshot().Error(); err != nil {
		t.Fatalf("snapshot: %v", err)
	}

	stateDir := filepath.Join(c.Config(follower).DataDir, "state")
	before, err := os.Stat(stateDir)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Restart(follower); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}
	if after, err := os.Stat(stateDir); err != nil || os.SameFile(before, after) {
		t.Fatalf("the follower did not install a snapshot (%v)", err)
	}
	for _, i := range []int{follower, next} {
		began := time.Now()
		status, _, err := headManifest(ctx, client, c.URL(i), repo, "missing")
		if err != nil || status != http.StatusNotFound {
			t.Errorf("HEAD of a missing tag through node %d: status %d after %v, %v; want 404", i, status, time.Since(began).Round(time.Millisecond), err)
		}
	}
}

// TestClusterBadInput checks refusals an operator can run into.
func TestClusterBadInput(t *testing.T) {
	ctx := within(t, 3*time.Minute)
	one := clustertest.New(t, 1)

	t.Run("another cluster id", func(t *testing.T) {
		_, err := one.Add(func(cfg *node.Config) {
			cfg.ClusterID = "another-cluster"
			cfg.JoinTimeout = 15 * time.Second
		})
		if err == nil {
			t.Fatal("a node of another cluster joined")
		}
		if !errors.Is(err, membership.ErrClusterMismatch) || !strings.Contains(err.Error(), "cluster id") {
			t.Errorf("Start: %v; want a cluster id mismatch", err)
		}
		if err := one.WaitVoters(ctx, 1); err != nil {
			t.Error(err)
		}
	})

	t.Run("remove the last voter", func(t *testing.T) {
		resp, err := adminClient(t, one, 0).RemoveServer(ctx, &pb.RemoveServerRequest{Id: one.Config(0).NodeID})
		if err != nil {
			t.Fatalf("RemoveServer: %v", err)
		}
		if r := resp.Result; r.GetCode() != pb.Code_CODE_INVALID_ARGUMENT || !strings.Contains(r.GetDetail(), "last voter") {
			t.Errorf("RemoveServer of the last voter: %v; want invalid argument naming the last voter", r)
		}
		servers, err := one.Node(0).Consensus().Servers()
		if err != nil || len(servers) != 1 {
			t.Errorf("configuration after a refused removal: %+v, %v", servers, err)
		}
	})

	three := clustertest.New(t, 3)

	t.Run("transfer leadership", func(t *testing.T) {
		leader := mustLeader(t, ctx, three)
		target, via := (leader+1)%3, (leader+2)%3
		resp, err := adminClient(t, three, via).TransferLeadership(ctx, &pb.TransferLeadershipRequest{Id: three.Config(target).NodeID})
		if err != nil {
			t.Fatalf("TransferLeadership: %v", err)
		}
		if err := resp.Result.Err(); err != nil {
			t.Fatalf("TransferLeadership: %v", err)
		}
		if want := three.Config(target).NodeID; resp.NewLeaderId != want {
			t.Errorf("TransferLeadership answered new leader %q, want %q", resp.NewLeaderId, want)
		}
		waitFor(t, ctx, "leadership to move to node "+strconv.Itoa(target), func() bool {
			l, err := three.Leader(ctx)
			return err == nil && l == target
		})
	})

	t.Run("remove a stopped follower", func(t *testing.T) {
		leader := mustLeader(t, ctx, three)
		gone, via := (leader+1)%3, (leader+2)%3
		three.Stop(gone)
		resp, err := adminClient(t, three, via).RemoveServer(ctx, &pb.RemoveServerRequest{Id: three.Config(gone).NodeID})
		if err != nil {
			t.Fatalf("RemoveServer: %v", err)
		}
		if err := resp.Result.Err(); err != nil {
			t.Fatalf("RemoveServer: %v", err)
		}
		if err := three.WaitVoters(ctx, 2); err != nil {
			t.Fatal(err)
		}
		servers, _ := three.Node(leader).Consensus().Servers()
		for _, s := range servers {
			if s.ID == three.Config(gone).NodeID {
				t.Errorf("removed node still in the configuration: %+v", servers)
			}
		}
		if err := remote.Write(ref(t, three, via, "removed/after:v1"), randomImage(t, 256, 1), remoteOpts(ctx, three)...); err != nil {
			t.Errorf("push after the removal: %v", err)
		}
	})
}

// TestClusterAddressChange restarts a follower on a new Raft port: the
// leader updates its address in the configuration and the cluster still
// converges.
func TestClusterAddressChange(t *testing.T) {
	c := clustertest.New(t, 3)
	ctx := within(t, 2*time.Minute)
	leader := mustLeader(t, ctx, c)
	moved := (leader + 1) % 3
	old := c.Config(moved).RaftAddr
	c.Stop(moved)
	if err := c.RestartWith(moved, func(cfg *node.Config) { cfg.RaftAddr = "127.0.0.1:0" }); err != nil {
		t.Fatal(err)
	}
	addr := c.Config(moved).RaftAddr
	if addr == old {
		t.Fatalf("node %d came back on its old Raft address %s", moved, old)
	}
	id := c.Config(moved).NodeID
	waitFor(t, ctx, "the leader to record "+id+" at "+addr, func() bool {
		l, err := c.Leader(ctx)
		if err != nil {
			return false
		}
		servers, _ := c.Node(l).Consensus().Servers()
		for _, s := range servers {
			if s.ID == id {
				return s.Address == addr
			}
		}
		return false
	})
	img := randomImage(t, 1024, 1)
	if err := remote.Write(ref(t, c, moved, "moved/app:v1"), img, remoteOpts(ctx, c)...); err != nil {
		t.Fatalf("push through the moved node: %v", err)
	}
	if err := c.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if err := pullAndCompare(ctx, c, i, "moved/app:v1", img); err != nil {
			t.Errorf("node %d: %v", i, err)
		}
	}
}

// TestClusterBootstrapRestart restarts the node that bootstrapped the
// cluster (it has no join address) without the list of peers it saves while
// running, as if it stopped before saving it: the others bring it back into
// gossip, so it can forward writes again.
func TestClusterBootstrapRestart(t *testing.T) {
	c := clustertest.New(t, 3)
	ctx := within(t, 2*time.Minute)
	c.Stop(0)
	if err := os.Remove(filepath.Join(c.Config(0).DataDir, "peers.json")); err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	if err := c.Restart(0); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}
	status := adminClient(t, c, 0)
	waitFor(t, ctx, "node 0 to see every member alive in gossip", func() bool {
		st, err := status.ClusterStatus(ctx, &pb.ClusterStatusRequest{})
		if err != nil || len(st.Members) != 3 {
			return false
		}
		for _, m := range st.Members {
			if m.Health != "alive" {
				return false
			}
		}
		return true
	})
	img := randomImage(t, 512, 1)
	pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := remote.Write(ref(t, c, 0, "bootstrap/app:v1"), img, remoteOpts(pctx, c)...); err != nil {
		t.Fatalf("push through the restarted bootstrap node: %v", err)
	}
	if err := pullAndCompare(ctx, c, 1, "bootstrap/app:v1", img); err != nil {
		t.Error(err)
	}
}

// TestClusterRecover loses every node, rewrites node 0's configuration to
// itself alone (the disaster-recovery path) and starts it: it leads and
// serves what was pushed before.
func TestClusterRecover(t *testing.T) {
	c := clustertest.New(t, 3)
	ctx := within(t, 2*time.Minute)
	img := randomImage(t, 2048, 2)
	if err := remote.Write(ref(t, c, 1, "recover/app:v1"), img, remoteOpts(ctx, c)...); err != nil {
		t.Fatalf("push: %v", err)
	}
	if err := c.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}
	for i := 2; i >= 0; i-- {
		c.Stop(i)
	}

	cfg0 := c.Config(0)
	cc := consensus.DefaultConfig()
	cc.NodeID, cc.DataDir = cfg0.NodeID, cfg0.DataDir
	cc.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	if err := consensus.Recover(cc, []consensus.Server{{ID: cfg0.NodeID, Address: cfg0.RaftAddr, Voter: true}}); err != nil {
		t.Fatalf("Recover: %v", err)
	}
	if err := c.Restart(0); err != nil {
		t.Fatal(err)
	}
	if l := mustLeader(t, ctx, c); l != 0 {
		t.Fatalf("leader is node %d, want the recovered node 0", l)
	}
	if err := c.Node(0).WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitVoters(ctx, 1); err != nil {
		t.Fatal(err)
	}
	for _, r := range []string{"recover/app:v1", "recover/app@" + mustDigest(t, img).String()} {
		if err := pullAndCompare(ctx, c, 0, r, img); err != nil {
			t.Errorf("recovered node: %v", err)
		}
	}
	if err := remote.Write(ref(t, c, 0, "recover/app:v2"), randomImage(t, 256, 1), remoteOpts(ctx, c)...); err != nil {
		t.Errorf("push to the recovered node: %v", err)
	}
}

// TestClusterStrongReads: with read_consistency strong, a tag updated
// through one node reads back through another at once as the manifest the
// client wrote.
func TestClusterStrongReads(t *testing.T) {
	c := clustertest.New(t, 3, clustertest.WithConfig(func(_ int, cfg *node.Config) {
		cfg.ReadConsistency = "strong"
	}))
	ctx := within(t, 2*time.Minute)
	const repo = "strong/app"
	blobs := pushBlobs(t, ctx, c, 0, repo)
	client := c.Client()
	for k := range 50 {
		via, reader := k%3, (k+1)%3
		body := manifestBody(blobs, k)
		want := digestOf(body)
		got, status, err := putManifest(ctx, client, c.URL(via), repo, "latest", body)
		if err != nil || status != http.StatusCreated || got != want {
			t.Fatalf("update %d through node %d: status %d, digest %q, %v; want 201 with %s", k, via, status, got, err, want)
		}
		// The digest the client computed, and the body read back must hash
		// to it: a header copied from the write proves nothing.
		if err := getManifestAt(ctx, client, c.URL(reader), repo, "latest", want); err != nil {
			t.Fatalf("update %d through node %d, read through node %d: %v", k, via, reader, err)
		}
	}
}

// TestClusterReadsAfterLostApplies: a node whose crash lost the last
// applies of its state store (the store is not synced per apply; the
// synced Raft log still holds them) answers reads, from its first one after
// the restart, with every write it acknowledged before the crash: a moved
// tag names its new digest and a new tag is found. Its reads wait until it
// has caught up with the leader.
func TestClusterReadsAfterLostApplies(t *testing.T) {
	c := clustertest.New(t, 1, clustertest.WithConfig(func(_ int, cfg *node.Config) {
		// A slow election keeps the restarted node serving for seconds
		// before it replays its log: the window its reads must not show.
		cfg.RaftHeartbeatTimeout = 2 * time.Second
		cfg.RaftElectionTimeout = 2 * time.Second
	}))
	ctx := within(t, 2*time.Minute)
	const repo = "lost/app"
	blobs := pushBlobs(t, ctx, c, 0, repo)
	client := c.Client()
	put := func(tag string, k int) string {
		t.Helper()
		body := manifestBody(blobs, k)
		want := digestOf(body)
		if got, status, err := putManifest(ctx, client, c.URL(0), repo, tag, body); err != nil || status != http.StatusCreated || got != want {
			t.Fatalf("PUT %s:%s: status %d, digest %q, %v; want 201 with %s", repo, tag, status, got, err, want)
		}
		return want
	}
	put("moved", 0)

	// Keep the store as it is now: after the crash, it goes back to this,
	// as if the writes below had been applied only in memory.
	c.Stop(0)
	state := filepath.Join(c.Config(0).DataDir, "state")
	saved := filepath.Join(t.TempDir(), "state")
	if err := os.CopyFS(saved, os.DirFS(state)); err != nil {
		t.Fatal(err)
	}
	if err := c.Restart(0); err != nil {
		t.Fatal(err)
	}
	if err := c.Node(0).WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"moved": put("moved", 1), "added": put("added", 2)}
	c.Kill(0)
	if err := os.RemoveAll(state); err != nil {
		t.Fatal(err)
	}
	if err := os.CopyFS(state, os.DirFS(saved)); err != nil {
		t.Fatal(err)
	}

	if err := c.Restart(0); err != nil {
		t.Fatal(err)
	}
	if d, err := c.Node(0).Consensus().Store().Tag(ctx, repo, "added"); err == nil {
		t.Fatalf("setup: the restarted node replayed its log before the first read (added is %s already)", d)
	}
	for _, tag := range []string{"moved", "added"} {
		if err := getManifestAt(ctx, client, c.URL(0), repo, tag, want[tag]); err != nil {
			t.Errorf("first reads after the restart: %v", err)
		}
	}
}

// TestClusterCut cuts a follower off: the majority keeps accepting writes,
// the cut node refuses them and gives no false 404, and after healing the
// cluster converges.
func TestClusterCut(t *testing.T) {
	c := clustertest.New(t, 3, clustertest.WithConfig(func(_ int, cfg *node.Config) {
		cfg.ApplyTimeout = 3 * time.Second
	}))
	ctx := within(t, 2*time.Minute)
	leader := mustLeader(t, ctx, c)
	cut := (leader + 1) % 3
	const repo = "cut/app"
	blobs := pushBlobs(t, ctx, c, leader, repo)
	if err := c.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}
	client := c.Client()

	c.Cut(cut)
	want, status, err := putManifest(ctx, client, c.URL(leader), repo, "majority", manifestBody(blobs, 1))
	if err != nil || status != http.StatusCreated {
		t.Fatalf("write through the majority: status %d, %v", status, err)
	}
	// The other follower applies the write; the cut node must not get it.
	other := (leader + 2) % 3
	waitFor(t, ctx, "the write to reach the other follower", func() bool {
		d, err := c.Node(other).Consensus().Store().Tag(ctx, repo, "majority")
		return err == nil && d == want
	})
	if d, err := c.Node(cut).Consensus().Store().Tag(ctx, repo, "majority"); err == nil {
		t.Fatalf("the cut node received a write committed during the cut (%s)", d)
	}
	_, status, err = putManifest(ctx, client, c.URL(cut), repo, "minority", manifestBody(blobs, 2))
	if err != nil || status != http.StatusServiceUnavailable {
		t.Errorf("write through the cut node: status %d, %v; want 503", status, err)
	}
	status, _, err = headManifest(ctx, client, c.URL(cut), repo, "majority")
	if err != nil || status == http.StatusNotFound {
		t.Errorf("HEAD through the cut node of a tag it has not seen: status %d, %v; want no 404", status, err)
	}

	c.Heal(cut)
	if err := c.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}
	status, got, err := headManifest(ctx, client, c.URL(cut), repo, "majority")
	if err != nil || status != http.StatusOK || got != want {
		t.Errorf("HEAD through the healed node: status %d, digest %q, %v; want 200 with %s", status, got, err, want)
	}
	status, _, err = headManifest(ctx, client, c.URL(leader), repo, "minority")
	if err != nil || status != http.StatusNotFound {
		t.Errorf("the write refused during the cut: HEAD status %d, %v; want 404", status, err)
	}
}

// within returns a context that ends after d or with the test.
func within(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func mustLeader(t *testing.T, ctx context.Context, c *clustertest.Cluster) int {
	t.Helper()
	l, err := c.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// waitFor polls cond until it holds, failing the test when ctx ends.
func waitFor(t *testing.T, ctx context.Context, what string, cond func() bool) {
	t.Helper()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: %v", what, ctx.Err())
		case <-tick.C:
		}
	}
}

// after is a waitFor condition that holds once d has passed.
func after(d time.Duration) func() bool {
	deadline := time.Now().Add(d)
	return func() bool { return !time.Now().Before(deadline) }
}

// adminConn is a gRPC connection to node i whose calls log in as the
// harness's admin, closed with the test.
func adminConn(t *testing.T, c *clustertest.Cluster, i int) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(c.Config(i).GRPCAddr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithPerRPCCredentials(admin.Credentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// adminClient is the Admin service of node i, called as the harness's
// admin.
func adminClient(t *testing.T, c *clustertest.Cluster, i int) pb.AdminClient {
	t.Helper()
	return pb.NewAdminClient(adminConn(t, c, i))
}

func ref(t *testing.T, c *clustertest.Cluster, i int, s string) name.Reference {
	t.Helper()
	r, err := name.ParseReference(c.Host(i)+"/"+s, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func remoteOpts(ctx context.Context, c *clustertest.Cluster) []remote.Option {
	return []remote.Option{remote.WithContext(ctx), remote.WithTransport(c.Transport())}
}

// noRetries makes every go-containerregistry call a single try, so a
// failure is counted rather than hidden by the client's own retries.
var noRetries = []remote.Option{
	remote.WithRetryBackoff(remote.Backoff{Steps: 1}),
	remote.WithRetryStatusCodes(),
	remote.WithRetryPredicate(func(error) bool { return false }),
}

func randomImage(t *testing.T, size, layers int64) v1.Image {
	t.Helper()
	img, err := random.Image(size, layers)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func mustDigest(t *testing.T, img v1.Image) v1.Hash {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// pullAndCompare pulls s through node i and compares its digest and every
// layer's bytes with want.
func pullAndCompare(ctx context.Context, c *clustertest.Cluster, i int, s string, want v1.Image, opts ...remote.Option) error {
	r, err := name.ParseReference(c.Host(i)+"/"+s, name.Insecure)
	if err != nil {
		return err
	}
	got, err := remote.Image(r, append(remoteOpts(ctx, c), opts...)...)
	if err != nil {
		return fmt.Errorf("pull %s: %w", s, err)
	}
	gd, err := got.Digest()
	if err != nil {
		return err
	}
	if wd, _ := want.Digest(); gd != wd {
		return fmt.Errorf("pull %s: digest %s, want %s", s, gd, wd)
	}
	layers, err := want.Layers()
	if err != nil {
		return err
	}
	for _, wl := range layers {
		d, err := wl.Digest()
		if err != nil {
			return err
		}
		gl, err := got.LayerByDigest(d)
		if err != nil {
			return fmt.Errorf("pull %s: layer %s: %w", s, d, err)
		}
		wb, err := readAll(wl.Compressed)
		if err != nil {
			return err
		}
		gb, err := readAll(gl.Compressed)
		if err != nil {
			return fmt.Errorf("pull %s: layer %s: %w", s, d, err)
		}
		if !bytes.Equal(wb, gb) {
			return fmt.Errorf("pull %s: layer %s: %d bytes differ from the %d pushed", s, d, len(gb), len(wb))
		}
	}
	return nil
}

func readAll(open func() (io.ReadCloser, error)) ([]byte, error) {
	rc, err := open()
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	return io.ReadAll(rc)
}

// manifestBlobs are a config and a layer pushed once, for hand-made
// manifests.
type manifestBlobs struct {
	config, layer v1.Descriptor
}

// pushBlobs pushes a config blob and a layer into repo through node i.
func pushBlobs(t *testing.T, ctx context.Context, c *clustertest.Cluster, i int, repo string) manifestBlobs {
	t.Helper()
	r, err := name.NewRepository(c.Host(i)+"/"+repo, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	var out manifestBlobs
	for _, b := range []struct {
		l v1.Layer
		d *v1.Descriptor
	}{
		{static.NewLayer([]byte(`{"architecture":"amd64","os":"linux"}`), types.OCIConfigJSON), &out.config},
		{static.NewLayer([]byte("a small layer"), types.OCILayer), &out.layer},
	} {
		if err := remote.WriteLayer(r, b.l, remoteOpts(ctx, c)...); err != nil {
			t.Fatalf("push blob: %v", err)
		}
		d, _ := b.l.Digest()
		size, _ := b.l.Size()
		mt, _ := b.l.MediaType()
		*b.d = v1.Descriptor{MediaType: mt, Digest: d, Size: size}
	}
	return out
}

// manifestBody is a small image manifest over b, distinct for each k.
func manifestBody(b manifestBlobs, k int) []byte {
	return fmt.Appendf(nil, `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",`+
		`"config":{"mediaType":%q,"digest":%q,"size":%d},`+
		`"layers":[{"mediaType":%q,"digest":%q,"size":%d}],"annotations":{"k":"%d"}}`,
		b.config.MediaType, b.config.Digest, b.config.Size, b.layer.MediaType, b.layer.Digest, b.layer.Size, k)
}

// putManifest PUTs an OCI image manifest and returns the digest the
// registry answered with and the status.
func putManifest(ctx context.Context, client *http.Client, base, repo, reference string, body []byte) (string, int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, base+"/v2/"+repo+"/manifests/"+reference, bytes.NewReader(body))
	if err != nil {
		return "", 0, err
	}
	req.Header.Set("Content-Type", string(types.OCIManifestSchema1))
	resp, err := client.Do(req)
	if err != nil {
		return "", 0, err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	return resp.Header.Get("Docker-Content-Digest"), resp.StatusCode, nil
}

// headManifest HEADs a manifest and returns the status and digest.
func headManifest(ctx context.Context, client *http.Client, base, repo, reference string) (int, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodHead, base+"/v2/"+repo+"/manifests/"+reference, nil)
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Accept", string(types.OCIManifestSchema1))
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", err
	}
	resp.Body.Close()
	return resp.StatusCode, resp.Header.Get("Docker-Content-Digest"), nil
}
