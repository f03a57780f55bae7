package chaos

import (
	"cmp"
	"fmt"
	"math"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/anishathalye/porcupine"
)

// Violation is one broken promise and the operations that show it.
type Violation struct {
	Check   string `json:"check"`
	Message string `json:"message"`
	Ops     []Op   `json:"ops"`
}

// CheckStatus is the verdict of one check.
type CheckStatus string

const (
	CheckPass CheckStatus = "pass"
	CheckFail CheckStatus = "fail"
	// CheckUnknown: the check could not decide (the linearizability
	// checker timed out). It is not a violation, but nothing was proven,
	// so it fails the run (see Report).
	CheckUnknown CheckStatus = "unknown"
)

// Check names, as CheckResult.Name and Violation.Check carry them.
const (
	CheckNameLostWrites    = "acknowledged-writes-survive"
	CheckNameWrongBytes    = "pulled-bytes-match"
	CheckNameFalseNotFound = "no-false-404"
	CheckNameLinearizable  = "tags-linearizable"
	CheckNameCertRotations = "rotated-certificates-served"
	CheckNameRevocations   = "revoked-robot-refused"
	CheckNameGossipKeys    = "gossip-key-rotated-online"
)

// CheckResult is what one check found in a history.
type CheckResult struct {
	Name       string      `json:"name"`
	Status     CheckStatus `json:"status"`
	Checked    int         `json:"checked"` // how many things were checked
	Violations []Violation `json:"violations,omitempty"`
	Detail     string      `json:"detail,omitempty"`
	// Took is how long the check ran.
	Took time.Duration `json:"took,omitempty"`
}

// CheckHistory runs every check on ops (sorted by Start): lost writes,
// wrong bytes, false 404s and tag linearizability, in that order.
func CheckHistory(ops []Op, linTimeout time.Duration) []CheckResult {
	checks := []func() CheckResult{
		func() CheckResult { return CheckLostWrites(ops) },
		func() CheckResult { return CheckWrongBytes(ops) },
		func() CheckResult { return CheckNoFalseNotFound(ops) },
		func() CheckResult { return CheckLinearizable(ops, linTimeout) },
	}
	out := make([]CheckResult, len(checks))
	for i, check := range checks {
		start := time.Now()
		out[i] = check()
		out[i].Took = time.Since(start)
	}
	return out
}

func newResult(name string, checked int, vs []Violation, detail string) CheckResult {
	st := CheckPass
	if len(vs) > 0 {
		st = CheckFail
	}
	return CheckResult{Name: name, Status: st, Checked: checked, Violations: vs, Detail: detail}
}

// repoKey names a tag or a digest within a repository.
type repoKey struct{ repo, ref string }

func isPushKind(k OpKind) bool { return k == OpPush || k == OpMount }

// CheckLostWrites checks that every acknowledged push or mount whose image
// was not the target of a delete (of any outcome: an unknown delete may
// have applied) was verified after healing, and that the last verify of
// its tag (by End) succeeded for its digest.
//
// Pushes without a tag are not checked (verifies find images by tag). When
// another write to the same tag (a push, mount or tag write that did not
// definitely fail) may have taken effect after the push, the tag may
// legitimately name that write's digest: the push then passes if any
// successful verify of the tag names its digest or one of those, and is
// skipped if one of those images was deleted.
func CheckLostWrites(ops []Op) CheckResult {
	deleted := map[repoKey]bool{}
	verifies := map[repoKey][]int{}
	writers := map[repoKey][]int{}
	for i, op := range ops {
		switch op.Kind {
		case OpDelete:
			deleted[repoKey{op.Repo, op.Digest}] = true
		case OpVerify:
			k := repoKey{op.Repo, op.Tag}
			verifies[k] = append(verifies[k], i)
		case OpPush, OpMount, OpTagWrite:
			if op.Tag != "" && op.Outcome != OutcomeFail {
				k := repoKey{op.Repo, op.Tag}
				writers[k] = append(writers[k], i)
			}
		}
	}
	var (
		vs                                []Violation
		checked, untagged, gone, replaced int
	)
	for i, op := range ops {
		if !isPushKind(op.Kind) || op.Outcome != OutcomeOK {
			continue
		}
		if op.Tag == "" {
			untagged++
			continue
		}
		if deleted[repoKey{op.Repo, op.Digest}] {
			gone++
			continue
		}
		checked++
		k := repoKey{op.Repo, op.Tag}
		vi := verifies[k]
		if len(vi) == 0 {
			vs = append(vs, Violation{Check: CheckNameLostWrites,
				Message: fmt.Sprintf("acknowledged %s of %s was never verified", op.Kind, opRef(op)),
				Ops:     []Op{op}})
			continue
		}
		// Digests other writes may have left the tag naming.
		var others []string
		otherDeleted := false
		for _, j := range writers[k] {
			w := ops[j]
			d := w.Digest
			if w.Kind == OpTagWrite {
				d = w.Value
			}
			if j == i || d == op.Digest || d == "" {
				continue
			}
			if w.Outcome == OutcomeOK && w.End < op.Start {
				continue // done before this push began: overwritten by it
			}
			others = append(others, d)
			otherDeleted = otherDeleted || deleted[repoKey{op.Repo, d}]
		}
		shown := make([]Op, 0, 1+len(vi))
		shown = append(shown, op)
		for _, j := range vi {
			shown = append(shown, ops[j])
		}
		if len(others) == 0 {
			last := vi[0]
			for _, j := range vi[1:] {
				if ops[j].End >= ops[last].End {
					last = j
				}
			}
			v := ops[last]
			if v.Outcome == OutcomeOK && v.Digest == op.Digest {
				continue
			}
			msg := fmt.Sprintf("acknowledged %s of %s is lost: the last verify (op %d) ", op.Kind, opRef(op), v.ID)
			switch {
			case v.Outcome == OutcomeOK:
				msg += fmt.Sprintf("found the tag naming %s", v.Digest)
			case v.Digest != "" && v.Digest != op.Digest:
				msg += fmt.Sprintf("failed, the tag naming %s: %s", v.Digest, v.Err)
			default:
				msg += fmt.Sprintf("failed: %s", v.Err)
			}
			vs = append(vs, Violation{Check: CheckNameLostWrites, Message: msg, Ops: shown})
			continue
		}
		if otherDeleted {
			replaced++
			continue
		}
		ok := false
		for _, j := range vi {
			v := ops[j]
			if v.Outcome == OutcomeOK && (v.Digest == op.Digest || slices.Contains(others, v.Digest)) {
				ok = true
				break
			}
		}
		if !ok {
			vs = append(vs, Violation{Check: CheckNameLostWrites,
				Message: fmt.Sprintf("acknowledged %s of %s is lost: no verify found the tag naming it or any of the %d concurrent or later writes to the tag",
					op.Kind, opRef(op), len(others)),
				Ops: shown})
		}
	}
	detail := fmt.Sprintf("%d acknowledged pushes checked; %d skipped as deleted", checked, gone)
	if untagged > 0 {
		detail += fmt.Sprintf(", %d without a tag", untagged)
	}
	if replaced > 0 {
		detail += fmt.Sprintf(", %d whose tag another write may have moved to a deleted image", replaced)
	}
	return newResult(CheckNameLostWrites, checked, vs, detail)
}

// CheckWrongBytes checks that no pull (or verify) received bytes that do
// not hash to the digest it asked for. A pull by tag records as Digest
// the digest the registry named or the tag's push set, so the same rule
// holds. Pulls that did not record what they expected are not counted.
func CheckWrongBytes(ops []Op) CheckResult {
	var (
		vs      []Violation
		checked int
	)
	for _, op := range ops {
		switch op.Kind {
		case OpPullManifest, OpPullBlob, OpVerify:
		default:
			continue
		}
		if op.Got == "" || op.Digest == "" {
			continue
		}
		checked++
		if op.Got == op.Digest {
			continue
		}
		by := ""
		if op.Tag != "" {
			by = " by tag " + op.Tag
		}
		vs = append(vs, Violation{Check: CheckNameWrongBytes,
			Message: fmt.Sprintf("%s of %s%s through %s asked for %s, got bytes hashing to %s",
				op.Kind, op.Repo, by, orDash(op.Gateway), op.Digest, op.Got),
			Ops: []Op{op}})
	}
	return newResult(CheckNameWrongBytes, checked, vs, fmt.Sprintf("%d pulls that received bytes", checked))
}

// CheckNoFalseNotFound checks that no pull through a local or strong
// gateway answered 404 for content acknowledged before the pull began and
// not deleted before it ended. Acknowledged content: a manifest by digest
// or by tag from an acknowledged push or mount; a blob from an
// acknowledged push or mount that lists it. A delete of any manifest that
// the tag ever named (or, for a blob, of any manifest in the repository
// that references it) excuses the 404 once it has started.
func CheckNoFalseNotFound(ops []Op) CheckResult {
	type ack struct {
		end time.Duration
		op  int
	}
	byDigest := map[repoKey]ack{}
	byTag := map[repoKey]ack{}
	byBlob := map[repoKey]ack{}
	note := func(m map[repoKey]ack, k repoKey, end time.Duration, i int) {
		if a, ok := m[k]; !ok || end < a.end {
			m[k] = ack{end, i}
		}
	}
	deleteStart := map[repoKey]time.Duration{}
	tagDigests := map[repoKey][]string{} // every manifest a tag may have named
	blobOwners := map[repoKey][]string{} // every manifest that references a blob
	for i, op := range ops {
		switch op.Kind {
		case OpDelete:
			k := repoKey{op.Repo, op.Digest}
			if s, ok := deleteStart[k]; !ok || op.Start < s {
				deleteStart[k] = op.Start
			}
		case OpTagWrite:
			if op.Value != "" {
				k := repoKey{op.Repo, op.Tag}
				tagDigests[k] = appendNew(tagDigests[k], op.Value)
			}
		case OpPush, OpMount:
			if op.Digest == "" {
				continue
			}
			if op.Tag != "" {
				k := repoKey{op.Repo, op.Tag}
				tagDigests[k] = appendNew(tagDigests[k], op.Digest)
			}
			for _, b := range op.Blobs {
				k := repoKey{op.Repo, b.Digest}
				blobOwners[k] = appendNew(blobOwners[k], op.Digest)
			}
			if op.Outcome != OutcomeOK {
				continue
			}
			note(byDigest, repoKey{op.Repo, op.Digest}, op.End, i)
			if op.Tag != "" {
				note(byTag, repoKey{op.Repo, op.Tag}, op.End, i)
			}
			for _, b := range op.Blobs {
				note(byBlob, repoKey{op.Repo, b.Digest}, op.End, i)
			}
		}
	}
	// firstDelete is when the first delete of any of digests in repo began.
	type memoKey struct {
		blob bool
		k    repoKey
	}
	memo := map[memoKey]time.Duration{}
	firstDelete := func(mk memoKey, digests []string) time.Duration {
		if t, ok := memo[mk]; ok {
			return t
		}
		t := time.Duration(math.MaxInt64)
		for _, d := range digests {
			if s, ok := deleteStart[repoKey{mk.k.repo, d}]; ok && s < t {
				t = s
			}
		}
		memo[mk] = t
		return t
	}

	var (
		vs      []Violation
		checked int
	)
	for _, op := range ops {
		if op.Kind != OpPullManifest && op.Kind != OpPullBlob {
			continue
		}
		if op.Consistency != "local" && op.Consistency != "strong" {
			continue
		}
		var (
			a    ack
			ok   bool
			del  time.Duration
			what string
		)
		switch {
		case op.Kind == OpPullBlob:
			k := repoKey{op.Repo, op.Digest}
			a, ok = byBlob[k]
			del = firstDelete(memoKey{true, k}, blobOwners[k])
			what = "blob " + op.Repo + "@" + op.Digest
		case op.Tag != "":
			k := repoKey{op.Repo, op.Tag}
			a, ok = byTag[k]
			del = firstDelete(memoKey{false, k}, tagDigests[k])
			if s, found := deleteStart[repoKey{op.Repo, op.Digest}]; found && s < del {
				del = s
			}
			what = "manifest " + op.Repo + ":" + op.Tag
		default:
			k := repoKey{op.Repo, op.Digest}
			a, ok = byDigest[k]
			del = time.Duration(math.MaxInt64)
			if s, found := deleteStart[k]; found {
				del = s
			}
			what = "manifest " + op.Repo + "@" + op.Digest
		}
		if !ok || a.end >= op.Start || del < op.End {
			continue
		}
		checked++
		if op.Outcome != OutcomeNotFound {
			continue
		}
		p := ops[a.op]
		vs = append(vs, Violation{Check: CheckNameFalseNotFound,
			Message: fmt.Sprintf("%s pull of %s through %s answered 404 at %s, but %s op %d acknowledged it at %s, before the pull began at %s",
				op.Consistency, what, orDash(op.Gateway), fmtOffset(op.End), p.Kind, p.ID, fmtOffset(p.End), fmtOffset(op.Start)),
			Ops: []Op{p, op}})
	}
	return newResult(CheckNameFalseNotFound, checked, vs,
		fmt.Sprintf("%d local or strong pulls of content acknowledged before they began", checked))
}

// appendNew appends s to list unless it is there already. Lists here
// are short: the digests one tag named, the manifests sharing one blob.
func appendNew(list []string, s string) []string {
	if slices.Contains(list, s) {
		return list
	}
	return append(list, s)
}

// Tag register model. Each (repo, tag) is a register holding the digest
// the tag names, "" while the tag does not exist.

// tagInput is one tag operation as porcupine sees it; a read's output is
// the digest it returned.
type tagInput struct {
	Key     string // repo:tag
	Write   bool
	Cond    string
	Expect  string
	Value   string
	Outcome Outcome // writes: ok (applied), fail (condition false), unknown (maybe applied)
	ID      int     // Op.ID, for the visualization
}

func condHolds(cond, expect, state string) bool {
	switch cond {
	case CondIfMatch:
		return state != "" && state == expect
	case CondIfNoneMatch:
		return state == ""
	}
	return true
}

func tagStep(state, input, output any) (bool, any) {
	s := state.(string)
	in := input.(tagInput)
	if !in.Write {
		return output.(string) == s, s
	}
	holds := condHolds(in.Cond, in.Expect, s)
	switch in.Outcome {
	case OutcomeOK:
		if holds {
			return true, in.Value
		}
		return false, s
	case OutcomeFail:
		return !holds, s
	default: // unknown: applied if its condition held, or never
		if holds {
			return true, in.Value
		}
		return true, s
	}
}

func describeTagOp(input, output any) string {
	in := input.(tagInput)
	if !in.Write {
		return fmt.Sprintf("read → %s (op %d)", shortOrAbsent(output.(string)), in.ID)
	}
	c := ""
	switch in.Cond {
	case CondIfMatch:
		c = " if-match " + shortOrAbsent(in.Expect)
	case CondIfNoneMatch:
		c = " if-none-match"
	}
	return fmt.Sprintf("set %s%s → %s (op %d)", shortOrAbsent(in.Value), c, in.Outcome, in.ID)
}

var tagModel = porcupine.Model{
	Partition: func(history []porcupine.Operation) [][]porcupine.Operation {
		// Histories are built partition after partition, so runs of
		// one key are the partitions.
		var out [][]porcupine.Operation
		start := 0
		for i := 1; i <= len(history); i++ {
			if i == len(history) || history[i].Input.(tagInput).Key != history[start].Input.(tagInput).Key {
				out = append(out, history[start:i])
				start = i
			}
		}
		return out
	},
	Init: func() any { return "" },
	Step: tagStep,
	Hash: func(state any) uint64 {
		h := uint64(14695981039346656037) // FNV-1a
		for _, c := range []byte(state.(string)) {
			h = (h ^ uint64(c)) * 1099511628211
		}
		return h
	},
	DescribeOperation: describeTagOp,
	DescribeState:     func(state any) string { return shortOrAbsent(state.(string)) },
}

// tagPartition is the history of one (repo, tag) register.
type tagPartition struct {
	repo, tag string
	ops       []Op // in Start order
	hist      []porcupine.Operation
}

type tagStats struct {
	ops, reads, writes, maybe int
	localReads, failedReads   int
	otherFails, badCond       int
}

// tagPartitions builds the per-tag histories, sorted by repo and tag.
func tagPartitions(ops []Op) ([]*tagPartition, tagStats) {
	var st tagStats
	parts := map[repoKey]*tagPartition{}
	for _, op := range ops {
		in := tagInput{Key: op.Repo + ":" + op.Tag, ID: op.ID}
		ret := int64(op.End)
		var out any
		switch op.Kind {
		case OpTagRead:
			if op.Consistency != "strong" {
				st.localReads++ // local reads may be stale by design
				continue
			}
			if op.Outcome != OutcomeOK {
				st.failedReads++
				continue
			}
			out = op.Value
			st.reads++
		case OpTagWrite:
			switch op.Cond {
			case CondNone, CondIfMatch, CondIfNoneMatch:
			default:
				st.badCond++
				continue
			}
			in.Write, in.Cond, in.Expect, in.Value = true, op.Cond, op.Expect, op.Value
			switch op.Outcome {
			case OutcomeOK:
				in.Outcome = OutcomeOK
			case OutcomeFail:
				// A refusal other than 412 (or a refused unconditional
				// write) says nothing about the register: not applied,
				// nothing to check.
				if op.Cond == CondNone || (op.Status != 0 && op.Status != 412) {
					st.otherFails++
					continue
				}
				in.Outcome = OutcomeFail
			default:
				// No definite answer: it may take effect at any time
				// after it started, which an open-ended return allows.
				in.Outcome = OutcomeUnknown
				ret = math.MaxInt64
				st.maybe++
			}
			st.writes++
		default:
			continue
		}
		k := repoKey{op.Repo, op.Tag}
		p := parts[k]
		if p == nil {
			p = &tagPartition{repo: op.Repo, tag: op.Tag}
			parts[k] = p
		}
		p.ops = append(p.ops, op)
		p.hist = append(p.hist, porcupine.Operation{Input: in, Output: out, Call: int64(op.Start), Return: ret})
		st.ops++
	}
	out := make([]*tagPartition, 0, len(parts))
	for _, p := range parts {
		sortTagPartition(p)
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b *tagPartition) int {
		return cmp.Or(cmp.Compare(a.repo, b.repo), cmp.Compare(a.tag, b.tag))
	})
	return out, st
}

// sortTagPartition orders a partition by Start then ID (the caller's ops
// should already be in Start order) and gives its clients dense,
// non-negative numbers, which the visualization needs.
func sortTagPartition(p *tagPartition) {
	idx := make([]int, len(p.ops))
	for i := range idx {
		idx[i] = i
	}
	slices.SortStableFunc(idx, func(a, b int) int {
		return cmp.Or(cmp.Compare(p.ops[a].Start, p.ops[b].Start), cmp.Compare(p.ops[a].ID, p.ops[b].ID))
	})
	ops := make([]Op, len(idx))
	hist := make([]porcupine.Operation, len(idx))
	for i, j := range idx {
		ops[i], hist[i] = p.ops[j], p.hist[j]
	}
	clients := map[int]int{}
	for i := range ops {
		c, ok := clients[ops[i].Client]
		if !ok {
			c = len(clients)
			clients[ops[i].Client] = c
		}
		hist[i].ClientId = c
	}
	p.ops, p.hist = ops, hist
}

// checkTagPartitions checks each partition, in parallel, until deadline
// (zero: no limit). Partitions the deadline leaves unchecked are Unknown.
func checkTagPartitions(parts []*tagPartition, deadline time.Time) []porcupine.CheckResult {
	res := make([]porcupine.CheckResult, len(parts))
	work := make(chan int)
	var wg sync.WaitGroup
	for range min(runtime.GOMAXPROCS(0), max(len(parts), 1)) {
		wg.Go(func() {
			for i := range work {
				t, ok := budgetLeft(deadline)
				if !ok {
					res[i] = porcupine.Unknown
					continue
				}
				res[i] = porcupine.CheckOperationsTimeout(tagModel, parts[i].hist, t)
			}
		})
	}
	for i := range parts {
		work <- i
	}
	close(work)
	wg.Wait()
	return res
}

// budgetLeft is the time left until deadline as porcupine takes it (0 is
// no limit); false once the deadline has passed.
func budgetLeft(deadline time.Time) (time.Duration, bool) {
	if deadline.IsZero() {
		return 0, true
	}
	t := time.Until(deadline)
	return t, t > 0
}

// maxViolationOps bounds the operations a linearizability violation lists.
const maxViolationOps = 50

// CheckLinearizable checks that the tag operations form, per (repo, tag),
// a linearizable history of a register holding the digest the tag names
// ("" while the tag does not exist, which is the initial state: the
// workload creates shared tags only through recorded operations).
//
// Only reads through a strong gateway that got an answer enter it; local
// reads may be stale by design. Writes through any gateway enter it:
// acknowledged ones applied, 412s as "the condition did not hold", and
// those without a definite answer as maybe applied at any time after they
// started. Other refusals say nothing about the register and are left out.
// A timeout <= 0 means no limit; on timeout the status is "unknown".
func CheckLinearizable(ops []Op, timeout time.Duration) CheckResult {
	parts, st := tagPartitions(ops)
	var deadline time.Time
	if timeout > 0 {
		deadline = time.Now().Add(timeout)
	}
	res := checkTagPartitions(parts, deadline)
	var (
		vs      []Violation
		unknown int
	)
	for i, r := range res {
		switch r {
		case porcupine.Illegal:
			vs = append(vs, tagViolation(parts[i], deadline))
		case porcupine.Unknown:
			unknown++
		}
	}
	detail := fmt.Sprintf("%d tags, %d operations: %d strong reads, %d writes (%d without a definite answer); left out: %d local reads, %d reads without an answer, %d non-412 refusals",
		len(parts), st.ops, st.reads, st.writes, st.maybe, st.localReads, st.failedReads, st.otherFails)
	if st.badCond > 0 {
		detail += fmt.Sprintf(", %d writes with an unrecognized condition", st.badCond)
	}
	r := newResult(CheckNameLinearizable, st.ops, vs, detail)
	if unknown > 0 {
		note := fmt.Sprintf("the linearizability checker timed out after %v: %d of %d tags undecided", timeout, unknown, len(parts))
		r.Detail = note + "; " + r.Detail
		if r.Status == CheckPass {
			r.Status = CheckUnknown
		}
	}
	return r
}

// tagViolation describes an illegal partition: the operation no legal
// order can place (the earliest-returning one that no partial
// linearization reaches) and the operations around it.
func tagViolation(p *tagPartition, deadline time.Time) Violation {
	culprit := -1
	t, ok := budgetLeft(deadline)
	if !ok {
		t = time.Second // an illegal history was found in time; this is usually quick
	}
	_, info := porcupine.CheckOperationsVerbose(tagModel, p.hist, t)
	if partials := info.PartialLinearizations(); len(partials) > 0 {
		culprit = unplaced(p.hist, partials[0])
	}
	lo, hi := 0, len(p.ops)
	if len(p.ops) > maxViolationOps {
		c := max(culprit, 0)
		lo = max(0, c-maxViolationOps*4/5)
		hi = min(len(p.ops), lo+maxViolationOps)
		lo = hi - maxViolationOps
	}
	msg := fmt.Sprintf("tag %s:%s: the %d operations on it are not linearizable", p.repo, p.tag, len(p.ops))
	if culprit >= 0 {
		c := p.ops[culprit]
		msg += fmt.Sprintf("; no legal order places op %d, %s", c.ID, strings.TrimSuffix(describeTagOp(p.hist[culprit].Input, p.hist[culprit].Output), fmt.Sprintf(" (op %d)", c.ID)))
	}
	if lo > 0 || hi < len(p.ops) {
		msg += fmt.Sprintf("; showing operations %d–%d of %d", lo+1, hi, len(p.ops))
	}
	return Violation{Check: CheckNameLinearizable, Message: msg, Ops: slices.Clone(p.ops[lo:hi])}
}

// unplaced picks, among the operations that no partial linearization
// reaches (or, if every one is reached by some, those missing from the
// longest), the one that returned first: the history cannot be extended
// past it. -1 if there is none.
func unplaced(hist []porcupine.Operation, partials [][]int) int {
	reached := make([]bool, len(hist))
	var longest []int
	for _, l := range partials {
		for _, id := range l {
			if id >= 0 && id < len(hist) {
				reached[id] = true
			}
		}
		if len(l) > len(longest) {
			longest = l
		}
	}
	pick := func(skip func(int) bool) int {
		best := -1
		for i := range hist {
			if !skip(i) && (best < 0 || hist[i].Return < hist[best].Return) {
				best = i
			}
		}
		return best
	}
	if c := pick(func(i int) bool { return reached[i] }); c >= 0 {
		return c
	}
	inLongest := make([]bool, len(hist))
	for _, id := range longest {
		if id >= 0 && id < len(hist) {
			inLongest[id] = true
		}
	}
	return pick(func(i int) bool { return inLongest[i] })
}

// visualizationTimeout bounds the checking WriteLinearizabilityVisualization
// repeats to find what to draw.
const visualizationTimeout = time.Minute

// WriteLinearizabilityVisualization writes porcupine's HTML visualization
// of the tag histories to path: of the tags whose history is not
// linearizable (or could not be decided), or of every tag if all are.
func WriteLinearizabilityVisualization(ops []Op, path string) error {
	parts, _ := tagPartitions(ops)
	deadline := time.Now().Add(visualizationTimeout)
	res := checkTagPartitions(parts, deadline)
	var hist []porcupine.Operation
	for i, r := range res {
		if r != porcupine.Ok {
			hist = append(hist, parts[i].hist...)
		}
	}
	if hist == nil {
		for _, p := range parts {
			hist = append(hist, p.hist...)
		}
	}
	t, ok := budgetLeft(deadline)
	if !ok {
		t = time.Second // still draw what a short search finds
	}
	_, info := porcupine.CheckOperationsVerbose(tagModel, hist, t)
	return porcupine.VisualizePath(tagModel, info, path)
}

// Formatting shared with the report.

func shortDigest(d string) string {
	if len(d) > len("sha256:")+12 && strings.HasPrefix(d, "sha256:") {
		return d[:len("sha256:")+12]
	}
	return d
}

func shortOrAbsent(d string) string {
	if d == "" {
		return "absent"
	}
	return shortDigest(d)
}

// opRef is repo[:tag][@digest], the digest shortened.
func opRef(op Op) string {
	s := op.Repo
	if op.Tag != "" {
		s += ":" + op.Tag
	}
	if op.Digest != "" {
		s += "@" + shortDigest(op.Digest)
	}
	return s
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func fmtOffset(d time.Duration) string {
	if d == math.MaxInt64 {
		return "∞"
	}
	return d.Round(time.Millisecond).String()
}
