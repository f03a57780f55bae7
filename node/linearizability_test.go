package node_test

import (
	"context"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"

	"github.com/meridian-registry/meridian/node"
	"github.com/meridian-registry/meridian/node/clustertest"
)

const (
	// linearNodes is the size of the clusters the register workload runs on.
	linearNodes = 3
	// linearApplyTimeout bounds how long a node waits for a leader or a
	// read index before it answers 503: short, so that reads through a cut
	// node give up within the cut, long enough for an election on a loaded
	// machine.
	linearApplyTimeout = 4 * time.Second
	// linearCheckTimeout bounds porcupine; running out of it fails the test.
	linearCheckTimeout = 60 * time.Second
	// linearRepo holds the workload's tags.
	linearRepo = "linear/app"
	// probeTag is written only by the fault schedule, so what a read of it
	// may return is known exactly.
	probeTag = "probe"
)

// TestStrongReadsLinearizable records a history of concurrent tag writes
// and reads through every node of a cluster with read_consistency strong,
// while leadership moves twice and one node is cut off from the others'
// Raft and gRPC (clients still reach it), and checks the history for
// linearizability: each tag is a register holding a manifest digest.
func TestStrongReadsLinearizable(t *testing.T) {
	// First prove the checker wiring: a history with a stale read must be
	// rejected, or a passing run below would mean nothing.
	t.Run("checker rejects a stale read", testTagRegisterChecker)

	const (
		// minAnswered is how many reads each node must answer (200 or 404):
		// a node that only says 503 would make the history vacuous.
		minAnswered = 15
		// minAnsweredAfterHeal is how many of them the cut node must
		// answer once healed: a node that never recovers fails.
		minAnsweredAfterHeal = 5
		// minAcked is how many writes through each node must be
		// acknowledged.
		minAcked = 5
		// maxDropShare bounds the reads that observed nothing (503 or no
		// answer): those through the cut node while it is cut, and a few
		// during elections.
		maxDropShare = 0.2
	)
	w := tagWorkload{consistency: "strong", transfers: 2, cut: true, clients: 6, seed: linearSeed(t)}
	run := runTagWorkload(t, w)
	if t.Failed() {
		return
	}
	run.log(t)

	if run.leaderChanges < w.transfers {
		t.Errorf("leadership moved %d times, want %d transfers", run.leaderChanges, w.transfers)
	}
	if run.opsDuringCut == 0 {
		t.Errorf("no client operation went through node %d while it was cut: the cut tested nothing", run.cutNode)
	}
	if run.readsAfterHeal < minAnsweredAfterHeal {
		t.Errorf("node %d answered %d strong reads after the heal, want at least %d", run.cutNode, run.readsAfterHeal, minAnsweredAfterHeal)
	}
	var reads, dropped int
	for i, n := range run.perNode {
		reads += n.reads + n.absent + n.dropped
		dropped += n.dropped
		if n.reads+n.absent < minAnswered {
			t.Errorf("node %d answered %d strong reads (%d dropped), want at least %d", i, n.reads+n.absent, n.dropped, minAnswered)
		}
		if n.writes < minAcked {
			t.Errorf("node %d acknowledged %d writes (%d of unknown outcome), want at least %d", i, n.writes, n.unknownWrites, minAcked)
		}
	}
	if share := float64(dropped) / float64(reads); share > maxDropShare {
		t.Errorf("%d of %d reads (%.0f%%) were dropped (503 or no answer), want at most %.0f%%", dropped, reads, 100*share, 100*maxDropShare)
	}
	checkTagHistory(t, run.history)
}

// TestLocalReadsNotLinearizableUnderCut is the negative control of
// TestStrongReadsLinearizable: the same workload with read_consistency
// local, where a cut node serves its own stale replica. The fault schedule
// makes the staleness certain, not likely: the probe tag is rewritten
// through the majority and acknowledged while the node is cut, then read
// through the cut node, which cannot have the new value. The checker must
// reject that history, or it could not catch the bug the positive test is
// about.
func TestLocalReadsNotLinearizableUnderCut(t *testing.T) {
	w := tagWorkload{consistency: "local", cut: true, clients: 6, seed: linearSeed(t)}
	run := runTagWorkload(t, w)
	if t.Failed() {
		return
	}
	run.log(t)
	if p := run.probe; p.status != http.StatusOK || p.got != p.before {
		t.Fatalf("cut node %d answered the probe read with status %d and %s, want 200 and the overwritten %s: the workload did not produce the stale read it is meant to",
			run.cutNode, p.status, shortDigest(p.got), shortDigest(p.before))
	}
	start := time.Now()
	res := porcupine.CheckOperationsTimeout(tagRegisterModel, run.history, linearCheckTimeout)
	t.Logf("porcupine: %s in %v", checkResultName(res), time.Since(start).Round(time.Millisecond))
	if res != porcupine.Illegal {
		t.Errorf("porcupine says %s for a history with a stale read through cut node %d, want %s",
			checkResultName(res), run.cutNode, checkResultName(porcupine.Illegal))
	}
}

// linearSeed draws the seed of a run's operation mix and fault timeline,
// or takes MERIDIAN_LINEAR_SEED to draw the same ones again (the timing of
// a live cluster still differs from run to run).
func linearSeed(t *testing.T) uint64 {
	seed := rand.Uint64()
	if s := os.Getenv("MERIDIAN_LINEAR_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatalf("MERIDIAN_LINEAR_SEED: %v", err)
		}
	}
	t.Logf("seed %d (MERIDIAN_LINEAR_SEED)", seed)
	return seed
}

// tagWorkload describes one run of the register workload: clients write
// and read tags through every node while a fault schedule runs.
type tagWorkload struct {
	consistency string // every node's read_consistency
	transfers   int    // leadership transfers
	cut         bool   // cut one node off for a while, and probe it
	clients     int    // concurrent clients, spread over the nodes
	seed        uint64 // draws the operation mix and the fault timeline
}

// tagWorkloadRun is what a run produced.
type tagWorkloadRun struct {
	history []porcupine.Operation
	perNode []nodeCounts
	took    time.Duration
	// leaderChanges counts the transfers after which another node led.
	leaderChanges int
	// cutNode is the node that was cut (-1 if none), from cutFrom to cutTo
	// on the history's clock; opsDuringCut counts the clients' operations
	// through it that overlapped the cut, answered or not, and
	// readsAfterHeal the reads through it that began after the heal and
	// were answered.
	cutNode        int
	cutFrom, cutTo int64
	opsDuringCut   int
	readsAfterHeal int
	probe          probeResult
}

// nodeCounts counts the clients' operations through one node.
type nodeCounts struct {
	writes, unknownWrites, reads, absent, dropped int
}

// probeResult is what the cut node answered to a read of the probe tag
// after it had been rewritten through the majority.
type probeResult struct {
	before, after string // digest before the cut, and the acknowledged one written during it
	status        int    // 0 when no answer came
	got           string // the digest served with a 200
}

func (r tagWorkloadRun) log(t *testing.T) {
	t.Helper()
	var total nodeCounts
	for i, n := range r.perNode {
		t.Logf("through node %d: %d writes acknowledged, %d of unknown outcome; %d reads of a digest, %d of no tag, %d dropped",
			i, n.writes, n.unknownWrites, n.reads, n.absent, n.dropped)
		total.writes += n.writes
		total.reads += n.reads
		total.absent += n.absent
		total.dropped += n.dropped
	}
	t.Logf("%d operations recorded in %v (%d acknowledged writes, %d answered reads, %d dropped reads); %d leader changes by transfer; node %d cut, %d client operations through it during the cut, %d reads answered by it after the heal",
		len(r.history), r.took.Round(time.Millisecond), total.writes, total.reads+total.absent, total.dropped,
		r.leaderChanges, r.cutNode, r.opsDuringCut, r.readsAfterHeal)
	if r.cutNode >= 0 {
		t.Logf("probe: %s before the cut, %s acknowledged during it; the cut node answered status %d with %s",
			shortDigest(r.probe.before), shortDigest(r.probe.after), r.probe.status, shortDigest(r.probe.got))
	}
}

// runTagWorkload starts a cluster configured for w, runs w on it and
// returns the history. Any answer that breaks the protocol (a body that
// does not hash to its digest header, an unexpected status) fails t.
func runTagWorkload(t *testing.T, w tagWorkload) tagWorkloadRun {
	t.Helper()
	c := clustertest.New(t, linearNodes, clustertest.WithConfig(func(_ int, cfg *node.Config) {
		cfg.ReadConsistency = w.consistency
		cfg.ApplyTimeout = linearApplyTimeout
	}))
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	if err := c.WaitVoters(ctx, linearNodes); err != nil {
		t.Fatal(err)
	}
	reg := rawRegistry{c: c, client: c.Client()}
	leader, err := c.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	img, err := reg.pushSmallImage(ctx, leader, linearRepo)
	if err != nil {
		t.Fatal(err)
	}

	rec := &tagRecorder{reg: reg, img: img, base: time.Now(), perNode: make([]nodeCounts, linearNodes)}
	// A client that sees a broken answer ends the run at once, instead of
	// leaving the fault schedule waiting for its progress.
	ctx, abort := context.WithCancelCause(ctx)
	defer abort(nil)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for client := range w.clients {
		rng := rand.New(rand.NewPCG(w.seed, uint64(client)))
		wg.Go(func() {
			if err := rec.client(ctx, client, client%linearNodes, rng, stop); err != nil {
				t.Error(err)
				abort(err)
			}
		})
	}
	s := &faultSchedule{
		t: t, c: c, rec: rec,
		rng:    rand.New(rand.NewPCG(w.seed, math.MaxUint64)),
		client: w.clients,
		run:    tagWorkloadRun{cutNode: -1},
	}
	err = s.play(ctx, w)
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	run := s.run
	run.took = time.Since(rec.base)
	run.history, run.perNode = rec.history, rec.perNode
	for _, sp := range rec.spans {
		if sp.client >= w.clients || sp.via != run.cutNode {
			continue
		}
		if sp.call < run.cutTo && sp.ret > run.cutFrom {
			run.opsDuringCut++
		}
		if sp.read && sp.answered && sp.call > run.cutTo {
			run.readsAfterHeal++
		}
	}
	return run
}

// tagRecorder performs operations on tags and records them: answered ones
// in the history, every one in spans.
type tagRecorder struct {
	reg  rawRegistry
	img  smallImage
	base time.Time

	mu      sync.Mutex // guards the rest
	history []porcupine.Operation
	spans   []opSpan
	perNode []nodeCounts // the clients' operations only
}

// opSpan is when an operation ran, through which node, and whether it
// was a read and answered (a write: acknowledged).
type opSpan struct {
	client, via    int
	call, ret      int64
	read, answered bool
}

// now is the history's clock: monotonic nanoseconds since the start.
func (r *tagRecorder) now() int64 { return time.Since(r.base).Nanoseconds() }

// record adds op (unless it observed nothing) and its span, and counts it
// for a client (not for the fault schedule, which passes count nil).
func (r *tagRecorder) record(op porcupine.Operation, observed bool, via int, count func(*nodeCounts)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if observed {
		r.history = append(r.history, op)
	}
	r.spans = append(r.spans, opSpan{
		client: op.ClientId, via: via, call: op.Call, ret: min(op.Return, r.now()),
		read: !op.Input.(tagOp).Write, answered: observed && op.Return != math.MaxInt64,
	})
	if count != nil {
		count(&r.perNode[via])
	}
}

// completedPerNode counts the clients' finished operations through each
// node, answered or not.
func (r *tagRecorder) completedPerNode() []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]int, len(r.perNode))
	for i, n := range r.perNode {
		out[i] = n.writes + n.unknownWrites + n.reads + n.absent + n.dropped
	}
	return out
}

// client runs one client's mix of writes and reads through node via until
// stop is closed.
func (r *tagRecorder) client(ctx context.Context, client, via int, rng *rand.Rand, stop <-chan struct{}) error {
	const writeShare = 0.4
	tags := []string{"a", "b", "c"}
	for k := 0; ; k++ {
		// A client thinks 10-30ms between operations: the fault timeline
		// waits for the slowest node, and without a pause the others would
		// pile up a history too long to check quickly.
		think := time.NewTimer(time.Duration(10+rng.IntN(21)) * time.Millisecond)
		select {
		case <-stop:
			think.Stop()
			return nil
		case <-ctx.Done():
			think.Stop()
			return nil
		case <-think.C:
		}
		tag := tags[rng.IntN(len(tags))]
		var err error
		if rng.Float64() < writeShare {
			_, err = r.put(ctx, client, via, tag, r.img.manifest(fmt.Sprintf("client%d", client), k), true)
		} else {
			method := http.MethodGet
			if k%2 == 1 {
				method = http.MethodHead
			}
			_, err = r.get(ctx, client, via, method, tag, true)
		}
		if err != nil {
			return fmt.Errorf("client %d: %w", client, err)
		}
	}
}

// put writes body to tag through node via. It reports whether the write
// was acknowledged; one that failed is recorded with an unknown outcome.
// The error is for answers that break the protocol.
func (r *tagRecorder) put(ctx context.Context, client, via int, tag string, body []byte, count bool) (bool, error) {
	in := tagOp{Tag: tag, Write: true, Value: digestOf(body)}
	op := porcupine.Operation{ClientId: client, Input: in, Call: r.now()}
	rctx, cancel := context.WithTimeout(ctx, linearApplyTimeout+20*time.Second)
	defer cancel()
	reply, err := r.reg.putTag(rctx, via, linearRepo, tag, body)
	op.Return = r.now()
	var counter func(*nodeCounts)
	switch {
	case err == nil && reply.status == http.StatusCreated && reply.digest == in.Value:
		counter = func(n *nodeCounts) { n.writes++ }
	case err == nil && reply.status == http.StatusCreated:
		return false, fmt.Errorf("PUT %s through node %d answered digest %s, want %s", tag, via, reply.digest, in.Value)
	case err != nil || reply.status == http.StatusServiceUnavailable:
		// It may take effect at any time after its call.
		op.Return = math.MaxInt64
		counter = func(n *nodeCounts) { n.unknownWrites++ }
	default:
		return false, fmt.Errorf("PUT %s through node %d: %v", tag, via, reply)
	}
	if !count {
		counter = nil
	}
	r.record(op, true, via, counter)
	return op.Return != math.MaxInt64, nil
}

// readOutcome is what a read of a tag observed.
type readOutcome struct {
	status int    // 0 when no answer came
	value  string // the digest served with a 200, "" otherwise
}

func (o readOutcome) answered() bool {
	return o.status == http.StatusOK || o.status == http.StatusNotFound
}

// get reads tag through node via with method (GET or HEAD) and records
// what it observed: a 200 or a 404. A 503 or no answer observed nothing.
// The error is for answers that break the protocol, such as a body that
// does not hash to the digest its headers give.
func (r *tagRecorder) get(ctx context.Context, client, via int, method, tag string, count bool) (readOutcome, error) {
	op := porcupine.Operation{ClientId: client, Input: tagOp{Tag: tag}, Call: r.now()}
	rctx, cancel := context.WithTimeout(ctx, linearApplyTimeout+20*time.Second)
	defer cancel()
	reply, err := readTag(rctx, r.reg, via, method, tag)
	op.Return = r.now()
	var out readOutcome
	var counter func(*nodeCounts)
	switch {
	case err != nil || reply.status == http.StatusServiceUnavailable:
		if err == nil {
			out.status = reply.status
		}
		counter = func(n *nodeCounts) { n.dropped++ }
	case reply.status == http.StatusOK:
		d, verr := reply.verify(method)
		if verr != nil {
			return out, fmt.Errorf("%s %s through node %d: %w", method, tag, via, verr)
		}
		out = readOutcome{status: reply.status, value: d}
		counter = func(n *nodeCounts) { n.reads++ }
	case reply.status == http.StatusNotFound:
		out.status = reply.status
		counter = func(n *nodeCounts) { n.absent++ }
	default:
		return out, fmt.Errorf("%s %s through node %d: status %d", method, tag, via, reply.status)
	}
	op.Output = out.value
	if !count {
		counter = nil
	}
	r.record(op, out.answered(), via, counter)
	return out, nil
}

// tagReply is an answer to a GET or HEAD of a manifest by tag.
type tagReply struct {
	status  int
	digest  string // Docker-Content-Digest
	etag    string
	body    []byte // nil for HEAD
	bodyErr error  // reading body failed
}

// readTag asks node i for the manifest tag points at. rawRegistry drops
// the ETag, so this builds its own request.
func readTag(ctx context.Context, reg rawRegistry, i int, method, tag string) (tagReply, error) {
	req, err := http.NewRequestWithContext(ctx, method, reg.c.URL(i)+"/v2/"+linearRepo+"/manifests/"+tag, nil)
	if err != nil {
		return tagReply{}, err
	}
	req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json")
	resp, err := reg.client.Do(req)
	if err != nil {
		return tagReply{}, err
	}
	defer resp.Body.Close()
	r := tagReply{status: resp.StatusCode, digest: resp.Header.Get("Docker-Content-Digest"), etag: resp.Header.Get("ETag")}
	if method == http.MethodGet {
		// The server answered: a body cut short is its fault, for verify to
		// report, not a request that observed nothing.
		r.body, r.bodyErr = io.ReadAll(resp.Body)
	}
	return r, nil
}

// verify checks that a 200 answer is consistent: the ETag names the
// Docker-Content-Digest, and a GET's body hashes to it. It returns that
// digest, which the history then records.
func (r tagReply) verify(method string) (string, error) {
	if !strings.HasPrefix(r.digest, "sha256:") {
		return "", fmt.Errorf("200 with Docker-Content-Digest %q", r.digest)
	}
	if r.etag != `"`+r.digest+`"` {
		return "", fmt.Errorf("ETag %s does not name Docker-Content-Digest %s", r.etag, r.digest)
	}
	if r.bodyErr != nil {
		return "", fmt.Errorf("200 with a body that could not be read: %v", r.bodyErr)
	}
	if method == http.MethodGet {
		if got := digestOf(r.body); got != r.digest {
			return "", fmt.Errorf("body of %d bytes has digest %s, headers say %s", len(r.body), got, r.digest)
		}
	}
	return r.digest, nil
}

// faultSchedule plays a workload's faults on a timeline paced by the
// clients' completed operations (so a slow machine stretches it rather
// than squeezing the faults out of the workload), with gaps drawn from the
// seed. It logs each step with the history's clock.
type faultSchedule struct {
	t      *testing.T
	c      *clustertest.Cluster
	rec    *tagRecorder
	rng    *rand.Rand
	client int // the history's client id for the probe's operations
	run    tagWorkloadRun
}

// play runs the timeline: a transfer, the cut with its probe, the heal,
// the remaining transfers, then a tail of operations on the healed
// cluster.
func (s *faultSchedule) play(ctx context.Context, w tagWorkload) error {
	if err := s.afterOps(ctx, 15); err != nil {
		return err
	}
	transfers := w.transfers
	if transfers > 0 {
		if err := s.transfer(ctx); err != nil {
			return err
		}
		transfers--
		if err := s.afterOps(ctx, 15); err != nil {
			return err
		}
	}
	if w.cut {
		if err := s.cutAndProbe(ctx); err != nil {
			return err
		}
		// Let the clients keep going through the cut node a while (in
		// strong mode each of its operations takes the apply timeout).
		if err := s.afterOps(ctx, 1); err != nil {
			return err
		}
		s.c.Heal(s.run.cutNode)
		s.run.cutTo = s.rec.now()
		s.event("healed node %d", s.run.cutNode)
		if err := s.afterOps(ctx, 15); err != nil {
			return err
		}
	}
	for ; transfers > 0; transfers-- {
		if err := s.transfer(ctx); err != nil {
			return err
		}
		if err := s.afterOps(ctx, 15); err != nil {
			return err
		}
	}
	// The tail gives the healed node time to answer again.
	return s.afterOps(ctx, 25)
}

// afterOps waits until the clients of every node have completed between n
// and 2n (drawn) more operations, answered or not. Pacing on every node,
// the cut one included, keeps a fast node from running the timeline while
// a slow one has done nothing.
func (s *faultSchedule) afterOps(ctx context.Context, n int) error {
	target := s.rec.completedPerNode()
	for i := range target {
		target[i] += n + s.rng.IntN(n+1)
	}
	var done []int
	if !pollUntil(ctx, func() bool {
		done = s.rec.completedPerNode()
		for i := range done {
			if done[i] < target[i] {
				return false
			}
		}
		return true
	}) {
		return fmt.Errorf("fault schedule: the clients did not reach %v operations per node (at %v): %w", target, done, context.Cause(ctx))
	}
	return nil
}

func (s *faultSchedule) event(format string, args ...any) {
	s.t.Logf("fault schedule at %v (operations done per node %v): %s",
		time.Duration(s.rec.now()).Round(time.Millisecond), s.rec.completedPerNode(), fmt.Sprintf(format, args...))
}

// transfer hands leadership to a follower drawn from the seed and waits
// until another node leads.
func (s *faultSchedule) transfer(ctx context.Context) error {
	from, err := s.c.Leader(ctx)
	if err != nil {
		return err
	}
	followers := othersThan(s.c, from)
	to := followers[s.rng.IntN(len(followers))]
	s.event("transferring leadership from node %d to node %d", from, to)
	tctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	var last error
	if !pollUntil(tctx, func() bool {
		if n := s.c.Node(from); n != nil && n.Consensus().IsLeader() {
			last = n.Consensus().TransferLeadership(tctx, s.c.Config(to).NodeID)
		}
		lctx, lcancel := context.WithTimeout(tctx, 2*time.Second)
		defer lcancel()
		now, err := s.c.Leader(lctx)
		if err != nil || now == from {
			return false
		}
		s.run.leaderChanges++
		s.event("node %d leads (asked for node %d)", now, to)
		return true
	}) {
		return fmt.Errorf("fault schedule: leadership never left node %d: %v", from, last)
	}
	return nil
}

// cutAndProbe writes a fresh value to the probe tag and waits until a
// drawn node serves it; cuts that node off; rewrites the probe tag
// through the majority until a write is acknowledged; then reads the probe
// tag through the cut node, which cannot have the new value: it must
// answer 503 in strong mode, and answers the old value in local mode.
//
// A node cut off just after it acknowledged a write of its own, before it
// learned that the write committed, refuses local reads too (it will not
// answer older than its own writes): then the schedule heals it and tries
// again, so that the local-mode probe meets a node with nothing pending.
func (s *faultSchedule) cutAndProbe(ctx context.Context) error {
	x := s.rng.IntN(s.c.Size())
	majority := othersThan(s.c, x)
	for attempt := 1; ; attempt++ {
		before, err := s.writeProbe(ctx, majority, "before")
		if err != nil {
			return err
		}
		// A healthy node serves it at once (strong) or within a replication
		// round trip (local); the bound only keeps a broken one from holding
		// the run to its deadline.
		var seen readOutcome
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		if !pollUntil(sctx, func() bool {
			seen, err = s.rec.get(sctx, s.client, x, http.MethodGet, probeTag, false)
			return err != nil || seen.value == before
		}) || err != nil {
			cancel()
			return fmt.Errorf("fault schedule: node %d did not serve the probe value %s within 30s (last %+v): %v", x, shortDigest(before), seen, err)
		}
		cancel()

		s.c.Cut(x)
		s.run.cutNode, s.run.cutFrom = x, s.rec.now()
		s.event("cut node %d off from nodes %v (Raft and gRPC; HTTP and gossip stay up)", x, majority)
		after, err := s.writeProbe(ctx, majority, "during")
		if err != nil {
			return err
		}
		s.event("probe tag rewritten through the majority, from %s to %s", shortDigest(before), shortDigest(after))
		got, err := s.rec.get(ctx, s.client, x, http.MethodGet, probeTag, false)
		if err != nil {
			return fmt.Errorf("fault schedule: %w", err)
		}
		if got.status == http.StatusServiceUnavailable && s.c.Node(x).OwnWritesPending() && attempt < 5 {
			s.event("cut node %d answered 503: it holds a write it acknowledged and has not applied; heal and cut again", x)
			s.c.Heal(x)
			continue
		}
		s.run.probe = probeResult{before: before, after: after, status: got.status, got: got.value}
		s.event("cut node %d answered the probe read with status %d and %s", x, got.status, shortDigest(got.value))
		return nil
	}
}

// writeProbe writes a fresh manifest to the probe tag through the given
// nodes in turn until one write is acknowledged, and returns its digest.
// Writes that fail stay in the history with an unknown outcome.
func (s *faultSchedule) writeProbe(ctx context.Context, via []int, phase string) (string, error) {
	var digest string
	var err error
	k := 0
	// Long enough for an election on a loaded machine.
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if !pollUntil(wctx, func() bool {
		body := s.rec.img.manifest("probe-"+phase, k)
		var acked bool
		acked, err = s.rec.put(wctx, s.client, via[k%len(via)], probeTag, body, false)
		k++
		if acked {
			digest = digestOf(body)
		}
		return acked || err != nil
	}) || err != nil {
		return "", fmt.Errorf("fault schedule: no write of the probe tag (%s) was acknowledged after %d tries: %v", phase, k, err)
	}
	return digest, nil
}

// othersThan lists the nodes of c other than i.
func othersThan(c *clustertest.Cluster, i int) []int {
	var out []int
	for j := range c.Size() {
		if j != i {
			out = append(out, j)
		}
	}
	return out
}

// tagOp is the input of one operation on a tag: a write of Value, or a
// read (whose output is the digest read, "" for no tag).
type tagOp struct {
	Tag   string
	Write bool
	Value string
}

// tagRegisterModel treats each tag as a register holding a digest; ""
// stands for a tag that does not exist. Tags are independent, so the
// history is checked per tag.
var tagRegisterModel = porcupine.Model{
	Partition: func(history []porcupine.Operation) [][]porcupine.Operation {
		byTag := map[string][]porcupine.Operation{}
		var order []string
		for _, op := range history {
			tag := op.Input.(tagOp).Tag
			if _, ok := byTag[tag]; !ok {
				order = append(order, tag)
			}
			byTag[tag] = append(byTag[tag], op)
		}
		var out [][]porcupine.Operation
		for _, tag := range order {
			out = append(out, byTag[tag])
		}
		return out
	},
	Init: func() any { return "" },
	Step: func(state, input, output any) (bool, any) {
		in := input.(tagOp)
		if in.Write {
			return true, in.Value
		}
		return output.(string) == state.(string), state
	},
	DescribeOperation: func(input, output any) string {
		in := input.(tagOp)
		if in.Write {
			return fmt.Sprintf("put %s = %s", in.Tag, shortDigest(in.Value))
		}
		return fmt.Sprintf("get %s → %s", in.Tag, shortDigest(output.(string)))
	},
	DescribeState: func(state any) string { return shortDigest(state.(string)) },
}

func shortDigest(d string) string {
	switch {
	case d == "":
		return "absent"
	case len(d) > 19:
		return d[:19] // sha256: and 12 hex digits
	}
	return d
}

// checkTagHistory fails t unless porcupine finds the history linearizable;
// on a violation it writes porcupine's visualization to the test's
// artifact directory.
func checkTagHistory(t *testing.T, history []porcupine.Operation) {
	t.Helper()
	start := time.Now()
	res, info := porcupine.CheckOperationsVerbose(tagRegisterModel, history, linearCheckTimeout)
	t.Logf("porcupine: %s in %v", checkResultName(res), time.Since(start).Round(time.Millisecond))
	switch res {
	case porcupine.Ok:
		return
	case porcupine.Unknown:
		t.Fatalf("porcupine could not decide within %v whether the %d operations are linearizable: an undecided check is not a pass", linearCheckTimeout, len(history))
	}
	path := filepath.Join(t.ArtifactDir(), "linearizability.html")
	if err := porcupine.VisualizePath(tagRegisterModel, info, path); err != nil {
		t.Logf("visualize: %v", err)
		path = "(not written)"
	}
	t.Errorf("the history of %d operations is not linearizable; visualization: %s (kept with -artifacts)", len(history), path)
}

func checkResultName(r porcupine.CheckResult) string {
	switch r {
	case porcupine.Ok:
		return "linearizable"
	case porcupine.Illegal:
		return "not linearizable"
	case porcupine.Unknown:
		return "unknown (timed out)"
	}
	return fmt.Sprint(r)
}

// testTagRegisterChecker runs the model on hand-made histories: the
// checker must accept the linearizable ones and reject the others, in
// particular a read that returns an overwritten digest.
func testTagRegisterChecker(t *testing.T) {
	const (
		x = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
		y = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
	)
	put := func(client int, call, ret int64, tag, v string) porcupine.Operation {
		return porcupine.Operation{ClientId: client, Input: tagOp{Tag: tag, Write: true, Value: v}, Call: call, Return: ret}
	}
	get := func(client int, call, ret int64, tag, v string) porcupine.Operation {
		return porcupine.Operation{ClientId: client, Input: tagOp{Tag: tag}, Output: v, Call: call, Return: ret}
	}
	for _, tc := range []struct {
		name    string
		history []porcupine.Operation
		want    porcupine.CheckResult
	}{
		{"read of the latest write", []porcupine.Operation{
			put(0, 0, 10, "a", x), put(0, 20, 30, "a", y), get(1, 40, 50, "a", y),
		}, porcupine.Ok},
		{"stale read after an overwrite", []porcupine.Operation{
			put(0, 0, 10, "a", x), put(0, 20, 30, "a", y), get(1, 40, 50, "a", x),
		}, porcupine.Illegal},
		{"stale read on another tag than a fresh one", []porcupine.Operation{
			put(0, 0, 10, "a", x), put(0, 0, 10, "b", x), put(0, 20, 30, "b", y),
			get(1, 40, 50, "a", x), get(1, 40, 50, "b", x),
		}, porcupine.Illegal},
		{"read concurrent with an overwrite sees either", []porcupine.Operation{
			put(0, 0, 10, "a", x), put(0, 20, 30, "a", y), get(1, 25, 50, "a", x), get(2, 25, 50, "a", y),
		}, porcupine.Ok},
		{"absent after a write", []porcupine.Operation{
			put(0, 0, 10, "a", x), get(1, 20, 30, "a", ""),
		}, porcupine.Illegal},
		{"write of unknown outcome seen later", []porcupine.Operation{
			put(0, 0, math.MaxInt64, "a", x), get(1, 20, 30, "a", ""), get(1, 40, 50, "a", x),
		}, porcupine.Ok},
		{"write of unknown outcome seen before its call", []porcupine.Operation{
			get(1, 0, 10, "a", x), put(0, 20, math.MaxInt64, "a", x),
		}, porcupine.Illegal},
		{"write of unknown outcome seen, then unseen", []porcupine.Operation{
			put(0, 0, math.MaxInt64, "a", x), get(1, 20, 30, "a", x), get(1, 40, 50, "a", ""),
		}, porcupine.Illegal},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := porcupine.CheckOperationsTimeout(tagRegisterModel, tc.history, 10*time.Second); got != tc.want {
				t.Errorf("porcupine says %s, want %s", checkResultName(got), checkResultName(tc.want))
			}
		})
	}
}
