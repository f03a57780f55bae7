package chaos

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"time"
)

// Garbage collection during a run: a loop that sends `meridian gc run`
// with a short grace while the workload pushes and deletes, and, after
// healing, a last run and the wait until every region has removed what
// was condemned.

// gcGrace is the grace of the harness's runs. It is far below any real
// setting so that a run takes what a delete, or a push that never put its
// manifest, left unreferenced a moment ago, while other pushes of the same
// blobs are in flight: each of those must then keep its blobs or be
// refused.
const gcGrace = 2 * time.Second

// gcEvery is the mean pause between the loop's runs.
const gcEvery = 5 * time.Second

// gcRunTimeout bounds one run of the loop; a run sent to a paused node
// waits that long.
const gcRunTimeout = 20 * time.Second

// gcClient is the client number of the collections in the history.
const gcClient = -3

// GCLoop runs a collection through a random node (whatever its state:
// failures during faults are expected and recorded) every gcEvery or so,
// until ctx ends, which also cuts short the run under way. Each run is
// recorded as an OpGC.
func (c *Cluster) GCLoop(ctx context.Context, h *History, rng *rand.Rand) {
	for holdFor(ctx, gcEvery/2+time.Duration(rng.Int64N(int64(gcEvery)))) {
		h.Add(c.collect(ctx, h, c.nodes[rng.IntN(len(c.nodes))], gcRunTimeout))
	}
}

// collect runs `meridian gc run --grace gcGrace` through n and returns the
// run as an op, not yet recorded.
func (c *Cluster) collect(ctx context.Context, h *History, n *nodeProc, timeout time.Duration) Op {
	args := []string{"gc", "run", "--grace", gcGrace.String(), "--json"}
	op := Op{Client: gcClient, Kind: OpGC, Gateway: n.spec.ID, Request: strings.Join(args[2:4], " "), Start: h.Now()}
	out, err := c.runAdmin(ctx, n, timeout, args...)
	op.End = h.Now()
	if err != nil {
		op.Outcome, op.Err = OutcomeUnknown, err.Error()
		return op
	}
	run, err := parseGCRun([]byte(out))
	if err != nil {
		op.Outcome, op.Err = OutcomeUnknown, err.Error()
		return op
	}
	op.Outcome, op.Detail = OutcomeOK, run.String()
	return op
}

// gcRunJSON is RunGCResponse as `meridian gc run --json` prints it
// (protojson: lowerCamelCase, 64-bit integers as strings).
type gcRunJSON struct {
	RunID string `json:"runId"`
	Blobs []struct {
		Condemned bool `json:"condemned"`
	} `json:"blobs"`
	Run struct {
		Candidates     jint `json:"candidates"`
		BlobsCondemned jint `json:"blobsCondemned"`
		BytesCondemned jint `json:"bytesCondemned"`
		LinksDropped   jint `json:"linksDropped"`
	} `json:"run"`
	Duration jint `json:"durationNanos"`
}

func parseGCRun(b []byte) (gcRunJSON, error) {
	var r gcRunJSON
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("gc run JSON: %w", err)
	}
	if r.RunID == "" {
		return r, errors.New("gc run JSON: no run id")
	}
	return r, nil
}

// String says what the run did; its plan (candidates) can be larger when
// pushes kept some of them.
func (r gcRunJSON) String() string {
	return fmt.Sprintf("run %s: %d candidates, %d links dropped, %d blobs condemned (%d bytes) in %v",
		r.RunID, r.Run.Candidates, r.Run.LinksDropped, r.Run.BlobsCondemned, r.Run.BytesCondemned,
		time.Duration(r.Duration).Round(time.Millisecond))
}

// gcStatusJSON is GCStatusResponse as `meridian gc status --json` prints
// it.
type gcStatusJSON struct {
	LastRun *struct {
		RunID   string `json:"runId"`
		Started jint   `json:"startedUnixNano"`
	} `json:"lastRun"`
	Regions []struct {
		Region       string `json:"region"`
		BlobsPending jint   `json:"blobsPending"`
		BytesPending jint   `json:"bytesPending"`
	} `json:"regions"`
}

// gcPending reads a `meridian gc status --json` answer: the blobs each
// region still has to remove, and whether the state it was read from has
// applied a run that started at since (Unix nanoseconds) or later: a
// follower that has not yet applied the last run shows nothing pending.
func gcPending(b []byte, since int64) (pending map[string]int64, current bool, err error) {
	var s gcStatusJSON
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, false, fmt.Errorf("gc status JSON: %w", err)
	}
	pending = map[string]int64{}
	for _, r := range s.Regions {
		pending[r.Region] = int64(r.BlobsPending)
	}
	return pending, s.LastRun != nil && int64(s.LastRun.Started) >= since, nil
}

// GCDrain is the last collection of a run, after healing, and whether
// every region then removed what it condemned.
type GCDrain struct {
	// Run says what the last run did ("" when none succeeded).
	Run string `json:"run,omitempty"`
	// Drained: a node that had applied the run showed no removal pending
	// in any region; Took is from the run's start until then.
	Drained bool          `json:"drained"`
	Took    time.Duration `json:"took"`
	// Pending is what was still to remove when the wait ended, per
	// region, and Err why it ended, when not Drained.
	Pending map[string]int64 `json:"pending,omitempty"`
	Err     string           `json:"error,omitempty"`
}

func (d GCDrain) String() string {
	if d.Drained {
		return fmt.Sprintf("after the last gc run (%s) every region's removals were done in %v", d.Run, d.Took.Round(time.Millisecond))
	}
	if d.Run == "" {
		return "no last gc run succeeded: " + d.Err
	}
	regions := make([]string, 0, len(d.Pending))
	for r, n := range d.Pending {
		if n != 0 {
			regions = append(regions, fmt.Sprintf("%s %d blobs", r, n))
		}
	}
	slices.Sort(regions)
	return fmt.Sprintf("after the last gc run (%s) removals still pending after %v: %s (%s)",
		d.Run, d.Took.Round(time.Millisecond), orDash(strings.Join(regions, ", ")), d.Err)
}

// FinalGC runs a last collection (through each live node in turn until
// one succeeds, recorded in h) and waits until `meridian gc status` from a
// node that has applied it shows no removal pending in any of regions,
// or ctx ends.
func (c *Cluster) FinalGC(ctx context.Context, h *History, regions []string) GCDrain {
	start := time.Now()
	var d GCDrain
	var since int64 // before the successful run began on the leader (same clock)
	for since == 0 {
		for _, n := range c.nodes {
			if !n.proc.Running() || n.proc.Paused() {
				continue
			}
			sent := time.Now().UnixNano()
			op := c.collect(ctx, h, n, 2*time.Minute)
			h.Add(op)
			if op.Outcome == OutcomeOK {
				d.Run, since = op.Detail, sent
				break
			}
			d.Err = op.Err
		}
		if since == 0 && !holdFor(ctx, time.Second) {
			d.Took = time.Since(start)
			return d
		}
	}
	d.Err = "no gc status yet"
	err := pollUntil(ctx, time.Until(deadlineOf(ctx)), time.Second, nil, func() bool {
		out, err := c.adminCommand(ctx, true, "gc", "status", "--json")
		if err != nil {
			d.Err = err.Error()
			return false
		}
		pending, current, err := gcPending([]byte(out), since)
		switch {
		case err != nil:
			d.Err = err.Error()
			return false
		case !current:
			d.Err = "the node that answered has not applied the run yet"
			return false
		}
		d.Pending, d.Err = pending, "removals pending"
		for _, r := range regions {
			if n, ok := pending[r]; !ok || n != 0 {
				if !ok {
					d.Err = "region " + r + " missing from gc status"
				}
				return false
			}
		}
		return true
	})
	d.Took = time.Since(start)
	if err == nil {
		d.Drained, d.Pending, d.Err = true, nil, ""
	} else {
		d.Err = err.Error() + ": " + d.Err
	}
	return d
}
