package chaos

import (
	"context"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

func hRobotWrite(user string, start, end int, status int) Op {
	op := Op{Client: 9, Kind: OpRobotWrite, Gateway: "gw-a", Repo: RobotRepoPrefix + "/app9", User: user,
		Request: "PUT /v2/robot/app9/manifests/v1", Start: msec(start), End: msec(end), Status: status,
		Outcome: outcomeOf(reply{status: status}, nil)}
	if op.Outcome != OutcomeOK {
		op.Err = errText(reply{status: status}, nil)
	}
	return op
}

// TestCheckRevocations: a revoked robot's write acknowledged after the
// grace is a violation; one sent before the revocation returned plus the
// grace is not judged, nor are another robot's writes or a revocation that
// was not injected; refusals are counted by status; no write to judge
// proves nothing and fails the run.
func TestCheckRevocations(t *testing.T) {
	faults := []Fault{
		{Kind: FaultRevoke, Target: "w1", Start: msec(10000), Revoked: msec(10200), End: msec(15000)},
		{Kind: FaultRevoke, Target: "w3", Start: msec(20000), End: msec(20500), Error: "no leader"},
		{Kind: FaultKill, Target: "n1", Start: msec(1000), End: msec(5000)},
	}
	var h testHist
	h.add(hRobotWrite("robot+w1", 5000, 5100, 201))   // before: acknowledged
	h.add(hRobotWrite("robot+w1", 10100, 10300, 201)) // in flight at the revocation
	h.add(hRobotWrite("robot+w1", 10900, 11000, 201)) // within the grace
	h.add(hRobotWrite("robot+w1", 12000, 12010, 401)) // refused
	h.add(hRobotWrite("robot+w1", 13000, 13010, 429)) // locked out: not acknowledged either
	h.add(hRobotWrite("robot+w2", 16000, 16100, 201)) // the next robot
	h.add(hRobotWrite("robot+w3", 21000, 21100, 201)) // its revocation failed
	res := CheckRevocations(h.sorted(), faults)
	if res.Status != CheckPass || res.Checked != 2 {
		t.Fatalf("clean history: %+v", res)
	}
	for _, want := range []string{"1 revocations", "2 write requests", "401 ×1", "429 ×1", "2 sent earlier", "1 acknowledged before"} {
		if !strings.Contains(res.Detail, want) {
			t.Errorf("detail %q lacks %q", res.Detail, want)
		}
	}

	late := h.add(hRobotWrite("robot+w1", 14000, 14020, 201))
	res = CheckRevocations(h.sorted(), faults)
	if res.Status != CheckFail || res.Checked != 3 || len(res.Violations) != 1 || len(res.Violations[0].Ops) != 1 ||
		res.Violations[0].Ops[0].ID != late.ID || !strings.Contains(res.Violations[0].Message, "w1") {
		t.Fatalf("a write acknowledged after the revocation: %+v", res)
	}
	r := NewReport(1, "short", testStarted, time.Minute, h.sorted(), faults, nil, []CheckResult{res}, convergedState())
	text := reportText(t, r)
	if r.Passed || !slices.Contains(r.Failures, "check "+CheckNameRevocations+" found 1 violations") ||
		!strings.Contains(text, "as=robot+w1") || !strings.Contains(text, "PUT /v2/robot/app9/manifests/v1") {
		t.Fatalf("failures %q\n%s", r.Failures, text)
	}

	// Nothing sent after the grace: nothing proven.
	none := CheckRevocations(h.sorted()[:3], faults)
	r = NewReport(1, "short", testStarted, time.Minute, nil, faults, nil, []CheckResult{none}, convergedState())
	if r.Passed || !slices.Contains(r.Failures, "check "+CheckNameRevocations+" had nothing to check") {
		t.Fatalf("nothing to judge: %+v, failures %q", none, r.Failures)
	}
	if !hasKind(FaultQuotas(ShortProfile(), nil, 1), nil, FaultRevoke) || hasKind(FaultQuotas(ShortProfile(), []string{FaultKill}, 1), nil, FaultRevoke) {
		t.Fatal("the revocation check is not added exactly when revocations are promised or happened")
	}
}

// fakeAuthRegistry accepts monolithic blob uploads and manifest PUTs from
// the logins it holds, refuses others with 401, and notes who sent what.
type fakeAuthRegistry struct {
	mu     sync.Mutex
	logins map[string]string
	seen   []string // "user METHOD path"
}

func (f *fakeAuthRegistry) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	user, pass, _ := r.BasicAuth()
	f.mu.Lock()
	f.seen = append(f.seen, user+" "+r.Method+" "+r.URL.Path)
	ok := pass != "" && f.logins[user] == pass
	f.mu.Unlock()
	if !ok {
		w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
		http.Error(w, `{"errors":[{"code":"UNAUTHORIZED"}]}`, http.StatusUnauthorized)
		return
	}
	switch {
	case r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/blobs/uploads/"):
		w.WriteHeader(http.StatusCreated)
	case r.Method == http.MethodPut && strings.Contains(r.URL.Path, "/manifests/"):
		var body strings.Builder
		buf := make([]byte, 32<<10)
		for {
			n, err := r.Body.Read(buf)
			body.Write(buf[:n])
			if err != nil {
				break
			}
		}
		w.Header().Set("Docker-Content-Digest", sha256Digest([]byte(body.String())))
		w.WriteHeader(http.StatusCreated)
	default:
		http.Error(w, "not here", http.StatusNotFound)
	}
}

func (f *fakeAuthRegistry) revoke(user string) {
	f.mu.Lock()
	delete(f.logins, user)
	f.mu.Unlock()
}

// TestRobotPushRecorded: the workload logs in as its admin, a robot push
// as the robot, each of whose requests is recorded with the robot's
// login; once the robot is revoked its push stops at the first refusal,
// and the revocation check judges what the history holds.
func TestRobotPushRecorded(t *testing.T) {
	admin, robot := Credentials{"admin", "admin-secret-1234"}, Credentials{"robot+w1", "robot-secret"}
	reg := &fakeAuthRegistry{logins: map[string]string{admin.User: admin.Password, robot.User: robot.Password}}
	srv := httptest.NewServer(reg)
	defer srv.Close()
	h := NewHistory()
	w := NewWorkload(WorkloadConfig{Seed: 1, Gateways: []Endpoint{{ID: "gw", URL: srv.URL, ReadConsistency: "strong"}},
		Admin: admin, Robot: func() Credentials { return robot }, RequestTimeout: 5 * time.Second}, h)
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(1, 2))

	if _, err := w.pushImage(ctx, 0, nil, rng, "chaos/app0", "v0", 1, false); err != nil {
		t.Fatalf("admin push: %v", err)
	}
	as := &sender{client: 9, cred: robot}
	if _, err := w.pushImage(ctx, 9, as, rng, RobotRepoPrefix+"/app9", "v0", 1, false); err != nil {
		t.Fatalf("robot push: %v", err)
	}
	reg.mu.Lock()
	for _, s := range reg.seen {
		user, rest, _ := strings.Cut(s, " ")
		if want := map[bool]string{true: robot.User, false: admin.User}[strings.Contains(rest, "/"+RobotRepoPrefix+"/")]; user != want {
			t.Errorf("%s sent as %q, want %q", rest, user, want)
		}
	}
	reg.mu.Unlock()
	var writes, pushes []Op
	for _, op := range h.Ops() {
		switch {
		case op.Kind == OpRobotWrite:
			writes = append(writes, op)
		case op.Kind == OpPush && op.User == robot.User:
			pushes = append(pushes, op)
		}
	}
	if len(writes) != 3 || len(pushes) != 1 || pushes[0].Outcome != OutcomeOK {
		t.Fatalf("robot push recorded %+v and pushes %+v", writes, pushes)
	}
	for _, op := range writes {
		if op.User != robot.User || op.Outcome != OutcomeOK || op.Client != 9 || op.Repo != RobotRepoPrefix+"/app9" || op.Request == "" {
			t.Fatalf("robot write %+v", op)
		}
	}

	reg.revoke(robot.User)
	revoked := h.Now()
	time.Sleep(5 * time.Millisecond)
	if _, err := w.pushImage(ctx, 9, as, rng, RobotRepoPrefix+"/app9", "v1", 1, false); err == nil {
		t.Fatal("a revoked robot's push was acknowledged")
	}
	ops := h.Ops()
	var refused, last Op
	for _, op := range ops {
		if op.Start > revoked {
			if op.Kind == OpRobotWrite {
				refused = op
			} else {
				last = op
			}
		}
	}
	if refused.Kind != OpRobotWrite || refused.Status != http.StatusUnauthorized || refused.Outcome != OutcomeFail ||
		last.Kind != OpPush || last.Outcome != OutcomeFail || last.User != robot.User {
		t.Fatalf("after the revocation: %+v then %+v", refused, last)
	}
	res := CheckRevocations(ops, []Fault{{Kind: FaultRevoke, Target: "w1", Revoked: revoked - revokeGrace}})
	if res.Status != CheckPass || res.Checked != 1 {
		t.Fatalf("check on the recorded history: %+v", res)
	}
}
