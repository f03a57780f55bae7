package chaos

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/meridian-registry/meridian/replication"
)

// testLog writes progress lines to the test log.
type testLog struct{ t *testing.T }

func (l testLog) Write(b []byte) (int, error) {
	l.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

// binaries returns the meridian and versitygw binaries. versitygw comes
// from MERIDIAN_VERSITYGW, then bin/tools (where make installs it), then
// $PATH; without it the test is skipped, or fails under
// MERIDIAN_REQUIRE_S3=1 (as the S3 driver's tests do), so that make test
// cannot lose the cluster tests silently. meridian comes from MERIDIAN_BIN
// or a fresh build of ./cmd/meridian.
func binaries(t *testing.T) (meridian, versitygw string) {
	t.Helper()
	if testing.Short() {
		t.Skip("starts a real cluster")
	}
	versitygw, ok := findVersitygw()
	if !ok {
		msg := "versitygw not found (set MERIDIAN_VERSITYGW, or make bin/tools/versitygw)"
		if os.Getenv("MERIDIAN_REQUIRE_S3") == "1" {
			t.Fatal(msg + "; MERIDIAN_REQUIRE_S3=1 makes this a failure")
		}
		t.Skip(msg)
	}
	if meridian = os.Getenv("MERIDIAN_BIN"); meridian != "" {
		return meridian, versitygw
	}
	meridian = filepath.Join(t.TempDir(), "meridian")
	build := exec.Command("go", "build", "-o", meridian, "./cmd/meridian")
	build.Dir = ".."
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("cannot build meridian: %v\n%s", err, out)
	}
	return meridian, versitygw
}

// findVersitygw looks where binaries says.
func findVersitygw() (string, bool) {
	if p := os.Getenv("MERIDIAN_VERSITYGW"); p != "" {
		return p, true
	}
	if p, err := filepath.Abs(filepath.Join("..", "bin", "tools", "versitygw")); err == nil {
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
			return p, true
		}
	}
	if p, err := exec.LookPath("versitygw"); err == nil {
		return p, true
	}
	return "", false
}

// TestShortCluster starts the short profile's cluster (mutual TLS, gossip
// encryption), checks its shape, puts each fault on it briefly (through
// the same code InjectFaults uses; a certificate rotation of the leader
// among them, a revocation of the robot, whose login every gateway must
// refuse within revokeGrace, and a gossip key rotation that restarts the
// leader from its key file), runs the scheduler until it has
// injected every kind once, heals and waits for convergence; then
// collects garbage and reads the region stores (checkGCAndStores).
func TestShortCluster(t *testing.T) {
	meridian, versitygw := binaries(t)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	dir := t.TempDir()
	if keep := os.Getenv("CHAOS_TEST_DIR"); keep != "" {
		dir = keep // kept after the test, for its logs
	}
	started := time.Now()
	c, err := StartCluster(ctx, Options{Meridian: meridian, Versitygw: versitygw, Dir: dir, Profile: ShortProfile(), Log: testLog{t}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	t.Logf("cluster started in %v", time.Since(started).Round(time.Millisecond))

	st, err := c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	voters := 0
	for _, n := range st.Nodes {
		if n.Suffrage == "voter" && n.Reachable {
			voters++
		}
	}
	if st.Leader == "" || voters != 3 || len(st.Regions) != 2 {
		t.Fatalf("status: %+v", st)
	}
	for _, gw := range c.Gateways() {
		if code, err := httpStatus(ctx, gw.URL+"/v2/"); err != nil || (code != 200 && code != 401) {
			t.Fatalf("gateway %s /v2/: %d %v", gw.ID, code, err)
		}
	}
	// Every member reached the others through the fault proxies, and the
	// proxies told nodes and gateways apart.
	acc := c.Network().Accepted()
	for _, want := range []string{"gw-strong->", "gw-local->", "us-east-a->"} {
		found := false
		for k := range acc {
			found = found || strings.HasPrefix(k, want)
		}
		if !found {
			t.Errorf("no connection from %s… through the proxies: %v", want, acc)
		}
	}
	// Every node's gRPC port speaks mutual TLS with its own identity,
	// which the harness's admin certificate can check.
	for _, n := range c.nodes {
		if _, err := c.pki.served(ctx, n.grpcAddr, c.pki.identity(roleNode, n.spec.ID)); err != nil {
			t.Errorf("%s over mutual TLS: %v", n.spec.ID, err)
		}
	}
	cost, n := c.Network().IdentifyCost()
	t.Logf("proxied connections by source: %v; identification %v each (%d)", acc, cost, n)

	// One of each node fault, briefly, one at a time. The leader faults
	// must make the others elect a new leader.
	newLeader := func(old string) string {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for time.Now().Before(deadline) {
			if l, err := c.Leader(ctx); err == nil && l != old {
				return l
			}
			time.Sleep(250 * time.Millisecond)
		}
		t.Fatalf("no leader other than %s within 30 s", old)
		return ""
	}
	leader := st.Leader
	for _, f := range []*faultSpec{
		{kind: FaultKill, detail: "leader"},
		{kind: FaultPause, detail: "leader"},
		{kind: FaultPartition, detail: "leader"},
		{kind: FaultLatency, delay: 100 * time.Millisecond, hold: 3 * time.Second},
		{kind: FaultGatewayKill, gateway: "gw-local", target: "gw-local", hold: time.Second},
		{kind: FaultS3Error, region: "us-east", target: "us-east", hold: 2 * time.Second},
		{kind: FaultS3Stall, region: "us-east", target: "us-east", hold: 2 * time.Second},
		{kind: FaultS3Stop, region: "us-east", target: "us-east", hold: 2 * time.Second},
		{kind: FaultCertRotate},
		{kind: FaultRevoke, robot: robotTarget, target: robotTarget, hold: time.Second},
		{kind: FaultGossipKey},
	} {
		if f.target == "" {
			f.node, f.target = leader, leader
		}
		robot := c.Robot()
		faultStart := time.Now()
		heal, err := c.inject(f)
		if err != nil {
			t.Fatalf("%s: %v", f.kind, err)
		}
		switch {
		case f.kind == FaultRevoke:
			// Every gateway refuses the robot within the grace the
			// revocation check allows.
			for _, gw := range c.Gateways() {
				code := 0
				for time.Since(f.revoked) < revokeGrace {
					if code, _ = statusAs(ctx, gw.URL+"/v2/", robot); code == 401 {
						break
					}
					time.Sleep(20 * time.Millisecond)
				}
				if code != 401 {
					t.Errorf("%s still answered %d to robot %s %v after its revocation returned", gw.ID, code, f.target, time.Since(f.revoked))
				}
			}
		case f.detail == "leader":
			leader = newLeader(leader)
			t.Logf("%s of the leader %s: %s took over after %v", f.kind, f.target, leader, time.Since(faultStart).Round(time.Millisecond))
		default:
			time.Sleep(f.hold)
		}
		if note := heal(ctx); note != "" || f.failure != "" {
			t.Fatalf("healing %s: %s%s", f.kind, note, f.failure)
		}
		if f.kind == FaultRevoke {
			if c.Robot() == robot {
				t.Fatal("the revocation's healing made no new robot")
			}
			if err := c.waitLogin(ctx, 10*time.Second); err != nil {
				t.Fatal(err)
			}
		}
		t.Logf("%s on %s: healed after %v %s", f.kind, f.target, time.Since(faultStart).Round(time.Millisecond), f.detail)
	}
	if err := c.Heal(ctx); err != nil {
		t.Fatalf("Heal: %v", err)
	}

	// The scheduler: one round, with every hold cut to a second, must
	// keep its promises on a real cluster (a leader kill among them).
	c.prof.MaxFaultHold = time.Second
	quotas := FaultQuotas(c.prof, nil, 1)
	var mu sync.Mutex
	var faults []Fault
	fctx, stop := context.WithTimeout(ctx, 3*time.Minute)
	defer stop()
	roundStart := time.Now()
	c.InjectFaults(fctx, rand.New(rand.NewPCG(1, 2)), FaultPlan{MeanInterval: time.Second, MaxConcurrent: 1, Base: started},
		func(f Fault) {
			mu.Lock()
			defer mu.Unlock()
			faults = append(faults, f)
			if quotasMet(countFaults(quotas, faults)) {
				stop()
			}
		})
	stop()
	got := countFaults(quotas, faults)
	t.Logf("a round of %d faults in %v: %v", len(faults), time.Since(roundStart).Round(time.Millisecond), got)
	if !quotasMet(got) {
		t.Fatalf("the scheduler did not keep its promises within 3 minutes: %v", got)
	}
	for _, f := range faults {
		t.Logf("fault %+v", f)
		if f.End < f.Start || f.Kind == "" || f.Target == "" || f.Error != "" || f.Failure != "" {
			t.Errorf("bad fault record %+v", f)
		}
	}

	healStart := time.Now()
	if err := c.Heal(ctx); err != nil {
		t.Fatalf("Heal: %v", err)
	}
	t.Logf("healed in %v", time.Since(healStart).Round(time.Millisecond))
	conv := c.WaitConverged(ctx)
	t.Logf("convergence: %+v", conv)
	if !conv.Converged {
		t.Fatalf("not converged: %s", conv.Detail)
	}
	if exits := c.UnexpectedExits(); len(exits) > 0 {
		t.Fatalf("unexpected exits: %+v", exits)
	}
	checkGCAndStores(t, ctx, c)
}

// checkGCAndStores pushes two images, deletes one, runs a last collection
// through the CLI and waits for its removals: the deleted image's blobs
// are gone from every region's store, the live one's are all there, and
// the store check says so, then fails once one live blob is deleted from
// the S3 region's bucket behind the cluster's back.
func checkGCAndStores(t *testing.T, ctx context.Context, c *Cluster) {
	h := NewHistory()
	w := NewWorkload(WorkloadConfig{Seed: 1, Gateways: c.Gateways(), Admin: c.AdminCredentials(), RequestTimeout: 20 * time.Second}, h)
	rng := rand.New(rand.NewPCG(3, 4))
	var imgs []image
	for k := range 2 {
		img, err := w.pushImage(ctx, 0, nil, rng, "chaos/gc", fmt.Sprintf("v%d", k), 2, false)
		if err != nil {
			t.Fatalf("push: %v", err)
		}
		imgs = append(imgs, img)
	}
	gone := imgs[1]
	del := Op{Kind: OpDelete, Repo: gone.repo, Digest: gone.digest, Start: h.Now()}
	r, err := w.client.do(ctx, c.Gateways()[0], http.MethodDelete, "/v2/"+gone.repo+"/manifests/"+gone.digest, nil, nil)
	if err != nil || r.status != http.StatusAccepted {
		t.Fatalf("delete: %v %s", err, errText(r, err))
	}
	del.End, del.Outcome = h.Now(), OutcomeOK
	h.Add(del)
	holdFor(ctx, gcGrace+time.Second) // the deleted image's blobs outlive the grace

	drain := c.FinalGC(ctx, h, regionNames(c.prof))
	t.Logf("gc: %s", drain)
	if !drain.Drained {
		t.Fatalf("gc did not drain: %s", drain)
	}
	stores, err := c.RegionStores(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for region, s := range stores {
		for _, b := range gone.blobs {
			if _, err := s.Open(ctx, digest.Digest(b.Digest), 0); !errors.Is(err, replication.ErrBlobNotFound) {
				t.Errorf("%s still holds %s of the deleted image: %v", region, b.Digest, err)
			}
		}
	}
	res := CheckLiveManifests(ctx, h.Ops(), stores, c.RegionsOf, drain)
	wantStatus(t, res, CheckPass)
	if want := len(imgs[0].blobs) * len(stores); res.Checked != want {
		t.Fatalf("checked %d copies, want %d: %s", res.Checked, want, res.Detail)
	}
	lost := imgs[0].blobs[1]
	if err := stores["us-east"].(replication.Driver).Delete(ctx, digest.Digest(lost.Digest)); err != nil {
		t.Fatal(err)
	}
	res = CheckLiveManifests(ctx, h.Ops(), stores, c.RegionsOf, drain)
	wantStatus(t, res, CheckFail)
	if len(res.Violations) != 1 || !strings.Contains(res.Violations[0].Message, "region us-east: blob "+lost.Digest) {
		t.Fatalf("violations:\n%s", violationText(res))
	}
}

func quotasMet(qs []FaultQuota) bool {
	for _, q := range qs {
		if q.Got < q.Min {
			return false
		}
	}
	return true
}
