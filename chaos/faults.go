package chaos

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"
)

// Fault kinds.
const (
	FaultKill        = "kill"         // kill -9 a node (the leader half the time), restart it after 3–15 s
	FaultPause       = "pause"        // SIGSTOP a node (leader-biased) for longer than the election timeout
	FaultPartition   = "partition"    // isolate a node (leader-biased) or split the nodes in two, 5–20 s
	FaultLatency     = "latency"      // 50–300 ms more on every link of a node, 10–30 s
	FaultS3Error     = "s3-error"     // an S3 region's proxy answers 503, 5–15 s
	FaultS3Stall     = "s3-stall"     // an S3 region's proxy holds requests, 5–15 s
	FaultS3Stop      = "s3-stop"      // kill an S3 server, restart it after 5–15 s
	FaultGatewayKill = "gateway-kill" // kill -9 a gateway, restart it after 2–8 s
	FaultCertRotate  = "cert-rotate"  // re-issue a node's certificate in place; it must serve the new one within 10 s
	FaultRevoke      = "revoke"       // revoke the workload's robot mid-write; a new one takes over after 3–6 s
	FaultGossipKey   = "gossip-key"   // rotate the gossip key online with the CLI, then restart a node from its key file
)

// FaultKinds lists every fault kind.
var FaultKinds = []string{FaultKill, FaultPause, FaultPartition, FaultLatency, FaultS3Error, FaultS3Stall, FaultS3Stop, FaultGatewayKill,
	FaultCertRotate, FaultRevoke, FaultGossipKey}

// FaultPlan paces InjectFaults.
type FaultPlan struct {
	// MeanInterval is the mean time between injections (each gap drawn
	// uniformly from half to one and a half of it); 0 takes the profile's
	// FaultEvery.
	MeanInterval time.Duration
	// MaxConcurrent is how many faults may be active at once (0: 1).
	// Node faults never take down more than a minority of the voters.
	MaxConcurrent int
	// Kinds are the kinds to cycle through; nil: every kind the cluster
	// can have (S3 kinds need an S3 region, gateway-kill a gateway).
	Kinds []string
	// Base is the instant Fault.Start and End count from (zero: when
	// InjectFaults starts).
	Base time.Time
}

// faultSpec is one drawn fault, before it runs.
type faultSpec struct {
	kind    string
	target  string   // what Fault.Target says
	nodes   []string // nodes the fault takes down (kill, pause, partition's minority)
	node    string   // the node acted on (kill, pause, latency, isolate)
	groups  [2][]string
	region  string // s3 faults
	gateway string
	robot   string // robotTarget (revoke)
	// members are the nodes and gateways a fault occupies without taking
	// them down (gossip-key: all of them).
	members []string
	hold    time.Duration
	delay   time.Duration // latency
	detail  string
	leader  bool // node is the Raft leader
	// failure is what the fault's own check found wrong once it healed
	// (Fault.Failure).
	failure string
	// revoked is when a revocation returned (Fault.Revoked).
	revoked time.Time
}

// faultSlot is one place in the schedule: the kind to inject, how long
// to wait before it, the seed of the choices within the kind, and how
// strongly it aims at the Raft leader (1: only the leader will do).
type faultSlot struct {
	kind   string
	round  int
	gap    time.Duration
	seed   uint64
	leader float64
}

// faultSchedule cycles through kinds: each round is a seeded permutation
// of every kind, so that every kind comes once per round whatever the
// seed. Only the order, the gaps and the choices within a kind vary.
type faultSchedule struct {
	rng   *rand.Rand
	kinds []string
	mean  time.Duration
	queue []faultSlot
	round int
}

func newFaultSchedule(rng *rand.Rand, kinds []string, mean time.Duration) *faultSchedule {
	return &faultSchedule{rng: rng, kinds: kinds, mean: mean}
}

// next is the schedule's next slot.
func (s *faultSchedule) next() faultSlot {
	if len(s.queue) == 0 {
		for _, i := range s.rng.Perm(len(s.kinds)) {
			k := s.kinds[i]
			slot := faultSlot{kind: k, round: s.round, seed: s.rng.Uint64()}
			slot.gap = time.Duration((0.5 + s.rng.Float64()) * float64(s.mean))
			slot.leader = leaderBias(k, s.round)
			s.queue = append(s.queue, slot)
		}
		s.round++
	}
	slot := s.queue[0]
	s.queue = s.queue[1:]
	return slot
}

// leaderBias is how strongly a fault of kind in round aims at the leader.
// Every other round (the first included) kills the leader itself, which
// is what FaultQuotas promises; the other rounds kill the leader half the
// time, so that a follower's restart is exercised too.
func leaderBias(kind string, round int) float64 {
	switch kind {
	case FaultKill:
		if round%2 == 0 {
			return 1
		}
		return 0.5
	case FaultPause, FaultPartition:
		return 0.6
	}
	return 0
}

// FaultQuota is a promise of the fault schedule: at least Min faults of
// Kind were injected (aimed at the Raft leader, when Leader is set). Got is
// how many were.
type FaultQuota struct {
	Kind   string `json:"kind"`
	Leader bool   `json:"leader,omitempty"`
	Min    int    `json:"min"`
	Got    int    `json:"got"`
}

// String reads "kill (leader) 1 of at least 1".
func (q FaultQuota) String() string {
	k := q.Kind
	if q.Leader {
		k += " (leader)"
	}
	return fmt.Sprintf("%s %d of at least %d", k, q.Got, q.Min)
}

// FaultQuotas is what a schedule of rounds rounds over kinds (nil: every
// kind) promises on a cluster of profile p: each kind the cluster can
// have, rounds times, and a kill of the leader in every other round (see
// leaderBias). Got is zero.
func FaultQuotas(p Profile, kinds []string, rounds int) []FaultQuota {
	if rounds <= 0 {
		return nil
	}
	var qs []FaultQuota
	for _, k := range p.faultKinds(kinds) {
		qs = append(qs, FaultQuota{Kind: k, Min: rounds})
		if k == FaultKill {
			qs = append(qs, FaultQuota{Kind: k, Leader: true, Min: (rounds + 1) / 2})
		}
	}
	return qs
}

// countFaults returns quotas with Got counted from faults: only faults
// that were injected (no Error) count.
func countFaults(quotas []FaultQuota, faults []Fault) []FaultQuota {
	out := slices.Clone(quotas)
	for i := range out {
		out[i].Got = 0
		for _, f := range faults {
			if f.Error == "" && f.Kind == out[i].Kind && (f.Leader || !out[i].Leader) {
				out[i].Got++
			}
		}
	}
	return out
}

// faultKinds are the kinds of kinds (nil: all of FaultKinds) that a
// cluster of p can have, once each, in FaultKinds order: S3 faults need an
// S3 region, gateway-kill a gateway.
func (p Profile) faultKinds(kinds []string) []string {
	if kinds == nil {
		kinds = FaultKinds
	}
	hasS3 := slices.ContainsFunc(p.Regions, func(r RegionSpec) bool { return r.S3 })
	var out []string
	for _, k := range FaultKinds {
		if !slices.Contains(kinds, k) {
			continue
		}
		switch k {
		case FaultS3Error, FaultS3Stall, FaultS3Stop:
			if !hasS3 {
				continue
			}
		case FaultGatewayKill:
			if len(p.Gateways) == 0 {
				continue
			}
		}
		out = append(out, k)
	}
	return out
}

// InjectFaults injects faults until ctx ends, then heals those still
// active (each within a bounded time) and returns. Each fault is recorded
// once it is over, with its start and end as offsets from plan.Base.
//
// The faults follow a schedule that cycles through the kinds (see
// faultSchedule): a kind that the cluster cannot take at its turn (a node
// fault while a minority is already down, say, or a leader kill while no
// leader is known) is retried until it can, and does not let later kinds
// pass it; a fault that could not be injected is recorded with its Error
// and tried again. So after n rounds' worth of time every kind has run n
// times, and FaultQuotas can promise it. The order, the gaps and the
// choices within a kind (targets, durations) come from rng only, so a
// seed reproduces the schedule; which node is the leader, and the timing,
// vary.
//
// Node faults (kill, pause, partition) never take down more than a
// minority of the voters at once (nodes killed, paused, isolated or on
// the minority side of a split), and no target has two faults at once.
// Restarts may overlap S3 faults: a node or gateway must start while a
// region's store is down.
func (c *Cluster) InjectFaults(ctx context.Context, rng *rand.Rand, plan FaultPlan, record func(Fault)) {
	base := plan.Base
	if base.IsZero() {
		base = time.Now()
	}
	mean := plan.MeanInterval
	if mean <= 0 {
		mean = c.prof.FaultEvery
	}
	if mean <= 0 {
		mean = 20 * time.Second
	}
	maxConc := max(plan.MaxConcurrent, 1)
	kinds := c.prof.faultKinds(plan.Kinds)
	if len(kinds) == 0 {
		return
	}
	if record == nil {
		record = func(Fault) {}
	}
	inj := &injector{c: c, base: base, record: record, leader: c.Leader, active: map[*faultSpec]bool{}, changed: make(chan struct{})}
	defer inj.wg.Wait()
	sched := newFaultSchedule(rng, kinds, mean)
	for {
		slot := sched.next()
		if !holdFor(ctx, slot.gap) {
			return
		}
		for {
			// A fault injected as the run ends would prove nothing.
			if !inj.waitSlot(ctx, maxConc) || ctx.Err() != nil {
				return
			}
			if f := inj.draw(ctx, slot); f != nil && inj.run(ctx, f) {
				break
			}
			// Not now: try again once a fault ends, or in a moment.
			inj.mu.Lock()
			changed := inj.changed
			inj.mu.Unlock()
			select {
			case <-ctx.Done():
				return
			case <-changed:
			case <-time.After(2 * time.Second):
			}
		}
	}
}

// waitSlot waits until fewer than maxConc faults are active; after one
// ended it gives the cluster a moment. False when ctx ended.
func (inj *injector) waitSlot(ctx context.Context, maxConc int) bool {
	for waited := false; ; waited = true {
		inj.mu.Lock()
		n, changed := len(inj.active), inj.changed
		inj.mu.Unlock()
		if n < maxConc {
			return !waited || holdFor(ctx, 2*time.Second)
		}
		select {
		case <-ctx.Done():
			return false
		case <-changed:
		}
	}
}

type injector struct {
	c      *Cluster
	base   time.Time
	record func(Fault)
	// leader finds the current Raft leader (Cluster.Leader).
	leader func(context.Context) (string, error)

	mu      sync.Mutex
	active  map[*faultSpec]bool
	changed chan struct{}
	wg      sync.WaitGroup
}

func holdFor(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// randDuration draws a duration in [lo, hi].
func randDuration(rng *rand.Rand, lo, hi time.Duration) time.Duration {
	if hi <= lo {
		return lo
	}
	return lo + time.Duration(rng.Int64N(int64(hi-lo)+1))
}

// busy returns what active faults occupy: nodes down and targets in use.
func (inj *injector) busy() (down map[string]bool, targets map[string]bool) {
	inj.mu.Lock()
	defer inj.mu.Unlock()
	down, targets = map[string]bool{}, map[string]bool{}
	for f := range inj.active {
		for _, n := range f.nodes {
			down[n] = true
		}
		for _, t := range append([]string{f.node, f.region, f.gateway, f.robot}, f.members...) {
			if t != "" {
				targets[t] = true
			}
		}
		for _, g := range f.groups {
			for _, n := range g {
				targets[n] = true
			}
		}
	}
	return down, targets
}

// draw builds the fault of slot if the cluster can take it now, else
// returns nil. Its choices come from the slot's seed alone, so a retry
// draws the same.
func (inj *injector) draw(ctx context.Context, slot faultSlot) *faultSpec {
	c := inj.c
	p := c.prof
	rng := rand.New(rand.NewPCG(slot.seed, 0x51077))
	down, targets := inj.busy()
	maxDown := p.maxNodesDown()
	var s3Regions []string
	for _, r := range p.Regions {
		if r.S3 && !targets[r.Name] {
			s3Regions = append(s3Regions, r.Name)
		}
	}
	var freeNodes []string
	for _, id := range c.NodeIDs() {
		if !targets[id] {
			freeNodes = append(freeNodes, id)
		}
	}
	var freeGateways []string
	for _, g := range c.gateways {
		if !targets[g.spec.ID] {
			freeGateways = append(freeGateways, g.spec.ID)
		}
	}
	nodeFaultOK := len(down)+1 <= maxDown && len(freeNodes) > 0
	ok := false
	switch slot.kind {
	case FaultKill, FaultPause, FaultPartition:
		ok = nodeFaultOK
	case FaultLatency, FaultCertRotate:
		ok = len(freeNodes) > 0
	case FaultS3Error, FaultS3Stall, FaultS3Stop:
		ok = len(s3Regions) > 0
	case FaultGatewayKill:
		ok = len(freeGateways) > 0 && len(freeGateways) == len(c.gateways)
	case FaultRevoke:
		ok = !targets[robotTarget]
	case FaultGossipKey:
		// Every member must be up and take part: one that missed the new
		// key could not come back once the old one is removed.
		ok = len(down) == 0 && len(freeNodes) == len(c.nodes) && len(freeGateways) == len(c.gateways) && nodeFaultOK
	}
	if !ok {
		return nil
	}
	f := &faultSpec{kind: slot.kind}
	// hold draws a duration in [lo, hi], both capped by the profile.
	hold := func(lo, hi time.Duration) time.Duration {
		if p.MaxFaultHold > 0 {
			lo, hi = min(lo, p.MaxFaultHold), min(hi, p.MaxFaultHold)
		}
		return randDuration(rng, lo, hi)
	}

	// pickNode chooses the leader with probability bias when it is free,
	// else a random free node. It always draws the same numbers. With
	// bias 1 only the leader will do: no known free leader fails the draw.
	pickNode := func(bias float64) (id string, isLeader, ok bool) {
		toLeader := rng.Float64() < bias
		i := rng.IntN(len(freeNodes))
		if toLeader {
			lctx, cancel := context.WithTimeout(ctx, 15*time.Second)
			leader, err := inj.leader(lctx)
			cancel()
			if err == nil && slices.Contains(freeNodes, leader) {
				return leader, true, true
			}
			if bias >= 1 {
				return "", false, false
			}
		}
		return freeNodes[i], false, true
	}
	leaderNote := func(isLeader bool) string {
		if isLeader {
			return "leader"
		}
		return ""
	}
	switch f.kind {
	case FaultKill:
		id, isLeader, ok := pickNode(slot.leader)
		if !ok {
			return nil
		}
		f.node, f.target, f.nodes, f.leader = id, id, []string{id}, isLeader
		f.hold = hold(3*time.Second, 15*time.Second)
		f.detail = leaderNote(isLeader)
	case FaultPause:
		id, isLeader, ok := pickNode(slot.leader)
		if !ok {
			return nil
		}
		f.node, f.target, f.nodes, f.leader = id, id, []string{id}, isLeader
		et := max(p.RaftElectionTimeout, p.RaftHeartbeatTimeout, time.Second)
		f.hold = hold(2*et, 2*et+6*time.Second)
		f.detail = leaderNote(isLeader)
	case FaultPartition:
		split := rng.Float64() < 0.4
		id, isLeader, ok := pickNode(slot.leader)
		if !ok {
			return nil
		}
		perm := rng.Perm(len(freeNodes))
		f.hold = hold(5*time.Second, 20*time.Second)
		// A split needs every node free and room for its minority.
		minority := min(maxDown-len(down), (len(freeNodes)-1)/2)
		if split && len(freeNodes) == len(c.nodes) && len(freeNodes) >= 3 && minority >= 1 {
			k := 1 + rng.IntN(minority)
			var a, b []string
			for j, pi := range perm {
				if j < k {
					a = append(a, freeNodes[pi])
				} else {
					b = append(b, freeNodes[pi])
				}
			}
			sort.Strings(a)
			sort.Strings(b)
			// Each gateway lands on one side (one under another fault
			// stays out of it).
			for _, g := range c.gateways {
				side := rng.IntN(2)
				switch {
				case targets[g.spec.ID]:
				case side == 0:
					a = append(a, g.spec.ID)
				default:
					b = append(b, g.spec.ID)
				}
			}
			f.groups = [2][]string{a, b}
			f.nodes = a[:k]
			f.target = strings.Join(a, ",") + "|" + strings.Join(b, ",")
			f.detail = "split"
		} else {
			f.node, f.target, f.nodes, f.leader = id, id, []string{id}, isLeader
			f.detail = strings.TrimSpace("isolate " + leaderNote(isLeader))
		}
	case FaultLatency:
		id, _, _ := pickNode(0)
		f.node, f.target = id, id
		f.delay = randDuration(rng, 50*time.Millisecond, 300*time.Millisecond).Round(time.Millisecond)
		f.hold = hold(10*time.Second, 30*time.Second)
		f.detail = fmt.Sprintf("+%v each way on every link", f.delay)
	case FaultS3Error, FaultS3Stall, FaultS3Stop:
		f.region = s3Regions[rng.IntN(len(s3Regions))]
		f.target = f.region
		f.hold = hold(5*time.Second, 15*time.Second)
	case FaultGatewayKill:
		f.gateway = freeGateways[rng.IntN(len(freeGateways))]
		f.target = f.gateway
		f.hold = hold(2*time.Second, 8*time.Second)
	case FaultCertRotate:
		// Nothing to hold: the fault lasts until the node serves the new
		// certificate, or certRotateWithin passed.
		id, _, _ := pickNode(0)
		f.node, f.target = id, id
	case FaultRevoke:
		// The writers go on as the revoked robot for the hold, which
		// leaves seconds of requests past revokeGrace to judge. The
		// target becomes the robot's name once it is known.
		f.robot, f.target = robotTarget, robotTarget
		f.hold = hold(3*time.Second, 6*time.Second)
	case FaultGossipKey:
		// Nothing to hold: the fault lasts until the restarted node and
		// another see every member alive, or gossipKeyWithin passed.
		id, _, _ := pickNode(0)
		f.node, f.nodes, f.target = id, []string{id}, gossipKeyTarget
		f.members = append(slices.Clone(c.NodeIDs()), freeGateways...)
		f.detail = "restart " + id
	}
	return f
}

// run injects f; it then holds in its own goroutine for f.hold or until
// ctx ends, heals and records itself. False when f could not be
// injected (it is recorded with its Error at once).
func (inj *injector) run(ctx context.Context, f *faultSpec) bool {
	inj.mu.Lock()
	inj.active[f] = true
	inj.mu.Unlock()
	inj.wg.Add(1)
	start := time.Now()
	heal, err := inj.c.inject(f)
	if err != nil {
		inj.finish(f, start, time.Now(), "", "could not inject: "+err.Error())
		inj.wg.Done()
		return false
	}
	if f.hold > 0 {
		inj.c.logf("fault %s on %s for %v %s", f.kind, f.target, f.hold.Round(time.Millisecond), f.detail)
	} else {
		inj.c.logf("fault %s on %s %s", f.kind, f.target, f.detail)
	}
	go func() {
		defer inj.wg.Done()
		holdFor(ctx, f.hold)
		// Healing must happen even after ctx ended, within bounds.
		hctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		healStart := time.Now()
		note := heal(hctx)
		end := time.Now()
		// A rotation's healing is the wait for the new certificate or
		// for gossip, which its detail gives.
		if took := end.Sub(healStart); took > 500*time.Millisecond && note == "" && f.kind != FaultCertRotate && f.kind != FaultGossipKey {
			note = fmt.Sprintf("(healing took %v)", took.Round(10*time.Millisecond))
		}
		inj.finish(f, start, end, note, "")
	}()
	return true
}

func (inj *injector) finish(f *faultSpec, start, end time.Time, note, injectErr string) {
	detail := strings.TrimSpace(strings.Join([]string{f.detail, note}, " "))
	rec := Fault{Kind: f.kind, Target: f.target, Start: start.Sub(inj.base), End: end.Sub(inj.base), Detail: detail,
		Leader: f.leader, Error: injectErr, Failure: f.failure}
	if !f.revoked.IsZero() {
		rec.Revoked = f.revoked.Sub(inj.base)
	}
	inj.record(rec)
	inj.mu.Lock()
	delete(inj.active, f)
	close(inj.changed)
	inj.changed = make(chan struct{})
	inj.mu.Unlock()
}

// inject applies f now and returns what heals it; heal returns a note for
// the record ("" when all went well).
func (c *Cluster) inject(f *faultSpec) (heal func(context.Context) string, err error) {
	switch f.kind {
	case FaultKill:
		n := c.node(f.node)
		if err := n.proc.Kill(); err != nil {
			return nil, err
		}
		return func(ctx context.Context) string {
			if err := c.startNode(ctx, n); err != nil {
				return "restart failed: " + err.Error()
			}
			return ""
		}, nil
	case FaultPause:
		n := c.node(f.node)
		if err := n.proc.Pause(); err != nil {
			return nil, err
		}
		return func(context.Context) string {
			if err := n.proc.Resume(); err != nil {
				return "resume failed: " + err.Error()
			}
			return ""
		}, nil
	case FaultPartition:
		var undo func()
		if f.node != "" {
			undo = c.net.Isolate(f.node)
		} else {
			undo = c.net.Partition(f.groups[0], f.groups[1])
		}
		return func(context.Context) string { undo(); return "" }, nil
	case FaultLatency:
		undo := c.net.AddLatency(f.node, f.delay)
		return func(context.Context) string { undo(); return "" }, nil
	case FaultS3Error, FaultS3Stall:
		s := c.s3[f.region]
		mode := S3Error
		if f.kind == FaultS3Stall {
			mode = S3Stall
		}
		s.proxy.SetMode(mode)
		return func(context.Context) string { s.proxy.SetMode(S3Pass); return "" }, nil
	case FaultS3Stop:
		s := c.s3[f.region]
		if err := s.stop(); err != nil {
			return nil, err
		}
		return func(ctx context.Context) string {
			if err := s.start(ctx); err != nil {
				return "restart failed: " + err.Error()
			}
			return ""
		}, nil
	case FaultGatewayKill:
		g := c.gateway(f.gateway)
		if err := g.proc.Kill(); err != nil {
			return nil, err
		}
		return func(ctx context.Context) string {
			if err := c.startGateway(ctx, g); err != nil {
				return "restart failed: " + err.Error()
			}
			return ""
		}, nil
	case FaultCertRotate:
		return c.rotateCert(f)
	case FaultRevoke:
		return c.revokeRobot(f)
	case FaultGossipKey:
		return c.rotateGossipKey(f)
	}
	return nil, fmt.Errorf("unknown fault kind %q", f.kind)
}

// rotateCert re-issues the certificate of f's node in place with `meridian
// ca issue`, the node running on. Healing waits until the node serves the
// new certificate on its gRPC port (certRotateWithin at most); if it does
// not, f.failure says so.
func (c *Cluster) rotateCert(f *faultSpec) (heal func(context.Context) string, err error) {
	n := c.node(f.node)
	old, err := c.pki.fileSerial(f.node)
	if err != nil {
		return nil, err
	}
	issued := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.pki.issue(ctx, roleNode, f.node); err != nil {
		return nil, err
	}
	want, err := c.pki.fileSerial(f.node)
	if err != nil {
		return nil, err
	}
	f.detail = "serial " + shortSerial(old) + " → " + shortSerial(want)
	return func(ctx context.Context) string {
		took, err := c.pki.waitServed(ctx, n.grpcAddr, c.pki.identity(roleNode, f.node), old, want, issued, certRotateWithin, n.proc.Exited())
		if err != nil {
			f.failure = err.Error()
			return ""
		}
		f.detail += fmt.Sprintf(", served after %v", took.Round(10*time.Millisecond))
		return ""
	}, nil
}
