package chaos

import (
	"context"
	"io"
	"math/rand/v2"
	"reflect"
	"slices"
	"testing"
)

// fakeCluster has the profile's shape and no processes: the draw never
// finds a leader, so leader-biased faults pick at random.
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

// TestFaultDraws: with faults kept active, draws never take down more than
// a minority of voters, never hit a busy target, never mix restarts with
// S3 faults, and a seed gives the same sequence.
func TestFaultDraws(t *testing.T) {
	for _, p := range []Profile{ShortProfile(), LongProfile()} {
		drawAll := func(seed uint64) []string {
			c := fakeCluster(p)
			inj := &injector{c: c, active: map[*faultSpec]bool{}, changed: make(chan struct{})}
			rng := rand.New(rand.NewPCG(seed, 1))
			var got []string
			var order []*faultSpec
			kinds := map[string]int{}
			for i := range 3000 {
				f := inj.draw(context.Background(), rng, FaultKinds)
				if f == nil {
					got = append(got, "-")
				} else {
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
					for _, x := range append(slices.Clone(a.groups[0]), append(a.groups[1], a.node, a.region, a.gateway)...) {
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
