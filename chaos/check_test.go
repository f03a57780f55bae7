package chaos

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// dg is a realistic digest for a name.
func testDigest(name string) string {
	s := sha256.Sum256([]byte(name))
	return "sha256:" + hex.EncodeToString(s[:])
}

func msec(n int) time.Duration { return time.Duration(n) * time.Millisecond }

// testHist numbers ops and sorts them by Start, as History.Ops does.
type testHist struct{ ops []Op }

func (h *testHist) add(op Op) Op {
	op.ID = len(h.ops)
	h.ops = append(h.ops, op)
	return op
}

func (h *testHist) sorted() []Op {
	out := slices.Clone(h.ops)
	slices.SortStableFunc(out, func(a, b Op) int { return cmp.Compare(a.Start, b.Start) })
	return out
}

func hPush(client int, repo, tag, digest string, start, end int, outcome Outcome, blobs ...string) Op {
	op := Op{Client: client, Kind: OpPush, Gateway: "gw-a", Consistency: "local", Repo: repo, Tag: tag, Digest: digest,
		Start: msec(start), End: msec(end), Outcome: outcome}
	for _, b := range blobs {
		op.Blobs = append(op.Blobs, Blob{Digest: b, Size: 100})
	}
	if outcome == OutcomeOK {
		op.Status = 201
	}
	return op
}

func hVerify(repo, tag, digest string, start, end int, outcome Outcome) Op {
	op := Op{Client: -2, Kind: OpVerify, Gateway: "gw-b", Consistency: "strong", Repo: repo, Tag: tag, Digest: digest,
		Start: msec(start), End: msec(end), Outcome: outcome}
	if outcome != OutcomeOK {
		op.Err = "tag v0: not-found HTTP 404"
	}
	return op
}

func hPullM(consistency, repo, tag, digest string, start, end int, outcome Outcome) Op {
	op := Op{Client: 5, Kind: OpPullManifest, Gateway: "gw-" + consistency, Consistency: consistency,
		Repo: repo, Tag: tag, Digest: digest, Start: msec(start), End: msec(end), Outcome: outcome}
	switch outcome {
	case OutcomeOK:
		op.Got, op.Status = digest, 200
	case OutcomeNotFound:
		op.Status, op.Err = 404, "HTTP 404 MANIFEST_UNKNOWN"
	}
	return op
}

func hPullB(consistency, repo, digest string, start, end int, outcome Outcome) Op {
	op := hPullM(consistency, repo, "", digest, start, end, outcome)
	op.Kind = OpPullBlob
	return op
}

func hDelete(repo, digest string, start, end int, outcome Outcome) Op {
	return Op{Client: 7, Kind: OpDelete, Gateway: "gw-a", Repo: repo, Digest: digest,
		Start: msec(start), End: msec(end), Outcome: outcome, Status: 202}
}

const mutRepo = "chaos/mutable"

func hTagRead(client int, consistency, tag, value string, start, end int) Op {
	return Op{Client: client, Kind: OpTagRead, Gateway: "gw-" + consistency, Consistency: consistency,
		Repo: mutRepo, Tag: tag, Value: value, Start: msec(start), End: msec(end), Outcome: OutcomeOK, Status: 200}
}

func hTagWrite(client int, cond, expect, value, tag string, start, end int, outcome Outcome) Op {
	op := Op{Client: client, Kind: OpTagWrite, Gateway: "gw-strong", Consistency: "strong",
		Repo: mutRepo, Tag: tag, Cond: cond, Expect: expect, Value: value,
		Start: msec(start), End: msec(end), Outcome: outcome}
	switch outcome {
	case OutcomeOK:
		op.Status = 201
	case OutcomeFail:
		op.Status = 412
	case OutcomeUnknown:
		op.Err = "timeout: context deadline exceeded"
	}
	return op
}

func wantStatus(t *testing.T, r CheckResult, want CheckStatus) {
	t.Helper()
	if r.Status != want {
		t.Fatalf("%s: status %s, want %s; detail %q; violations:\n%s", r.Name, r.Status, want, r.Detail, violationText(r))
	}
	if want == CheckFail && len(r.Violations) == 0 {
		t.Fatalf("%s: failed without violations", r.Name)
	}
	for _, v := range r.Violations {
		if v.Check != r.Name || v.Message == "" || len(v.Ops) == 0 {
			t.Fatalf("%s: malformed violation %+v", r.Name, v)
		}
	}
}

func violationText(r CheckResult) string {
	var b strings.Builder
	for _, v := range r.Violations {
		b.WriteString("  " + v.Message + "\n")
		for _, op := range v.Ops {
			b.WriteString("    " + formatOp(op) + "\n")
		}
	}
	return b.String()
}

func hasOp(v Violation, id int) bool {
	for _, op := range v.Ops {
		if op.ID == id {
			return true
		}
	}
	return false
}

// cleanHistory is a plausible run in which every promise holds.
func cleanHistory() []Op {
	var h testHist
	const app, mnt = "chaos/app0", "chaos/mount1"
	m1, m2, m4, m5 := testDigest("m1"), testDigest("m2"), testDigest("m4"), testDigest("m5")
	b1, b2, b3, cfg := testDigest("b1"), testDigest("b2"), testDigest("b3"), testDigest("cfg")
	h.add(hPush(0, app, "v0", m1, 0, 100, OutcomeOK, cfg, b1, b2))
	h.add(hPullB("local", app, b1, 50, 80, OutcomeNotFound)) // began before the ack
	h.add(hPush(0, app, "v1", m2, 150, 250, OutcomeOK, cfg, b3))
	h.add(hPullM("local", app, "v0", m1, 200, 220, OutcomeOK))
	h.add(hPullM("strong", app, "", m2, 300, 320, OutcomeOK))
	h.add(hPush(0, app, "v2", testDigest("m3"), 300, 400, OutcomeUnknown, cfg))
	h.add(hPush(0, app, "v3", "", 410, 420, OutcomeFail))
	h.add(hPullB("local", app, b3, 400, 410, OutcomeOK))
	h.add(hPullB("strong", app, b1, 420, 430, OutcomeOK))
	h.add(hPush(1, app, "v4", m4, 500, 600, OutcomeOK, cfg, b2))
	h.add(hDelete(app, m4, 700, 750, OutcomeOK))
	h.add(hPullM("local", app, "", m4, 720, 760, OutcomeNotFound))   // delete under way
	h.add(hPullM("local", app, "v4", m4, 740, 800, OutcomeNotFound)) // by tag, deleted
	mount := hPush(2, mnt, "v0", m5, 800, 900, OutcomeOK, cfg, b1, b2)
	mount.Kind, mount.From = OpMount, app
	h.add(mount)
	h.add(hPullB("local", mnt, b2, 950, 960, OutcomeOK))

	// One mutable tag through CAS, with 412s, a stale local read and
	// writes of unknown outcome.
	v1, v2, v3 := testDigest("value1"), testDigest("value2"), testDigest("value3")
	const tg = "m0g0"
	h.add(hTagRead(3, "strong", tg, "", 1000, 1010))
	h.add(hTagWrite(3, CondIfNoneMatch, "", v1, tg, 1020, 1050, OutcomeOK))
	h.add(hTagWrite(4, CondIfNoneMatch, "", v2, tg, 1060, 1080, OutcomeFail))
	h.add(hTagRead(4, "strong", tg, v1, 1090, 1100))
	h.add(hTagWrite(3, CondIfMatch, v1, v2, tg, 1110, 1140, OutcomeOK))
	h.add(hTagWrite(4, CondIfMatch, v1, v3, tg, 1150, 1170, OutcomeFail))
	h.add(hTagRead(5, "local", tg, v1, 1180, 1190)) // stale, allowed locally
	h.add(hTagWrite(3, CondNone, "", v3, tg, 1200, 1300, OutcomeUnknown))
	h.add(hTagRead(4, "strong", tg, v2, 1310, 1320)) // not applied yet
	h.add(hTagRead(4, "strong", tg, v3, 1400, 1410)) // now it has
	h.add(hTagWrite(3, CondIfMatch, v3, v1, tg, 1600, 1700, OutcomeOK))
	h.add(hTagRead(4, "strong", tg, v3, 1650, 1660)) // concurrent with the CAS
	h.add(hTagRead(5, "strong", tg, v1, 1710, 1720))
	unanswered := hTagRead(5, "strong", tg, v2, 1730, 1740)
	unanswered.Outcome, unanswered.Value, unanswered.Err = OutcomeUnknown, "", "timeout"
	h.add(unanswered)
	h.add(hTagWrite(4, CondIfMatch, v2, v3, tg, 1750, 1800, OutcomeUnknown)) // condition false: never applies
	h.add(hTagRead(4, "strong", "m1g0", "", 1750, 1760))                     // another tag, never created

	h.add(hVerify(app, "v0", "", 2000, 2100, OutcomeFail)) // retried below
	h.add(hVerify(app, "v0", m1, 2200, 2300, OutcomeOK))
	h.add(hVerify(app, "v1", m2, 2000, 2100, OutcomeOK))
	h.add(hVerify(mnt, "v0", m5, 2000, 2100, OutcomeOK))
	return h.sorted()
}

func TestCheckHistoryClean(t *testing.T) {
	ops := cleanHistory()
	res := CheckHistory(ops, 10*time.Second)
	names := []string{CheckNameLostWrites, CheckNameWrongBytes, CheckNameFalseNotFound, CheckNameLinearizable}
	if len(res) != len(names) {
		t.Fatalf("%d results, want %d", len(res), len(names))
	}
	for i, r := range res {
		if r.Name != names[i] {
			t.Errorf("result %d is %s, want %s", i, r.Name, names[i])
		}
		wantStatus(t, r, CheckPass)
		if r.Checked == 0 {
			t.Errorf("%s checked nothing", r.Name)
		}
	}
	// Exact counts: a check that silently skips its input would pass too.
	want := map[string]int{
		CheckNameLostWrites:    3,  // v0, v1 and the mount; v4 was deleted
		CheckNameWrongBytes:    5,  // the five pulls answered 200
		CheckNameFalseNotFound: 5,  // the same five: the 404s began before the ack or after a delete
		CheckNameLinearizable:  14, // all tag ops but the local read and the unanswered one
	}
	for _, r := range res {
		if r.Checked != want[r.Name] {
			t.Errorf("%s checked %d, want %d (%s)", r.Name, r.Checked, want[r.Name], r.Detail)
		}
	}
}

func TestCheckLostWrites(t *testing.T) {
	const repo = "chaos/app1"
	m, other := testDigest("m"), testDigest("other")
	cases := []struct {
		name string
		ops  func(h *testHist) // after the push (op 0)
		lost bool
	}{
		{"verified", func(h *testHist) { h.add(hVerify(repo, "v0", m, 500, 600, OutcomeOK)) }, false},
		{"verify failed", func(h *testHist) { h.add(hVerify(repo, "v0", "", 500, 600, OutcomeFail)) }, true},
		{"verify found another digest", func(h *testHist) { h.add(hVerify(repo, "v0", other, 500, 600, OutcomeOK)) }, true},
		{"never verified", func(h *testHist) {}, true},
		{"verify of another tag only", func(h *testHist) { h.add(hVerify(repo, "v1", m, 500, 600, OutcomeOK)) }, true},
		{"last verify failed", func(h *testHist) {
			h.add(hVerify(repo, "v0", m, 500, 600, OutcomeOK))
			h.add(hVerify(repo, "v0", "", 700, 800, OutcomeFail))
		}, true},
		{"last verify succeeded", func(h *testHist) {
			h.add(hVerify(repo, "v0", "", 500, 600, OutcomeFail))
			h.add(hVerify(repo, "v0", m, 700, 800, OutcomeOK))
		}, false},
		{"deleted, never verified", func(h *testHist) { h.add(hDelete(repo, m, 200, 300, OutcomeOK)) }, false},
		{"delete of unknown outcome", func(h *testHist) {
			h.add(hDelete(repo, m, 200, 300, OutcomeUnknown))
			h.add(hVerify(repo, "v0", "", 500, 600, OutcomeFail))
		}, false},
		{"delete of another image", func(h *testHist) { h.add(hDelete(repo, other, 200, 300, OutcomeOK)) }, true},
		{"tag moved by a later push of unknown outcome", func(h *testHist) {
			h.add(hPush(1, repo, "v0", other, 150, 250, OutcomeUnknown))
			h.add(hVerify(repo, "v0", other, 500, 600, OutcomeOK))
		}, false},
		{"tag moved by an earlier push", func(h *testHist) {
			h.add(hPush(1, repo, "v0", other, 0, 5, OutcomeOK))
			h.add(hVerify(repo, "v0", other, 500, 600, OutcomeOK))
			h.add(hVerify(repo, "v0", other, 500, 600, OutcomeFail))
		}, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var h testHist
			p := h.add(hPush(0, repo, "v0", m, 10, 100, OutcomeOK))
			tc.ops(&h)
			r := CheckLostWrites(h.sorted())
			if !tc.lost {
				wantStatus(t, r, CheckPass)
				return
			}
			wantStatus(t, r, CheckFail)
			if len(r.Violations) != 1 || !hasOp(r.Violations[0], p.ID) {
				t.Fatalf("want one violation showing push %d:\n%s", p.ID, violationText(r))
			}
			if !strings.Contains(r.Violations[0].Message, repo+":v0") {
				t.Errorf("message %q does not name %s:v0", r.Violations[0].Message, repo)
			}
		})
	}
	t.Run("unacknowledged pushes are not checked", func(t *testing.T) {
		var h testHist
		h.add(hPush(0, repo, "v0", m, 10, 100, OutcomeUnknown))
		h.add(hPush(0, repo, "v1", "", 10, 100, OutcomeFail))
		r := CheckLostWrites(h.sorted())
		wantStatus(t, r, CheckPass)
		if r.Checked != 0 {
			t.Errorf("checked %d, want 0", r.Checked)
		}
	})
	t.Run("message says never verified", func(t *testing.T) {
		var h testHist
		h.add(hPush(0, repo, "v0", m, 10, 100, OutcomeOK))
		r := CheckLostWrites(h.sorted())
		if len(r.Violations) != 1 || !strings.Contains(r.Violations[0].Message, "never verified") {
			t.Fatalf("want a never-verified violation:\n%s", violationText(r))
		}
	})
}

func TestCheckWrongBytes(t *testing.T) {
	const repo = "chaos/app2"
	m, blob, bad := testDigest("m"), testDigest("blob"), testDigest("garbage")
	var h testHist
	h.add(hPullM("local", repo, "v0", m, 0, 10, OutcomeOK))
	h.add(hPullB("strong", repo, blob, 20, 30, OutcomeOK))
	h.add(hPullB("local", repo, blob, 20, 30, OutcomeNotFound)) // no bytes
	r := CheckWrongBytes(h.sorted())
	wantStatus(t, r, CheckPass)
	if r.Checked != 2 {
		t.Errorf("checked %d, want 2", r.Checked)
	}

	wrongBlob := hPullB("local", repo, blob, 40, 50, OutcomeOK)
	wrongBlob.Got = bad
	wrongBlob = h.add(wrongBlob)
	wrongTag := hPullM("strong", repo, "v0", m, 60, 70, OutcomeOK)
	wrongTag.Got = bad
	wrongTag = h.add(wrongTag)
	r = CheckWrongBytes(h.sorted())
	wantStatus(t, r, CheckFail)
	if len(r.Violations) != 2 || !hasOp(r.Violations[0], wrongBlob.ID) || !hasOp(r.Violations[1], wrongTag.ID) {
		t.Fatalf("want violations for ops %d and %d:\n%s", wrongBlob.ID, wrongTag.ID, violationText(r))
	}
	if msg := r.Violations[0].Message; !strings.Contains(msg, "asked for "+blob) || !strings.Contains(msg, "got bytes hashing to "+bad) {
		t.Errorf("message %q", msg)
	}
}

func TestCheckNoFalseNotFound(t *testing.T) {
	const repo = "chaos/app3"
	m, blob, cfg := testDigest("m"), testDigest("blob"), testDigest("cfg")
	type tc struct {
		name     string
		extra    []Op // after the push [0ms, 100ms] of repo:v0 = m (cfg, blob)
		pull     Op
		false404 bool
	}
	cases := []tc{
		{"local by digest after the ack", nil, hPullM("local", repo, "", m, 150, 160, OutcomeNotFound), true},
		{"local by tag after the ack", nil, hPullM("local", repo, "v0", m, 150, 160, OutcomeNotFound), true},
		{"strong by digest after the ack", nil, hPullM("strong", repo, "", m, 150, 160, OutcomeNotFound), true},
		{"local blob after the ack", nil, hPullB("local", repo, blob, 150, 160, OutcomeNotFound), true},
		{"pull began before the ack", nil, hPullM("local", repo, "", m, 90, 200, OutcomeNotFound), false},
		{"pull began as the ack came", nil, hPullM("local", repo, "", m, 100, 200, OutcomeNotFound), false},
		{"blob pull began before the ack", nil, hPullB("local", repo, blob, 50, 200, OutcomeNotFound), false},
		{"delete began before the pull ended", []Op{hDelete(repo, m, 155, 300, OutcomeOK)},
			hPullM("local", repo, "", m, 150, 160, OutcomeNotFound), false},
		{"unknown delete began before the pull", []Op{hDelete(repo, m, 120, 300, OutcomeUnknown)},
			hPullM("local", repo, "v0", m, 150, 160, OutcomeNotFound), false},
		{"delete of the blob's manifest", []Op{hDelete(repo, m, 120, 130, OutcomeOK)},
			hPullB("local", repo, blob, 150, 160, OutcomeNotFound), false},
		{"delete began after the pull ended", []Op{hDelete(repo, m, 170, 300, OutcomeOK)},
			hPullM("local", repo, "", m, 150, 160, OutcomeNotFound), true},
		{"delete in another repository", []Op{hDelete("chaos/other", m, 120, 130, OutcomeOK)},
			hPullB("local", repo, blob, 150, 160, OutcomeNotFound), true},
		{"another repository", nil, hPullM("local", "chaos/other", "", m, 150, 160, OutcomeNotFound), false},
		{"another tag", nil, hPullM("local", repo, "v9", m, 150, 160, OutcomeNotFound), false},
		{"no read consistency recorded", nil, hPullM("", repo, "", m, 150, 160, OutcomeNotFound), false},
		{"pull answered", nil, hPullM("local", repo, "", m, 150, 160, OutcomeOK), false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var h testHist
			p := h.add(hPush(0, repo, "v0", m, 0, 100, OutcomeOK, cfg, blob))
			for _, op := range c.extra {
				h.add(op)
			}
			pull := h.add(c.pull)
			r := CheckNoFalseNotFound(h.sorted())
			if !c.false404 {
				wantStatus(t, r, CheckPass)
				return
			}
			wantStatus(t, r, CheckFail)
			if len(r.Violations) != 1 || !hasOp(r.Violations[0], p.ID) || !hasOp(r.Violations[0], pull.ID) {
				t.Fatalf("want one violation showing push %d and pull %d:\n%s", p.ID, pull.ID, violationText(r))
			}
		})
	}
	t.Run("unacknowledged push", func(t *testing.T) {
		var h testHist
		h.add(hPush(0, repo, "v0", m, 0, 100, OutcomeUnknown, cfg, blob))
		h.add(hPullM("local", repo, "", m, 150, 160, OutcomeNotFound))
		h.add(hPullB("local", repo, blob, 150, 160, OutcomeNotFound))
		wantStatus(t, CheckNoFalseNotFound(h.sorted()), CheckPass)
	})
}

func TestCheckLinearizable(t *testing.T) {
	a, b, c := testDigest("A"), testDigest("B"), testDigest("C")
	const tg = "m0g0"
	cases := []struct {
		name    string
		ops     []Op
		want    CheckStatus
		checked int
		culprit int // index in ops of the op a violation must show, -1 none
	}{
		{"stale strong read", []Op{
			hTagWrite(0, CondNone, "", a, tg, 0, 10, OutcomeOK),
			hTagWrite(0, CondNone, "", b, tg, 20, 30, OutcomeOK),
			hTagRead(1, "strong", tg, a, 40, 50),
		}, CheckFail, 3, 2},
		{"stale local read", []Op{
			hTagWrite(0, CondNone, "", a, tg, 0, 10, OutcomeOK),
			hTagWrite(0, CondNone, "", b, tg, 20, 30, OutcomeOK),
			hTagRead(1, "local", tg, a, 40, 50),
		}, CheckPass, 2, -1},
		{"read concurrent with the overwrite", []Op{
			hTagWrite(0, CondNone, "", a, tg, 0, 10, OutcomeOK),
			hTagWrite(0, CondNone, "", b, tg, 20, 60, OutcomeOK),
			hTagRead(1, "strong", tg, a, 40, 50),
		}, CheckPass, 3, -1},
		{"CAS acknowledged although the register did not hold Expect", []Op{
			hTagWrite(0, CondIfNoneMatch, "", a, tg, 0, 10, OutcomeOK),
			hTagWrite(1, CondIfMatch, b, c, tg, 20, 30, OutcomeOK),
		}, CheckFail, 2, 1},
		{"create acknowledged although the tag existed", []Op{
			hTagWrite(0, CondIfNoneMatch, "", a, tg, 0, 10, OutcomeOK),
			hTagWrite(1, CondIfNoneMatch, "", b, tg, 20, 30, OutcomeOK),
		}, CheckFail, 2, 1},
		{"412 although the register held Expect", []Op{
			hTagWrite(0, CondIfNoneMatch, "", a, tg, 0, 10, OutcomeOK),
			hTagWrite(1, CondIfMatch, a, b, tg, 20, 30, OutcomeFail),
		}, CheckFail, 2, 1},
		{"412 on a CAS that lost", []Op{
			hTagWrite(0, CondIfNoneMatch, "", a, tg, 0, 10, OutcomeOK),
			hTagWrite(1, CondIfMatch, b, c, tg, 20, 30, OutcomeFail),
			hTagWrite(1, CondIfNoneMatch, "", c, tg, 40, 50, OutcomeFail),
			hTagRead(2, "strong", tg, a, 60, 70),
		}, CheckPass, 4, -1},
		{"unknown write observed later", []Op{
			hTagWrite(0, CondNone, "", a, tg, 0, 10, OutcomeOK),
			hTagWrite(1, CondIfMatch, a, b, tg, 20, 30, OutcomeUnknown),
			hTagRead(2, "strong", tg, a, 40, 50),
			hTagRead(2, "strong", tg, b, 500, 510),
		}, CheckPass, 4, -1},
		{"unknown write never observed", []Op{
			hTagWrite(0, CondNone, "", a, tg, 0, 10, OutcomeOK),
			hTagWrite(1, CondNone, "", b, tg, 20, 30, OutcomeUnknown),
			hTagRead(2, "strong", tg, a, 40, 50),
			hTagRead(2, "strong", tg, a, 500, 510),
		}, CheckPass, 4, -1},
		{"unknown write observed, then its overwritten value again", []Op{
			hTagWrite(0, CondNone, "", a, tg, 0, 10, OutcomeOK),
			hTagWrite(1, CondNone, "", b, tg, 20, 30, OutcomeUnknown),
			hTagRead(2, "strong", tg, b, 40, 50),
			hTagRead(2, "strong", tg, a, 500, 510),
		}, CheckFail, 4, 3},
		{"unknown CAS whose condition never held, observed", []Op{
			hTagWrite(0, CondNone, "", a, tg, 0, 10, OutcomeOK),
			hTagWrite(1, CondIfMatch, c, b, tg, 20, 30, OutcomeUnknown),
			hTagRead(2, "strong", tg, b, 40, 50),
		}, CheckFail, 3, 2},
		{"read of a tag never written", []Op{
			hTagRead(2, "strong", tg, a, 40, 50),
		}, CheckFail, 1, 0},
		{"absent tag", []Op{
			hTagRead(2, "strong", tg, "", 40, 50),
			hTagRead(2, "strong", "m1g0", "", 40, 50),
		}, CheckPass, 2, -1},
		{"tags are independent registers", []Op{
			hTagWrite(0, CondNone, "", a, tg, 0, 10, OutcomeOK),
			hTagWrite(0, CondNone, "", b, "m1g0", 20, 30, OutcomeOK),
			hTagRead(1, "strong", tg, a, 40, 50),
			hTagRead(1, "strong", "m1g0", b, 40, 50),
		}, CheckPass, 4, -1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var h testHist
			var ids []int
			for _, op := range tc.ops {
				ids = append(ids, h.add(op).ID)
			}
			r := CheckLinearizable(h.sorted(), 10*time.Second)
			wantStatus(t, r, tc.want)
			if r.Checked != tc.checked {
				t.Errorf("checked %d, want %d", r.Checked, tc.checked)
			}
			if tc.culprit < 0 {
				return
			}
			if len(r.Violations) != 1 {
				t.Fatalf("%d violations, want 1:\n%s", len(r.Violations), violationText(r))
			}
			v := r.Violations[0]
			if !strings.Contains(v.Message, mutRepo+":"+tc.ops[tc.culprit].Tag) {
				t.Errorf("message %q does not name the tag", v.Message)
			}
			if !hasOp(v, ids[tc.culprit]) {
				t.Errorf("violation does not show op %d:\n%s", ids[tc.culprit], violationText(r))
			}
		})
	}
}

// A long history whose violation sits in the middle: the violation lists
// a bounded window around the offending read.
func TestCheckLinearizableBoundsViolationOps(t *testing.T) {
	var h testHist
	const tg = "m2g0"
	var stale Op
	for i := range 200 {
		v := testDigest(string(rune('a' + i%20)))
		h.add(hTagWrite(0, CondNone, "", v, tg, i*100, i*100+10, OutcomeOK))
		read := v
		if i == 120 {
			read = testDigest("never written")
		}
		op := h.add(hTagRead(1, "strong", tg, read, i*100+20, i*100+30))
		if i == 120 {
			stale = op
		}
	}
	r := CheckLinearizable(h.sorted(), 10*time.Second)
	wantStatus(t, r, CheckFail)
	v := r.Violations[0]
	if len(v.Ops) > 50 {
		t.Errorf("violation lists %d ops, want at most 50", len(v.Ops))
	}
	if !hasOp(v, stale.ID) {
		t.Errorf("violation does not show the offending read %d: %s", stale.ID, v.Message)
	}
}

func TestCheckLinearizableTimeout(t *testing.T) {
	ops := cleanHistory()
	r := CheckLinearizable(ops, time.Nanosecond)
	if r.Status != CheckUnknown {
		t.Fatalf("status %s with a 1ns budget, want unknown (%s)", r.Status, r.Detail)
	}
	if !strings.Contains(r.Detail, "timed out") {
		t.Errorf("detail %q does not say the checker timed out", r.Detail)
	}
}

func TestCheckLinearizableVisualization(t *testing.T) {
	var h testHist
	a, b := testDigest("A"), testDigest("B")
	h.add(hTagWrite(0, CondNone, "", a, "m0g0", 0, 10, OutcomeOK))
	h.add(hTagWrite(-2, CondNone, "", b, "m0g0", 20, 30, OutcomeOK)) // negative client ids occur (verifier)
	h.add(hTagRead(1, "strong", "m0g0", a, 40, 50))
	h.add(hTagWrite(0, CondIfMatch, a, b, "m1g0", 0, 10, OutcomeUnknown))
	path := filepath.Join(t.TempDir(), "lin.html")
	if err := WriteLinearizabilityVisualization(h.sorted(), path); err != nil {
		t.Fatal(err)
	}
	b2, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(strings.ToLower(string(b2)), "<html") || !strings.Contains(string(b2), "read") {
		t.Errorf("%s does not look like porcupine's visualization (%d bytes)", path, len(b2))
	}
}

// The checkers must stay fast on a run-sized history.
func TestCheckHistoryLarge(t *testing.T) {
	if testing.Short() {
		t.Skip("large history")
	}
	var h testHist
	values := []string{testDigest("v0"), testDigest("v1"), testDigest("v2"), testDigest("v3")}
	for i := range 20000 {
		repo := "chaos/app" + string(rune('0'+i%7))
		tag := "v" + strconv.Itoa(i)
		m, bl := testDigest("m"+tag+repo), testDigest("b"+tag+repo)
		t0 := i * 10
		h.add(hPush(i%5, repo, tag, m, t0, t0+5, OutcomeOK, bl))
		h.add(hPullM("local", repo, tag, m, t0+6, t0+7, OutcomeOK))
		h.add(hPullB("strong", repo, bl, t0+6, t0+8, OutcomeOK))
		h.add(hVerify(repo, tag, m, 1e6+t0, 1e6+t0+5, OutcomeOK))
	}
	// 40 tags of 500 sequential CAS operations and reads each.
	for g := range 40 {
		tag := "m0g" + strconv.Itoa(g)
		cur := ""
		for k := range 250 {
			t0 := k * 20
			next := values[k%len(values)]
			if cur == "" {
				h.add(hTagWrite(1, CondIfNoneMatch, "", next, tag, t0, t0+5, OutcomeOK))
			} else {
				h.add(hTagWrite(1, CondIfMatch, cur, next, tag, t0, t0+5, OutcomeOK))
			}
			cur = next
			h.add(hTagRead(2, "strong", tag, cur, t0+6, t0+9))
		}
	}
	ops := h.sorted()
	start := time.Now()
	for _, r := range CheckHistory(ops, time.Minute) {
		wantStatus(t, r, CheckPass)
	}
	if took := time.Since(start); took > 20*time.Second {
		t.Errorf("checking %d ops took %v", len(ops), took)
	}
}
