package chaos

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

var testStarted = time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)

func convergedState() *Convergence {
	return &Convergence{Converged: true, Took: 3200 * time.Millisecond, Applied: 4242,
		Digest:  "0123456789abcdef0123456789abcdef",
		Regions: []RegionLag{{Region: "eu", MissingBlobs: 0}, {Region: "us", MissingBlobs: 0}}}
}

func testFaults() []Fault {
	return []Fault{
		{Kind: "partition", Target: "n1,n2|n3", Start: 5 * time.Second, End: 9 * time.Second},
		{Kind: "kill", Target: "n2", Start: 2 * time.Second},
		{Kind: "kill", Target: "n3", Start: 12 * time.Second},
	}
}

func reportText(t *testing.T, r *Report) string {
	t.Helper()
	var b bytes.Buffer
	if err := r.WriteText(&b); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func TestReportPass(t *testing.T) {
	ops := cleanHistory()
	checks := CheckHistory(ops, 10*time.Second)
	r := NewReport(7, "short", testStarted, 3*time.Second, ops, testFaults(), testQuotas(), checks, convergedState())
	if !r.Passed {
		t.Fatalf("clean history did not pass: %v", r.Notes)
	}
	text := reportText(t, r)
	if !strings.HasSuffix(text, "\nPASS\n") {
		t.Errorf("text does not end with PASS:\n%s", text)
	}
	for _, want := range []string{"seed 7", "push", "tag-write", "partition", "n1,n2|n3", "applied index 4242", "0123456789abcdef…", CheckNameLinearizable} {
		if !strings.Contains(text, want) {
			t.Errorf("text lacks %q:\n%s", want, text)
		}
	}
	if r.Ops[OpPush][OutcomeOK] != 3 || r.Ops[OpTagWrite][OutcomeFail] != 2 || r.FaultCounts["kill"] != 2 {
		t.Errorf("counts: ops %v faults %v", r.Ops, r.FaultCounts)
	}
	if r.Faults[0].Kind != "kill" || r.Faults[0].Target != "n2" {
		t.Errorf("faults not in chronological order: %+v", r.Faults)
	}
}

func TestReportViolationFails(t *testing.T) {
	var h testHist
	const repo = "chaos/app9"
	h.add(hPush(0, repo, "v0", testDigest("m"), 0, 100, OutcomeOK))
	h.add(hVerify(repo, "v0", "", 500, 600, OutcomeFail))
	ops := h.sorted()
	checks := CheckHistory(ops, 10*time.Second)
	r := NewReport(1, "short", testStarted, time.Second, ops, nil, nil, checks, convergedState())
	if r.Passed {
		t.Fatal("a lost write passed")
	}
	msg := checks[0].Violations[0].Message
	text := reportText(t, r)
	for _, want := range []string{"FAIL: 1 violations", msg, "#0 c0 push gw-a(local) chaos/app9:v0@" + shortDigest(testDigest("m"))} {
		if !strings.Contains(text, want) {
			t.Errorf("text lacks %q:\n%s", want, text)
		}
	}
}

func TestReportPassedNeedsConvergence(t *testing.T) {
	ops := cleanHistory()
	checks := CheckHistory(ops, 10*time.Second)
	if r := NewReport(1, "", testStarted, time.Second, ops, nil, nil, checks, nil); r.Passed {
		t.Error("passed without a convergence result")
	}
	conv := convergedState()
	conv.Converged, conv.Detail = false, "n3 applied 4100"
	r := NewReport(1, "", testStarted, time.Second, ops, nil, nil, checks, conv)
	if r.Passed {
		t.Error("passed although the cluster did not converge")
	}
	if text := reportText(t, r); !strings.Contains(text, "FAIL: 0 violations\n  the cluster did not converge after healing: n3 applied 4100\n") {
		t.Errorf("text:\n%s", text)
	}
}

// testQuotas are what testFaults meets: two kills, one partition.
func testQuotas() []FaultQuota {
	return []FaultQuota{{Kind: "kill", Min: 2}, {Kind: "partition", Min: 1}}
}

// TestReportVerdict: a run passes only when every check decided and
// passed with something checked, every fault quota was met and the
// cluster converged; each way of proving nothing fails it, and the text
// says why.
func TestReportVerdict(t *testing.T) {
	decided := func() []CheckResult {
		return []CheckResult{
			{Name: CheckNameLostWrites, Status: CheckPass, Checked: 3},
			{Name: CheckNameLinearizable, Status: CheckPass, Checked: 9},
		}
	}
	for _, c := range []struct {
		name   string
		change func(checks []CheckResult, quotas []FaultQuota, faults []Fault) ([]CheckResult, []FaultQuota, []Fault)
		why    string // in the FAIL text; "" when the run passes
	}{
		{"everything decided", func(c []CheckResult, q []FaultQuota, f []Fault) ([]CheckResult, []FaultQuota, []Fault) {
			return c, q, f
		}, ""},
		{"checker timed out", func(c []CheckResult, q []FaultQuota, f []Fault) ([]CheckResult, []FaultQuota, []Fault) {
			c[1].Status, c[1].Detail = CheckUnknown, "the linearizability checker timed out"
			return c, q, f
		}, "check " + CheckNameLinearizable + " did not decide (unknown): the linearizability checker timed out"},
		{"nothing checked", func(c []CheckResult, q []FaultQuota, f []Fault) ([]CheckResult, []FaultQuota, []Fault) {
			c[0].Checked = 0
			return c, q, f
		}, "check " + CheckNameLostWrites + " had nothing to check"},
		{"no checks at all", func(c []CheckResult, q []FaultQuota, f []Fault) ([]CheckResult, []FaultQuota, []Fault) {
			return nil, q, f
		}, "no check ran"},
		{"a check failed", func(c []CheckResult, q []FaultQuota, f []Fault) ([]CheckResult, []FaultQuota, []Fault) {
			c[0].Status, c[0].Violations = CheckFail, []Violation{{Message: "lost"}}
			return c, q, f
		}, "check " + CheckNameLostWrites + " found 1 violations"},
		{"a promised kind never ran", func(c []CheckResult, q []FaultQuota, f []Fault) ([]CheckResult, []FaultQuota, []Fault) {
			return c, append(q, FaultQuota{Kind: FaultGatewayKill, Min: 1}), f
		}, "fault quota not met: gateway-kill 0 of at least 1"},
		{"a kill could not be injected", func(c []CheckResult, q []FaultQuota, f []Fault) ([]CheckResult, []FaultQuota, []Fault) {
			f[1].Error = "no such process"
			return c, q, f
		}, "fault quota not met: kill 1 of at least 2"},
		{"no kill hit the leader", func(c []CheckResult, q []FaultQuota, f []Fault) ([]CheckResult, []FaultQuota, []Fault) {
			return c, append(q, FaultQuota{Kind: FaultKill, Leader: true, Min: 1}), f
		}, "fault quota not met: kill (leader) 0 of at least 1"},
	} {
		t.Run(c.name, func(t *testing.T) {
			checks, quotas, faults := c.change(decided(), testQuotas(), testFaults())
			r := NewReport(1, "short", testStarted, time.Second, nil, faults, quotas, checks, convergedState())
			text := reportText(t, r)
			if c.why == "" {
				if !r.Passed || len(r.Failures) > 0 || !strings.HasSuffix(text, "\nPASS\n") {
					t.Fatalf("did not pass: %v\n%s", r.Failures, text)
				}
				return
			}
			if r.Passed {
				t.Fatalf("passed:\n%s", text)
			}
			if !slices.Contains(r.Failures, c.why) || !strings.Contains(text, "FAIL: ") || !strings.Contains(text, "\n  "+c.why+"\n") {
				t.Fatalf("failures %q, want %q in them and the text:\n%s", r.Failures, c.why, text)
			}
		})
	}
}

// TestReportFaultQuotasText: the text lists every promise and marks the
// broken ones; faults that could not be injected say so and are not
// counted.
func TestReportFaultQuotasText(t *testing.T) {
	faults := append(testFaults(), Fault{Kind: FaultPause, Target: "n1", Start: 20 * time.Second, End: 20 * time.Second, Error: "no such process"})
	quotas := append(testQuotas(), FaultQuota{Kind: FaultPause, Min: 1})
	r := NewReport(1, "short", testStarted, time.Minute, nil, faults, quotas, nil, convergedState())
	text := reportText(t, r)
	for _, want := range []string{"faults injected: 3\n", "ok      kill 2 of at least 2", "ok      partition 1 of at least 1",
		"MISSING pause 0 of at least 1", "NOT INJECTED: no such process", "fault quota not met: pause 0 of at least 1"} {
		if !strings.Contains(text, want) {
			t.Errorf("text lacks %q:\n%s", want, text)
		}
	}
	if r.FaultCounts[FaultPause] != 0 {
		t.Errorf("a fault that was not injected counted: %v", r.FaultCounts)
	}
}

func TestReportTextCapsViolations(t *testing.T) {
	var vs []Violation
	for range 25 {
		v := Violation{Check: CheckNameWrongBytes, Message: "asked for x"}
		for range 30 {
			v.Ops = append(v.Ops, Op{Kind: OpPullBlob, Repo: "r"})
		}
		vs = append(vs, v)
	}
	checks := []CheckResult{{Name: CheckNameWrongBytes, Status: CheckFail, Checked: 25, Violations: vs}}
	r := NewReport(1, "", testStarted, time.Second, nil, nil, nil, checks, convergedState())
	text := reportText(t, r)
	if n := strings.Count(text, "asked for x"); n != 20 {
		t.Errorf("%d violations printed, want 20", n)
	}
	if n := strings.Count(text, "pull-blob"); n != 20*20 {
		t.Errorf("%d ops printed, want 400", n)
	}
	for _, want := range []string{"and 5 more violations", "and 10 more operations", "FAIL: 25 violations"} {
		if !strings.Contains(text, want) {
			t.Errorf("text lacks %q", want)
		}
	}
}

func TestReportJSON(t *testing.T) {
	var h testHist
	h.add(hPush(0, "chaos/app9", "v0", testDigest("m"), 0, 100, OutcomeOK))
	ops := h.sorted()
	checks := CheckHistory(ops, 10*time.Second)
	r := NewReport(99, "short", testStarted, 90*time.Second, ops, testFaults(), testQuotas(), checks, convergedState())
	path := filepath.Join(t.TempDir(), "report.json")
	if err := r.WriteJSON(path); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("invalid JSON: %v\n%s", err, b)
	}
	for _, k := range []string{"seed", "operations", "faults", "fault_counts", "fault_quotas", "checks", "convergence", "passed", "duration_text"} {
		if _, ok := m[k]; !ok {
			t.Errorf("JSON lacks %q", k)
		}
	}
	if m["duration_text"] != "1m30s" || m["passed"] != false {
		t.Errorf("duration_text %v, passed %v", m["duration_text"], m["passed"])
	}
	var back Report
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back.Seed != 99 || back.Duration != 90*time.Second || back.Ops[OpPush][OutcomeOK] != 1 ||
		len(back.Checks) != 4 || back.Checks[0].Status != CheckFail || len(back.Checks[0].Violations[0].Ops) != 1 ||
		back.Convergence == nil || back.Convergence.Applied != 4242 || !back.Started.Equal(testStarted) {
		t.Errorf("round trip lost data: %+v", back)
	}
}

func TestReportUnavailability(t *testing.T) {
	s := func(x float64) time.Duration { return time.Duration(x * float64(time.Second)) }
	op := func(kind OpKind, outcome Outcome, end float64) Op {
		return Op{Kind: kind, Outcome: outcome, Start: s(end) - 50*time.Millisecond, End: s(end)}
	}
	// Every op that must not count sits in the longest gap it would split.
	ops := []Op{
		op(OpTagRead, OutcomeOK, 1),
		op(OpPush, OutcomeOK, 2),
		op(OpMount, OutcomeOK, 3),
		op(OpPullBlob, OutcomeUnknown, 3),  // no answer
		op(OpVerify, OutcomeOK, 3.5),       // verifies run after healing: never counted
		op(OpPullManifest, OutcomeFail, 4), // a refusal is not an answer
		op(OpTagWrite, OutcomeFail, 5),     // a 412 is a definite answer
		op(OpPullBlob, OutcomeNotFound, 6), // a 404 is an answer: read gap 1→6 = 5s
		op(OpDelete, OutcomeOK, 7),         // write gap 7→10 = 3s
		op(OpPush, OutcomeFail, 8),
		op(OpPush, OutcomeUnknown, 8.5),
		op(OpTagWrite, OutcomeUnknown, 9),
		op(OpPullManifest, OutcomeOK, 9.5),
		op(OpTagWrite, OutcomeOK, 12), // outside the window
	}
	r := NewReport(1, "", testStarted, 10*time.Second, ops, nil, nil, nil, convergedState())
	if r.LongestWriteUnavailability != 3*time.Second {
		t.Errorf("write unavailability %v, want 3s", r.LongestWriteUnavailability)
	}
	if r.LongestReadUnavailability != 5*time.Second {
		t.Errorf("read unavailability %v, want 5s", r.LongestReadUnavailability)
	}

	// The window's edges count: nothing until 6s, nothing after 7s.
	r = NewReport(1, "", testStarted, 20*time.Second, []Op{op(OpPush, OutcomeOK, 6), op(OpTagRead, OutcomeOK, 7)}, nil, nil, nil, nil)
	if r.LongestWriteUnavailability != 14*time.Second || r.LongestReadUnavailability != 13*time.Second {
		t.Errorf("edges: writes %v (want 14s), reads %v (want 13s)", r.LongestWriteUnavailability, r.LongestReadUnavailability)
	}
	r = NewReport(1, "", testStarted, 20*time.Second, nil, nil, nil, nil, nil)
	if r.LongestWriteUnavailability != 20*time.Second || r.LongestReadUnavailability != 20*time.Second {
		t.Errorf("no operations: writes %v, reads %v, want the whole window", r.LongestWriteUnavailability, r.LongestReadUnavailability)
	}
}
