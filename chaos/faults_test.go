package chaos

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"reflect"
	"slices"
	"testing"
	"time"
)

// fakeCluster has the profile's shape and no processes.
func fakeCluster(p Profile) *Cluster {
	c := &Cluster{prof: p, out: io.Discard, s3: map[string]*s3Server{}, opt: Options{Meridian: "/nonexistent"}}
	for _, n := range p.Nodes {
		c.nodes = append(c.nodes, &nodeProc{spec: n, proc: &Proc{Name: n.ID}})
	}
	for _, g := range p.Gateways {
		c.gateways = append(c.gateways, &gatewayProc{spec: g, proc: &Proc{Name: g.ID}})
	}
	return c
}

// fixedLeader is an injector's leader lookup that names id ("" : none).
func fixedLeader(id string) func(context.Context) (string, error) {
	return func(context.Context) (string, error) {
		if id == "" {
			return "", errors.New("no leader")
		}
		return id, nil
	}
}

// TestFaultScheduleCyclesKinds: every round of the schedule holds every
// kind exactly once, whatever the seed; the first round's kill must hit
// the leader; gaps stay within half to one and a half of the mean; a seed
// gives the same schedule and another seed another order.
func TestFaultScheduleCyclesKinds(t *testing.T) {
	const mean = 10 * time.Second
	for _, kinds := range [][]string{FaultKinds, {FaultKill, FaultPartition}, {FaultS3Stop}} {
		slots := func(seed uint64) []faultSlot {
			s := newFaultSchedule(rand.New(rand.NewPCG(seed, 7)), kinds, mean)
			var out []faultSlot
			for range 4 * len(kinds) {
				out = append(out, s.next())
			}
			return out
		}
		for seed := uint64(1); seed <= 20; seed++ {
			got := slots(seed)
			for r := range 4 {
				var round []string
				for _, sl := range got[r*len(kinds) : (r+1)*len(kinds)] {
					round = append(round, sl.kind)
					if sl.round != r {
						t.Fatalf("seed %d: slot of round %d says round %d", seed, r, sl.round)
					}
					if sl.gap < mean/2 || sl.gap > mean*3/2 {
						t.Fatalf("seed %d: gap %v outside [%v, %v]", seed, sl.gap, mean/2, mean*3/2)
					}
					if sl.kind == FaultKill && r%2 == 0 && sl.leader != 1 {
						t.Fatalf("seed %d: the kill of round %d does not insist on the leader (bias %v)", seed, r, sl.leader)
					}
				}
				slices.Sort(round)
				want := slices.Sorted(slices.Values(kinds))
				if !reflect.DeepEqual(round, want) {
					t.Fatalf("seed %d round %d: kinds %v, want each of %v once", seed, r, round, want)
				}
			}
			if !reflect.DeepEqual(got, slots(seed)) {
				t.Fatalf("seed %d: the same seed gave another schedule", seed)
			}
		}
		if len(kinds) > 2 && reflect.DeepEqual(slots(1), slots(2)) {
			t.Fatalf("seeds 1 and 2 gave the same schedule of %v", kinds)
		}
	}
}

// TestFaultDraws: with faults kept active, draws never take down more than
// a minority of voters and never hit a busy target; a slot draws the same
// fault each time it is retried; a kill that insists on the leader hits
// the leader, or waits while none is known.
func TestFaultDraws(t *testing.T) {
	for _, p := range []Profile{ShortProfile(), LongProfile()} {
		drawAll := func(seed uint64) []string {
			c := fakeCluster(p)
			leader := p.Nodes[len(p.Nodes)-1].ID
			inj := &injector{c: c, leader: fixedLeader(leader), active: map[*faultSpec]bool{}, changed: make(chan struct{})}
			sched := newFaultSchedule(rand.New(rand.NewPCG(seed, 1)), p.faultKinds(nil), time.Second)
			var got []string
			var order []*faultSpec
			kinds := map[string]int{}
			for i := range 3000 {
				slot := sched.next()
				f := inj.draw(context.Background(), slot)
				if f == nil {
					got = append(got, "-")
				} else {
					if again := inj.draw(context.Background(), slot); again == nil || again.target != f.target || again.hold != f.hold {
						t.Fatalf("%s: a retried slot drew %+v, then %+v", p.Name, f, again)
					}
					if slot.leader == 1 && (f.node != leader || !f.leader || f.detail != "leader") {
						t.Fatalf("%s: a leader kill hit %s (%q); the leader is %s", p.Name, f.node, f.detail, leader)
					}
					if f.kind == FaultCertRotate && (f.node == "" || len(f.nodes) > 0 || f.hold != 0) {
						t.Fatalf("%s: a rotation takes a node down or holds: %+v", p.Name, f)
					}
					// A revocation touches no member, and holds long enough
					// for the robot's writes past revokeGrace to be judged.
					if f.kind == FaultRevoke && (f.robot != robotTarget || f.node != "" || len(f.nodes) > 0 || f.hold < 3*time.Second) {
						t.Fatalf("%s: a revocation drew %+v", p.Name, f)
					}
					// A rotation needs every member up, occupies them all and
					// takes down only the node it restarts.
					if f.kind == FaultGossipKey && (f.node == "" || !slices.Equal(f.nodes, []string{f.node}) || f.hold != 0 ||
						len(f.members) != len(p.Nodes)+len(p.Gateways)) {
						t.Fatalf("%s: a gossip key rotation drew %+v", p.Name, f)
					}
					got = append(got, f.kind+" "+f.target)
					kinds[f.kind]++
					inj.active[f] = true
				}
				// Check the invariants over the active set.
				down, _ := inj.busy()
				if len(down) > p.maxNodesDown() {
					t.Fatalf("%s: %d nodes down at once: %v", p.Name, len(down), down)
				}
				targets := map[string]int{}
				for a := range inj.active {
					xs := append(slices.Clone(a.groups[0]), append(a.groups[1], a.region, a.gateway, a.robot)...)
					// A rotation's node is among its members.
					if len(a.members) > 0 {
						xs = append(xs, a.members...)
					} else {
						xs = append(xs, a.node)
					}
					for _, x := range xs {
						if x != "" {
							targets[x]++
						}
					}
				}
				for x, n := range targets {
					if n > 1 {
						t.Fatalf("%s: %s is the target of %d faults at once", p.Name, x, n)
					}
				}
				// Leave room for the next draw, as InjectFaults does, ending the
				// oldest (and now and then more).
				if f != nil {
					order = append(order, f)
				}
				for len(order) > max(p.MaxFaults, 1)-1 || (len(order) > 0 && i%3 == 0) {
					delete(inj.active, order[0])
					order = order[1:]
				}
			}
			for _, k := range FaultKinds {
				if kinds[k] == 0 {
					t.Errorf("%s: kind %s never drawn (%v)", p.Name, k, kinds)
				}
			}
			return got
		}
		a, b := drawAll(42), drawAll(42)
		if !reflect.DeepEqual(a, b) {
			t.Fatalf("%s: the same seed drew different faults", p.Name)
		}
		if reflect.DeepEqual(a, drawAll(43)) {
			t.Fatalf("%s: different seeds drew the same faults", p.Name)
		}
	}
}

// TestFaultDrawLeaderUnknown: a kill that must hit the leader is not
// drawn while no leader is known (InjectFaults retries it), and never
// falls back to another node; a leader-biased pause does fall back.
func TestFaultDrawLeaderUnknown(t *testing.T) {
	c := fakeCluster(ShortProfile())
	inj := &injector{c: c, leader: fixedLeader(""), active: map[*faultSpec]bool{}, changed: make(chan struct{})}
	if f := inj.draw(context.Background(), faultSlot{kind: FaultKill, seed: 3, leader: 1}); f != nil {
		t.Fatalf("a leader kill without a known leader drew %+v", f)
	}
	if f := inj.draw(context.Background(), faultSlot{kind: FaultPause, seed: 3, leader: 0.6}); f == nil || f.leader {
		t.Fatalf("a leader-biased pause without a known leader drew %+v", f)
	}
	inj.leader = fixedLeader("eu-west-a")
	if f := inj.draw(context.Background(), faultSlot{kind: FaultKill, seed: 3, leader: 1}); f == nil || f.node != "eu-west-a" || !f.leader {
		t.Fatalf("a leader kill drew %+v; the leader is eu-west-a", f)
	}
}

// TestFaultHoldCap: the profile's MaxFaultHold bounds every fault, and
// the short profile's round of every kind fits its workload even when
// every gap and hold is at its maximum and each restart takes 10 s.
func TestFaultHoldCap(t *testing.T) {
	p := ShortProfile()
	c := fakeCluster(p)
	inj := &injector{c: c, leader: fixedLeader("us-east-a"), active: map[*faultSpec]bool{}, changed: make(chan struct{})}
	sched := newFaultSchedule(rand.New(rand.NewPCG(9, 9)), p.faultKinds(nil), p.FaultEvery)
	for range 200 {
		slot := sched.next()
		f := inj.draw(context.Background(), slot)
		if f == nil {
			t.Fatalf("nothing drawn for %+v on an idle cluster", slot)
		}
		if f.hold > p.MaxFaultHold {
			t.Fatalf("%s held %v, more than %v", f.kind, f.hold, p.MaxFaultHold)
		}
	}
	// A fault starts a gap after the previous one began, or, if that one
	// still runs, 2 s after it ended; the first comes after one gap.
	const restart, settle = 10 * time.Second, 2 * time.Second
	worst := p.FaultEvery * 3 / 2
	for _, k := range p.faultKinds(nil) {
		busy := p.MaxFaultHold + settle
		if k == FaultKill || k == FaultGatewayKill || k == FaultS3Stop {
			busy += restart
		}
		if k == FaultCertRotate {
			// No hold: the rotation lasts until the node serves the new
			// certificate, at most certRotateWithin.
			busy = certRotateWithin + settle
		}
		if k == FaultRevoke {
			// At most 6 s held, then a robot created; the revocation
			// and the creation take a Raft commit each.
			busy = 6*time.Second + 2*time.Second + settle
		}
		if k == FaultGossipKey {
			// Three CLI steps (a few seconds at most), then a node's
			// restart and gossip, at most gossipKeyWithin.
			busy = 5*time.Second + gossipKeyWithin + settle
		}
		worst += max(p.FaultEvery*3/2, busy)
	}
	if worst > p.Workload {
		t.Fatalf("a worst-case round of %d kinds takes %v, the workload only %v", len(p.faultKinds(nil)), worst, p.Workload)
	}
}

// TestFaultQuotas: the quotas name every kind the profile can have, each
// round's worth, and a leader kill every other round; only injected
// faults count, and only leader kills for the leader quota.
func TestFaultQuotas(t *testing.T) {
	short := ShortProfile()
	qs := FaultQuotas(short, nil, 1)
	var names []string
	for _, q := range qs {
		names = append(names, q.String())
	}
	want := []string{"kill 0 of at least 1", "kill (leader) 0 of at least 1", "pause 0 of at least 1", "partition 0 of at least 1",
		"latency 0 of at least 1", "s3-error 0 of at least 1", "s3-stall 0 of at least 1", "s3-stop 0 of at least 1", "gateway-kill 0 of at least 1",
		"cert-rotate 0 of at least 1", "revoke 0 of at least 1", "gossip-key 0 of at least 1"}
	if !reflect.DeepEqual(names, want) {
		t.Fatalf("short quotas:\n got %q\nwant %q", names, want)
	}
	if qs := FaultQuotas(LongProfile(), []string{FaultKill, FaultPartition}, 4); len(qs) != 3 || qs[1].Min != 2 || qs[2].Kind != FaultPartition || qs[2].Min != 4 {
		t.Fatalf("long, kill and partition: %+v", qs)
	}
	noS3 := short
	noS3.Regions = []RegionSpec{{Name: "us-east"}, {Name: "eu-west"}}
	noS3.Gateways = nil
	for _, q := range FaultQuotas(noS3, nil, 1) {
		if q.Kind == FaultS3Stop || q.Kind == FaultGatewayKill {
			t.Fatalf("a cluster without S3 or gateways promised %s", q)
		}
	}
	if qs := FaultQuotas(LongProfile(), []string{FaultCertRotate}, 4); len(qs) != 1 || qs[0].Kind != FaultCertRotate || qs[0].Min != 4 {
		t.Fatalf("long, cert-rotate only: %+v", qs)
	}
	if qs := FaultQuotas(short, nil, 0); qs != nil {
		t.Fatalf("no rounds promised %v", qs)
	}

	got := countFaults(FaultQuotas(short, []string{FaultKill, FaultPause, FaultCertRotate}, 1), []Fault{
		{Kind: FaultKill, Target: "a"},
		{Kind: FaultKill, Target: "b", Leader: true, Error: "no such process"},
		{Kind: FaultPause, Target: "b", Leader: true},
		{Kind: FaultCertRotate, Target: "c", Error: "ca issue: exit status 1"},
	})
	if got[0].Got != 1 || got[1].Got != 0 || got[2].Got != 1 || got[3].Kind != FaultCertRotate || got[3].Got != 0 {
		t.Fatalf("counted %+v", got)
	}
	// A rotation that was injected counts, served or not: whether it was
	// served is the rotation check's verdict, not the schedule's.
	if got := countFaults(got, []Fault{{Kind: FaultCertRotate, Target: "c", Failure: "not served"}}); got[3].Got != 1 {
		t.Fatalf("an injected rotation not counted: %+v", got)
	}
	got = countFaults(got, []Fault{{Kind: FaultKill, Target: "b", Leader: true}})
	if got[0].Got != 1 || got[1].Got != 1 {
		t.Fatalf("a leader kill counted %+v", got)
	}
}

// TestFaultRounds: a shorter workload promises fewer rounds, never none.
func TestFaultRounds(t *testing.T) {
	long := LongProfile()
	for _, c := range []struct {
		workload time.Duration
		want     int
	}{{0, 4}, {30 * time.Minute, 4}, {time.Hour, 4}, {15 * time.Minute, 2}, {time.Minute, 1}} {
		if got := long.faultRounds(c.workload); got != c.want {
			t.Errorf("long, %v: %d rounds, want %d", c.workload, got, c.want)
		}
	}
	if got := ShortProfile().faultRounds(time.Second); got != 1 {
		t.Errorf("short, 1 s: %d rounds", got)
	}
}
