package chaos

import (
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// Report summarizes a run: what the clients did, which faults were
// injected, how long the cluster was unavailable, whether it converged
// and what the checks found.
//
// Passed is true only when the run proved what it set out to: every
// check decided and passed (status "pass" with Checked > 0: a check that
// could not decide, such as a linearizability checker that timed out, or
// that had nothing to check, proved nothing and fails the run), the
// cluster converged after healing (Convergence present and Converged),
// and every fault quota of the schedule was met (a promised kind that
// never found a moment to run fails the run too). Failures says why a run
// did not pass.
type Report struct {
	Seed     uint64        `json:"seed"`
	Profile  string        `json:"profile"`
	Started  time.Time     `json:"started"`
	Duration time.Duration `json:"duration"` // of the workload phase

	Ops map[OpKind]map[Outcome]int `json:"operations"`

	Faults []Fault `json:"faults"`
	// FaultCounts counts the injected faults by kind (those that could
	// not be injected are not counted).
	FaultCounts map[string]int `json:"fault_counts"`
	// FaultQuotas are the schedule's promises and how many it kept.
	FaultQuotas []FaultQuota `json:"fault_quotas"`

	// The longest stretch of the workload phase without a successful
	// write, and without an answered read (see NewReport).
	LongestWriteUnavailability time.Duration `json:"longest_write_unavailability"`
	LongestReadUnavailability  time.Duration `json:"longest_read_unavailability"`

	Checks      []CheckResult `json:"checks"`
	Convergence *Convergence  `json:"convergence"`
	Notes       []string      `json:"notes,omitempty"`
	Failures    []string      `json:"failures,omitempty"`
	Passed      bool          `json:"passed"`
}

// NewReport builds the report of a run whose workload phase lasted
// workload (operation times count from the start of the history, which is
// also the start of the workload phase). quotas are the fault schedule's
// promises (FaultQuotas; none for a run without faults); their Got is
// counted here from faults.
//
// Write unavailability is the longest interval within [0, workload]
// between the ends of consecutive successful writes, counting from 0 to
// the first and from the last to the window's end: acknowledged pushes,
// mounts and deletes (of manifests and of blobs), and tag writes
// answered either 2xx or 412 (a 412 is a definite answer from a working
// leader). Read unavailability is the same for pulls and tag reads
// answered 2xx or 404. Verifies (after healing) and garbage collections
// (the harness's, not a client's) are not counted.
func NewReport(seed uint64, profile string, started time.Time, workload time.Duration, ops []Op, faults []Fault, quotas []FaultQuota, checks []CheckResult, conv *Convergence) *Report {
	r := &Report{
		Seed: seed, Profile: profile, Started: started, Duration: workload,
		Ops:         map[OpKind]map[Outcome]int{},
		Faults:      slices.Clone(faults),
		FaultCounts: map[string]int{},
		FaultQuotas: countFaults(quotas, faults),
		Checks:      checks,
		Convergence: conv,
	}
	if r.FaultQuotas == nil {
		r.FaultQuotas = []FaultQuota{}
	}
	if r.Faults == nil {
		r.Faults = []Fault{}
	}
	slices.SortStableFunc(r.Faults, func(a, b Fault) int { return cmp.Compare(a.Start, b.Start) })
	var writes, reads []time.Duration
	for _, op := range ops {
		m := r.Ops[op.Kind]
		if m == nil {
			m = map[Outcome]int{}
			r.Ops[op.Kind] = m
		}
		m[op.Outcome]++
		if isSuccessfulWrite(op) {
			writes = append(writes, op.End)
		}
		if isAnsweredRead(op) {
			reads = append(reads, op.End)
		}
	}
	for _, f := range faults {
		if f.Error == "" {
			r.FaultCounts[f.Kind]++
		}
	}
	r.LongestWriteUnavailability = longestGap(writes, workload)
	r.LongestReadUnavailability = longestGap(reads, workload)
	r.Failures = verdict(checks, r.FaultQuotas, conv)
	r.Passed = len(r.Failures) == 0
	return r
}

// verdict lists why a run with these checks, fault quotas (Got counted)
// and convergence did not pass; none means it passed. A run without
// checks proved nothing and does not pass.
func verdict(checks []CheckResult, quotas []FaultQuota, conv *Convergence) []string {
	var why []string
	if len(checks) == 0 {
		why = append(why, "no check ran")
	}
	for _, c := range checks {
		switch {
		case c.Status == CheckFail:
			why = append(why, fmt.Sprintf("check %s found %d violations", c.Name, len(c.Violations)))
		case c.Status != CheckPass:
			why = append(why, fmt.Sprintf("check %s did not decide (%s): %s", c.Name, c.Status, c.Detail))
		case c.Checked <= 0:
			why = append(why, fmt.Sprintf("check %s had nothing to check", c.Name))
		}
	}
	for _, q := range quotas {
		if q.Got < q.Min {
			why = append(why, "fault quota not met: "+q.String())
		}
	}
	switch {
	case conv == nil:
		why = append(why, "convergence was not measured")
	case !conv.Converged:
		why = append(why, "the cluster did not converge after healing: "+conv.Detail)
	}
	return why
}

func isSuccessfulWrite(op Op) bool {
	switch op.Kind {
	case OpPush, OpMount, OpDelete, OpDeleteBlob:
		return op.Outcome == OutcomeOK
	case OpTagWrite:
		return op.Outcome == OutcomeOK || op.Outcome == OutcomeFail
	}
	return false
}

func isAnsweredRead(op Op) bool {
	switch op.Kind {
	case OpPullManifest, OpPullBlob, OpTagRead:
		return op.Outcome == OutcomeOK || op.Outcome == OutcomeNotFound
	}
	return false
}

// longestGap is the longest interval within [0, window] between
// consecutive instants of ends (and from 0 to the first, and from the last
// to window); ends outside the window are ignored.
func longestGap(ends []time.Duration, window time.Duration) time.Duration {
	if window <= 0 {
		return 0
	}
	in := make([]time.Duration, 0, len(ends))
	for _, e := range ends {
		if e >= 0 && e <= window {
			in = append(in, e)
		}
	}
	slices.Sort(in)
	var longest, prev time.Duration
	for _, e := range append(in, window) {
		longest = max(longest, e-prev)
		prev = e
	}
	return longest
}

// Violations is the number of violations all checks found.
func (r *Report) Violations() int {
	n := 0
	for _, c := range r.Checks {
		n += len(c.Violations)
	}
	return n
}

// MarshalJSON adds human-readable durations beside the nanosecond counts.
func (r *Report) MarshalJSON() ([]byte, error) {
	type plain Report // without this method
	return json.Marshal(struct {
		*plain
		DurationText        string `json:"duration_text"`
		WriteUnavailability string `json:"longest_write_unavailability_text"`
		ReadUnavailability  string `json:"longest_read_unavailability_text"`
	}{
		plain:               (*plain)(r),
		DurationText:        r.Duration.String(),
		WriteUnavailability: r.LongestWriteUnavailability.String(),
		ReadUnavailability:  r.LongestReadUnavailability.String(),
	})
}

// WriteJSON writes the report as indented JSON to path.
func (r *Report) WriteJSON(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// Limits of the text report; the JSON keeps everything.
const (
	maxTextViolations   = 20 // per check
	maxTextViolationOps = 20 // per violation
)

var (
	kindOrder    = []OpKind{OpPush, OpMount, OpPullManifest, OpPullBlob, OpTagRead, OpTagWrite, OpDelete, OpDeleteBlob, OpGC, OpRobotWrite, OpVerify}
	outcomeOrder = []Outcome{OutcomeOK, OutcomeFail, OutcomeUnknown, OutcomeNotFound}
)

// WriteText writes a human summary of the report to w.
func (r *Report) WriteText(w io.Writer) error {
	ew := &errWriter{w: w}
	p := func(format string, args ...any) { fmt.Fprintf(ew, format, args...) }

	p("chaos run: profile %s, seed %d, started %s, workload %s\n",
		orDash(r.Profile), r.Seed, r.Started.Format(time.RFC3339), r.Duration.Round(time.Millisecond))

	p("\noperations\n")
	kinds := orderedKeys(r.Ops, kindOrder)
	var outcomes []Outcome
	{
		seen := map[Outcome]int{}
		for _, m := range r.Ops {
			for o, n := range m {
				seen[o] += n
			}
		}
		outcomes = orderedKeys(seen, outcomeOrder)
	}
	// Numbers align right; padding the first column keeps names left.
	w0 := len("total")
	for _, k := range kinds {
		w0 = max(w0, len(k))
	}
	name := func(s string) string { return fmt.Sprintf("%-*s", w0, s) }
	tw := tabwriter.NewWriter(ew, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "%s\t", name("kind"))
	for _, o := range outcomes {
		fmt.Fprintf(tw, "%s\t", o)
	}
	fmt.Fprint(tw, "total\t\n")
	colTotal := map[Outcome]int{}
	all := 0
	for _, k := range kinds {
		fmt.Fprintf(tw, "%s\t", name(string(k)))
		sum := 0
		for _, o := range outcomes {
			n := r.Ops[k][o]
			fmt.Fprintf(tw, "%d\t", n)
			sum += n
			colTotal[o] += n
		}
		all += sum
		fmt.Fprintf(tw, "%d\t\n", sum)
	}
	fmt.Fprintf(tw, "%s\t", name("total"))
	for _, o := range outcomes {
		fmt.Fprintf(tw, "%d\t", colTotal[o])
	}
	fmt.Fprintf(tw, "%d\t\n", all)
	tw.Flush()

	injected := 0
	for _, n := range r.FaultCounts {
		injected += n
	}
	p("\nfaults injected: %d\n", injected)
	if len(r.FaultQuotas) > 0 {
		p("  promised by the schedule:\n")
		for _, q := range r.FaultQuotas {
			mark := "ok"
			if q.Got < q.Min {
				mark = "MISSING"
			}
			p("    %-7s %s\n", mark, q)
		}
	}
	if len(r.Faults) > 0 {
		names := make([]string, 0, len(r.FaultCounts))
		for k := range r.FaultCounts {
			names = append(names, k)
		}
		slices.Sort(names)
		tw = tabwriter.NewWriter(ew, 0, 0, 2, ' ', 0)
		for _, k := range names {
			fmt.Fprintf(tw, "  %s\t%d\n", k, r.FaultCounts[k])
		}
		tw.Flush()
		p("\n")
		tw = tabwriter.NewWriter(ew, 0, 0, 2, ' ', 0)
		for _, f := range r.Faults {
			when := fmtOffset(f.Start) + " (one-shot)"
			if f.End > 0 {
				when = fmtOffset(f.Start) + "–" + fmtOffset(f.End)
			}
			detail := f.Detail
			if f.Error != "" {
				detail = strings.TrimSpace(detail + " NOT INJECTED: " + f.Error)
			}
			if f.Failure != "" {
				detail = strings.TrimSpace(detail + " FAILED: " + f.Failure)
			}
			if detail == "" {
				fmt.Fprintf(tw, "  %s\t%s\t%s\n", when, f.Kind, f.Target)
			} else {
				fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\n", when, f.Kind, f.Target, detail)
			}
		}
		tw.Flush()
	}

	p("\navailability during the workload\n")
	p("  longest without a successful write: %s\n", r.LongestWriteUnavailability.Round(time.Millisecond))
	p("  longest without an answered read:   %s\n", r.LongestReadUnavailability.Round(time.Millisecond))

	p("\nconvergence\n")
	switch c := r.Convergence; {
	case c == nil:
		p("  not measured\n")
	default:
		verdict := "converged"
		if !c.Converged {
			verdict = "DID NOT CONVERGE"
		}
		p("  %s after %s: applied index %d, state digest %s\n",
			verdict, c.Took.Round(time.Millisecond), c.Applied, abbrev(c.Digest, 16))
		for _, g := range c.Regions {
			p("  region %s: %d blobs (%d bytes) missing\n", g.Region, g.MissingBlobs, g.MissingBytes)
		}
		if c.Detail != "" {
			p("  %s\n", c.Detail)
		}
	}

	p("\nchecks\n")
	for _, c := range r.Checks {
		p("  %-7s %s: %d checked, %d violations", strings.ToUpper(string(c.Status)), c.Name, c.Checked, len(c.Violations))
		if c.Took >= time.Millisecond {
			p(", in %s", c.Took.Round(time.Millisecond))
		}
		p("\n")
		if c.Detail != "" {
			p("          %s\n", c.Detail)
		}
	}
	for _, c := range r.Checks {
		if len(c.Violations) == 0 {
			continue
		}
		p("\nviolations of %s\n", c.Name)
		for i, v := range c.Violations {
			if i == maxTextViolations {
				p("  … and %d more violations (see the JSON report)\n", len(c.Violations)-i)
				break
			}
			p("  %d. %s\n", i+1, v.Message)
			for j, op := range v.Ops {
				if j == maxTextViolationOps {
					p("       … and %d more operations\n", len(v.Ops)-j)
					break
				}
				p("       %s\n", formatOp(op))
			}
		}
	}

	if len(r.Notes) > 0 {
		p("\nnotes\n")
		for _, n := range r.Notes {
			p("  %s\n", n)
		}
	}

	p("\n")
	if r.Passed {
		p("PASS\n")
	} else {
		p("FAIL: %d violations\n", r.Violations())
		for _, f := range r.Failures {
			p("  %s\n", f)
		}
	}
	return ew.err
}

// formatOp is one line per operation: id, client, kind, gateway,
// repo:tag@digest, start–end, outcome, status, and what else it carries.
func formatOp(op Op) string {
	var b strings.Builder
	fmt.Fprintf(&b, "#%d c%d %s %s", op.ID, op.Client, op.Kind, orDash(op.Gateway))
	if op.Consistency != "" {
		fmt.Fprintf(&b, "(%s)", op.Consistency)
	}
	fmt.Fprintf(&b, " %s %s–%s %s", opRef(op), fmtOffset(op.Start), fmtOffset(op.End), op.Outcome)
	if op.Status != 0 {
		fmt.Fprintf(&b, " %d", op.Status)
	}
	switch op.Kind {
	case OpTagWrite:
		switch op.Cond {
		case CondIfMatch:
			fmt.Fprintf(&b, " if-match=%s", shortOrAbsent(op.Expect))
		case CondIfNoneMatch:
			b.WriteString(" if-none-match")
		}
		fmt.Fprintf(&b, " value=%s", shortOrAbsent(op.Value))
	case OpTagRead:
		if op.Outcome == OutcomeOK {
			fmt.Fprintf(&b, " value=%s", shortOrAbsent(op.Value))
		}
	case OpMount:
		fmt.Fprintf(&b, " from=%s", op.From)
	case OpRobotWrite:
		fmt.Fprintf(&b, " %s", op.Request)
	case OpGC:
		fmt.Fprintf(&b, " %s", op.Request)
		if op.Detail != "" {
			fmt.Fprintf(&b, " (%s)", op.Detail)
		}
	}
	if op.User != "" {
		fmt.Fprintf(&b, " as=%s", op.User)
	}
	if op.Got != "" {
		fmt.Fprintf(&b, " got=%s", shortDigest(op.Got))
	}
	if op.Err != "" {
		e := op.Err
		if len(e) > 160 {
			e = e[:160] + "…"
		}
		fmt.Fprintf(&b, " err=%q", e)
	}
	return b.String()
}

// orderedKeys lists m's keys: those of order first, in that order, then
// the rest sorted.
func orderedKeys[K ~string, V any](m map[K]V, order []K) []K {
	var out, rest []K
	for _, k := range order {
		if _, ok := m[k]; ok {
			out = append(out, k)
		}
	}
	for k := range m {
		if !slices.Contains(order, k) {
			rest = append(rest, k)
		}
	}
	slices.Sort(rest)
	return append(out, rest...)
}

func abbrev(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return orDash(s)
}

// errWriter keeps the first write error so that the text can be written
// without checking each line.
type errWriter struct {
	w   io.Writer
	err error
}

func (e *errWriter) Write(p []byte) (int, error) {
	if e.err != nil {
		return 0, e.err
	}
	n, err := e.w.Write(p)
	e.err = err
	return n, err
}
