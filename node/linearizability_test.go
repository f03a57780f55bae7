package node_test

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"

	"github.com/meridian-registry/meridian/node"
	"github.com/meridian-registry/meridian/node/clustertest"
)

// TestStrongReadsLinearizable records a history of concurrent tag writes
// and reads through every node of a cluster with read_consistency strong,
// and checks it for linearizability: each tag is a register holding a
// manifest digest.
func TestStrongReadsLinearizable(t *testing.T) {
	// First prove the checker wiring: a history with a stale read must be
	// rejected, or a passing run below would mean nothing.
	t.Run("checker rejects a stale read", testTagRegisterChecker)

	const (
		nodes      = 3
		clients    = 6
		opsPerUser = 50 // 300 operations in all
		writeShare = 0.4
	)
	tags := []string{"a", "b", "c"}
	c := clustertest.New(t, nodes, clustertest.WithConfig(func(_ int, cfg *node.Config) {
		cfg.ReadConsistency = "strong"
	}))
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	if err := c.WaitVoters(ctx, nodes); err != nil {
		t.Fatal(err)
	}
	reg := rawRegistry{c: c, client: c.Client()}
	const repo = "linear/app"
	leader, err := c.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	img, err := reg.pushSmallImage(ctx, leader, repo)
	if err != nil {
		t.Fatal(err)
	}

	seed := rand.Uint64()
	t.Logf("operation mix seed %d", seed)
	var (
		mu      sync.Mutex
		history []porcupine.Operation
		stats   tagHistoryStats
		wg      sync.WaitGroup
	)
	base := time.Now()
	now := func() int64 { return time.Since(base).Nanoseconds() } // monotonic
	for client := range clients {
		via := client % nodes
		rng := rand.New(rand.NewPCG(seed, uint64(client)))
		wg.Go(func() {
			for k := range opsPerUser {
				tag := tags[rng.IntN(len(tags))]
				op := porcupine.Operation{ClientId: client}
				if rng.Float64() < writeShare {
					body := img.manifest(fmt.Sprintf("client%d", client), k)
					in := tagOp{Tag: tag, Write: true, Value: digestOf(body)}
					op.Input, op.Call = in, now()
					r, err := reg.putTag(ctx, via, repo, tag, body)
					op.Return = now()
					switch {
					case err == nil && r.status == http.StatusCreated && r.digest == in.Value:
						stats.add(&mu, func(s *tagHistoryStats) { s.writes++ })
					case err == nil && r.status == http.StatusCreated:
						t.Errorf("PUT %s through node %d answered digest %s, want %s", tag, via, r.digest, in.Value)
						return
					case err != nil || r.status == http.StatusServiceUnavailable:
						// Unknown outcome: it may take effect at any time
						// after its call.
						op.Return = math.MaxInt64
						stats.add(&mu, func(s *tagHistoryStats) { s.unknownWrites++ })
					default:
						t.Errorf("PUT %s through node %d: %v", tag, via, r)
						return
					}
				} else {
					method := http.MethodGet
					if k%2 == 1 {
						method = http.MethodHead
					}
					op.Input, op.Call = tagOp{Tag: tag}, now()
					r, err := reg.getManifest(ctx, via, method, repo, tag)
					op.Return = now()
					switch {
					case err == nil && r.status == http.StatusOK && r.digest != "":
						op.Output = r.digest
						stats.add(&mu, func(s *tagHistoryStats) { s.reads++ })
					case err == nil && r.status == http.StatusNotFound:
						op.Output = ""
						stats.add(&mu, func(s *tagHistoryStats) { s.absent++ })
					case err != nil || r.status == http.StatusServiceUnavailable:
						// A failed read observed nothing.
						stats.add(&mu, func(s *tagHistoryStats) { s.droppedReads++ })
						continue
					default:
						t.Errorf("%s %s through node %d: %v", method, tag, via, r)
						return
					}
				}
				mu.Lock()
				history = append(history, op)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	took := time.Since(base)
	if t.Failed() {
		return
	}
	t.Logf("%d operations by %d clients through %d nodes over %d tags in %v: %d writes acknowledged, %d with unknown outcome; %d reads of a digest, %d of no tag, %d failed reads dropped",
		len(history), clients, nodes, len(tags), took.Round(time.Millisecond),
		stats.writes, stats.unknownWrites, stats.reads, stats.absent, stats.droppedReads)
	if stats.reads == 0 || stats.writes == 0 {
		t.Fatalf("the history has no acknowledged writes or no reads of a digest: nothing was checked")
	}
	checkTagHistory(t, history)
}

// tagHistoryStats counts what a history holds.
type tagHistoryStats struct {
	writes, unknownWrites, reads, absent, droppedReads int
}

func (s *tagHistoryStats) add(mu *sync.Mutex, f func(*tagHistoryStats)) {
	mu.Lock()
	defer mu.Unlock()
	f(s)
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
	res, info := porcupine.CheckOperationsVerbose(tagRegisterModel, history, 30*time.Second)
	t.Logf("porcupine: %s in %v", checkResultName(res), time.Since(start).Round(time.Millisecond))
	switch res {
	case porcupine.Ok:
		return
	case porcupine.Unknown:
		t.Fatalf("porcupine could not decide within 30s whether the %d operations are linearizable", len(history))
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
