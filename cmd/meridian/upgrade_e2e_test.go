package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/meridian-registry/meridian/consensus"
	"github.com/meridian-registry/meridian/node/pki"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// upgradeFromFile names the commit of the previous supported version.
const upgradeFromFile = "../../deploy/upgrade-from"

// upgradeOldVersion is the version the old binary reports in status.
const upgradeOldVersion = "upgrade-from"

// upgradeAttempts is the client's retry budget per operation: each attempt
// goes to the next node, as behind a load balancer, after a short backoff.
const upgradeAttempts = 6

var hexCommit = regexp.MustCompile(`^[0-9a-f]{40}$`)

// upgradeFrom reads the first line of path that is neither blank nor a
// comment: the full hash of the commit upgrades start from.
func upgradeFrom(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		line := strings.TrimSpace(s.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if !hexCommit.MatchString(line) {
			return "", fmt.Errorf("%s: %q is not a full commit hash (40 lowercase hex digits)", path, line)
		}
		return line, nil
	}
	if err := s.Err(); err != nil {
		return "", err
	}
	return "", fmt.Errorf("%s names no commit", path)
}

// upgradeBuildOld builds the meridian binary of commit from a detached
// worktree of this repository, removed afterwards. It skips the test when
// git or the commit is not available (a shallow clone).
func upgradeBuildOld(t *testing.T, commit string) string {
	t.Helper()
	git, err := exec.LookPath("git")
	if err != nil {
		t.Skipf("git is not installed: the rolling upgrade test builds %s from this repository's history", commit)
	}
	out, err := exec.Command(git, "rev-parse", "--show-toplevel").Output()
	if err != nil {
		t.Skipf("not in a git repository (%v): the rolling upgrade test builds %s from its history", err, commit)
	}
	top := strings.TrimSpace(string(out))
	if err := exec.Command(git, "-C", top, "cat-file", "-e", commit+"^{commit}").Run(); err != nil {
		t.Skipf("commit %s (deploy/upgrade-from) is not in this repository, a shallow clone perhaps: fetch it to run the rolling upgrade test", commit)
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	if out, err := exec.Command(git, "-C", top, "worktree", "add", "--detach", src, commit).CombinedOutput(); err != nil {
		t.Fatalf("git worktree add %s: %v\n%s", commit, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command(git, "-C", top, "worktree", "remove", "--force", src).CombinedOutput(); err != nil {
			t.Errorf("git worktree remove: %v\n%s", err, out)
		}
		exec.Command(git, "-C", top, "worktree", "prune").Run()
	})
	start := time.Now()
	bin, err := e2eBuildIn(src, "./cmd/meridian", filepath.Join(dir, "meridian-old"), "-ldflags", "-X main.version="+upgradeOldVersion)
	if err != nil {
		t.Fatalf("building meridian at %s: %v", commit, err)
	}
	t.Logf("built meridian at %s in %v", commit[:12], time.Since(start).Round(time.Millisecond))
	return bin
}

// upgradePorts reserves n loopback ports: a node restarted on a new binary
// keeps its addresses, as it would on a real host.
func upgradePorts(t *testing.T, n int) []string {
	t.Helper()
	var out []string
	var lns []net.Listener
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lns = append(lns, ln)
		out = append(out, ln.Addr().String())
	}
	for _, ln := range lns {
		ln.Close()
	}
	return out
}

// upgradeNode is one member: its fixed flags, and the process running now.
type upgradeNode struct {
	id, dir    string
	http, grpc string
	args       []string
	proc       *e2eProc
}

type upgradeCluster struct {
	t          *testing.T
	dir, pki   string
	oldBin     string
	nodes      []*upgradeNode
	admin      map[string]pb.AdminClient
	adminFlags []string
}

func (u *upgradeCluster) node(id string) *upgradeNode {
	for _, n := range u.nodes {
		if n.id == id {
			return n
		}
	}
	u.t.Fatalf("no node %q", id)
	return nil
}

// start runs binary on n's data directory with n's flags.
func (u *upgradeCluster) start(n *upgradeNode, binary, label string) {
	u.t.Helper()
	ready := filepath.Join(u.dir, n.id+".ready.json")
	n.proc = e2eStartBinary(u.t, binary, ready, e2eEnv(), append(slices.Clone(n.args), "--ready-file", ready)...)
	n.proc.name = n.id + " (" + label + ")"
}

func startUpgradeCluster(t *testing.T, oldBin string) *upgradeCluster {
	u := &upgradeCluster{t: t, dir: t.TempDir(), oldBin: oldBin, admin: map[string]pb.AdminClient{}}
	u.pki = filepath.Join(u.dir, "pki")
	// The old release makes the CA and certificates, as it did in production.
	run := func(args ...string) {
		out, err := exec.Command(oldBin, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("meridian %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	run("ca", "init", "--dir", u.pki, "--cluster-id", "upgrade")
	for _, c := range [][2]string{{"node", "n0"}, {"node", "n1"}, {"node", "n2"}, {"admin", "ops"}} {
		run("ca", "issue", "--dir", u.pki, "--role", c[0], "--id", c[1])
	}
	u.adminFlags = []string{"--tls-ca", filepath.Join(u.pki, "ca.crt"),
		"--tls-cert", filepath.Join(u.pki, "ops.crt"), "--tls-key", filepath.Join(u.pki, "ops.key")}
	common := []string{"--cluster-id", "upgrade", "--gossip-profile", "local",
		"--gossip-key-file", filepath.Join(u.pki, "gossip.key"),
		"--region-store", "east=file://" + filepath.Join(u.dir, "blobs", "east"),
		"--region-store", "west=file://" + filepath.Join(u.dir, "blobs", "west")}
	ports := upgradePorts(t, 12)
	for i := range 3 {
		id := fmt.Sprintf("n%d", i)
		p := ports[4*i : 4*i+4]
		n := &upgradeNode{id: id, dir: filepath.Join(u.dir, id), http: p[0], grpc: p[1]}
		n.args = slices.Concat([]string{"serve", "--node-id", id, "--region", []string{"east", "west", "west"}[i],
			"--data-dir", n.dir, "--http-addr", p[0], "--grpc-addr", p[1], "--raft-addr", p[2], "--gossip-addr", p[3],
			"--tls-ca", filepath.Join(u.pki, "ca.crt"), "--tls-cert", filepath.Join(u.pki, id+".crt"),
			"--tls-key", filepath.Join(u.pki, id+".key")}, common)
		if i > 0 {
			n.args = append(n.args, "--join", ports[3])
		}
		u.nodes = append(u.nodes, n)
	}
	src, err := pki.Open(filepath.Join(u.pki, "ca.crt"), filepath.Join(u.pki, "ops.crt"), filepath.Join(u.pki, "ops.key"), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range u.nodes {
		conn, err := grpc.NewClient(n.grpc, grpc.WithTransportCredentials(credentials.NewTLS(src.ClientConfig(nil, "h2"))))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		u.admin[n.id] = pb.NewAdminClient(conn)
	}
	for i, n := range u.nodes {
		u.start(n, oldBin, "old")
		if i == 0 {
			n.proc.waitWritten()
		}
	}
	for _, n := range u.nodes {
		n.proc.waitReady()
	}
	return u
}

// status asks the running nodes, in turn, for the cluster status.
func (u *upgradeCluster) status() (*pb.ClusterStatusResponse, error) {
	var errs []string
	for _, n := range u.nodes {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		st, err := u.admin[n.id].ClusterStatus(ctx, &pb.ClusterStatusRequest{})
		cancel()
		if err == nil {
			return st, nil
		}
		errs = append(errs, n.id+": "+err.Error())
	}
	return nil, fmt.Errorf("no node answers the cluster status: %s", strings.Join(errs, "; "))
}

func memberStatus(st *pb.ClusterStatusResponse, id string) *pb.NodeStatus {
	for _, m := range st.Members {
		if m.Id == id {
			return m.Status
		}
	}
	return nil
}

// converged waits until every node is a live voter that answers, all have
// applied the leader's commit index, and their state digests at that index
// are equal. The client must be paused, or indexes keep moving.
func (u *upgradeCluster) converged(what string) *pb.ClusterStatusResponse {
	u.t.Helper()
	var st *pb.ClusterStatusResponse
	var last error
	deadline := time.Now().Add(2 * time.Minute)
	for {
		st, last = u.status()
		if last == nil {
			last = convergedStatus(st)
		}
		if last == nil {
			return st
		}
		if time.Now().After(deadline) {
			u.t.Fatalf("%s: the nodes did not converge within 2m: %v", what, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func convergedStatus(st *pb.ClusterStatusResponse) error {
	if st.LeaderId == "" {
		return fmt.Errorf("no leader")
	}
	if len(st.Members) != 3 {
		return fmt.Errorf("%d members", len(st.Members))
	}
	var digest []byte
	var index uint64
	for i, m := range st.Members {
		s := m.Status
		switch {
		case s == nil:
			return fmt.Errorf("%s does not answer: %s", m.Id, m.Error)
		case m.Suffrage != "voter" || m.Health != "alive":
			return fmt.Errorf("%s is %s and %s", m.Id, m.Suffrage, m.Health)
		case s.AppliedIndex != st.LeaderCommitIndex:
			return fmt.Errorf("%s applied %d of %d", m.Id, s.AppliedIndex, st.LeaderCommitIndex)
		case i == 0:
			digest, index = s.StateDigest, s.StateDigestIndex
		case s.StateDigestIndex != index || !bytes.Equal(s.StateDigest, digest):
			return fmt.Errorf("%s has digest %x at %d, %s has %x at %d", m.Id, s.StateDigest, s.StateDigestIndex,
				st.Members[0].Id, digest, index)
		}
	}
	return nil
}

// versions describes who runs what, for messages: "n0=old/leader n1=new …".
func versions(st *pb.ClusterStatusResponse) string {
	var parts []string
	for _, m := range st.Members {
		v := "?"
		if s := m.Status; s != nil {
			v = map[bool]string{true: "old", false: "new"}[s.Version == upgradeOldVersion]
		}
		if m.Id == st.LeaderId {
			v += "/leader"
		}
		parts = append(parts, m.Id+"="+v)
	}
	return strings.Join(parts, " ")
}

// checkRuns fails unless node id runs the old (or the new) binary, as its
// status says: the release's version and the log format it reports.
func (u *upgradeCluster) checkRuns(st *pb.ClusterStatusResponse, id string, old bool) {
	u.t.Helper()
	s := memberStatus(st, id)
	switch {
	case old && (s.Version != upgradeOldVersion || s.LogVersion != 0):
		u.t.Fatalf("%s: status reports version %q and log format %d, want the old binary (%q, no log format field): %s",
			id, s.Version, s.LogVersion, upgradeOldVersion, versions(st))
	case !old && (s.Version == upgradeOldVersion || s.LogVersion != consensus.LogVersion):
		u.t.Fatalf("%s: status reports version %q and log format %d, want the new binary with log format %d: %s",
			id, s.Version, s.LogVersion, consensus.LogVersion, versions(st))
	}
}

// transfer hands leadership to id and waits until every node knows it.
func (u *upgradeCluster) transfer(id string) {
	u.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for {
		resp, err := u.admin[id].TransferLeadership(ctx, &pb.TransferLeadershipRequest{Id: id})
		if err == nil && resp.Result.Err() == nil {
			break
		}
		if ctx.Err() != nil {
			u.t.Fatalf("transfer leadership to %s: %v %v", id, err, resp.GetResult())
		}
		time.Sleep(200 * time.Millisecond)
	}
	for {
		st, err := u.status()
		if err == nil && st.LeaderId == id {
			return
		}
		if ctx.Err() != nil {
			u.t.Fatalf("leadership did not move to %s: %v", id, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// upgrade stops node id (a follower: leadership moves away first) with
// SIGTERM and starts the new binary on the same data directory and flags.
func (u *upgradeCluster) upgrade(id, newBin string) {
	u.t.Helper()
	st, err := u.status()
	if err != nil {
		u.t.Fatal(err)
	}
	if st.LeaderId == id {
		for _, n := range u.nodes {
			if n.id != id {
				u.transfer(n.id)
				break
			}
		}
	}
	n := u.node(id)
	n.proc.stop()
	u.start(n, newBin, "new")
	n.proc.waitReady()
}

// upgradeClient pushes and pulls continuously through every node in turn,
// retrying a failed operation on the next node within a small budget.
type upgradeClient struct {
	hosts []string
	// running is held shared by each operation; pause takes it whole, so
	// the cluster can be compared while nothing is written.
	running sync.RWMutex
	stop    chan struct{}
	done    sync.WaitGroup
	// ctx ends when a failed test abandons the client mid-operation.
	ctx    context.Context
	cancel context.CancelFunc

	mu       sync.Mutex
	pushed   []upgradeImage
	failures []string
	pulls    int
	retried  atomic.Int64
}

type upgradeImage struct {
	tag string
	img v1.Image
}

func (c *upgradeClient) ref(host, tag string) (name.Reference, error) {
	return name.ParseReference(host+"/upgrade/app:"+tag, name.Insecure)
}

// try runs op against one node after another until it succeeds or the
// budget is spent, which is recorded as a failure.
func (c *upgradeClient) try(what string, first int, op func(ctx context.Context, host string) error) bool {
	var errs []string
	for attempt := range upgradeAttempts {
		if attempt > 0 {
			time.Sleep(100 * time.Millisecond << (attempt - 1))
		}
		host := c.hosts[(first+attempt)%len(c.hosts)]
		ctx, cancel := context.WithTimeout(c.ctx, 30*time.Second)
		err := op(ctx, host)
		cancel()
		if c.ctx.Err() != nil {
			return false // abandoned
		}
		if err == nil {
			if attempt > 0 {
				c.retried.Add(1)
			}
			return true
		}
		errs = append(errs, host+": "+err.Error())
	}
	c.mu.Lock()
	c.failures = append(c.failures, fmt.Sprintf("%s failed %d times: %s", what, upgradeAttempts, strings.Join(errs, "; ")))
	c.mu.Unlock()
	return false
}

func (c *upgradeClient) start() {
	c.stop = make(chan struct{})
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.done.Add(2)
	go func() { // the writer
		defer c.done.Done()
		for i := 0; ; i++ {
			select {
			case <-c.stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			img, err := random.Image(512, 2)
			if err != nil {
				panic(err)
			}
			tag := fmt.Sprintf("v%d", i)
			c.running.RLock()
			ok := c.try("push upgrade/app:"+tag, i, func(ctx context.Context, host string) error {
				ref, err := c.ref(host, tag)
				if err != nil {
					return err
				}
				return remote.Write(ref, img, remote.WithContext(ctx))
			})
			c.running.RUnlock()
			if ok {
				c.mu.Lock()
				c.pushed = append(c.pushed, upgradeImage{tag, img})
				c.mu.Unlock()
			}
		}
	}()
	go func() { // the reader: any image pushed so far, through any node
		defer c.done.Done()
		for i := 0; ; i++ {
			select {
			case <-c.stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			c.mu.Lock()
			if len(c.pushed) == 0 {
				c.mu.Unlock()
				continue
			}
			want := c.pushed[rand.IntN(len(c.pushed))]
			c.mu.Unlock()
			c.running.RLock()
			ok := c.try("pull upgrade/app:"+want.tag, i, func(ctx context.Context, host string) error {
				ref, err := c.ref(host, want.tag)
				if err != nil {
					return err
				}
				return upgradeSameImage(ctx, ref, want.img)
			})
			c.running.RUnlock()
			if ok {
				c.mu.Lock()
				c.pulls++
				c.mu.Unlock()
			}
		}
	}()
}

func (c *upgradeClient) pause()  { c.running.Lock() }
func (c *upgradeClient) resume() { c.running.Unlock() }

// finish lets the operations under way end and stops the client.
func (c *upgradeClient) finish() {
	close(c.stop)
	c.done.Wait()
	c.cancel()
}

// abandon stops the client at once, when the test failed.
func (c *upgradeClient) abandon() {
	c.cancel()
	select {
	case <-c.stop:
	default:
		c.finish()
	}
}

// progress waits until the client has pushed n more images than now.
func (c *upgradeClient) progress(t *testing.T, n int) {
	t.Helper()
	c.mu.Lock()
	want := len(c.pushed) + n
	c.mu.Unlock()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		c.mu.Lock()
		got, failed := len(c.pushed), len(c.failures)
		c.mu.Unlock()
		if got >= want {
			return
		}
		if time.Now().After(deadline) || failed > 0 {
			t.Fatalf("the client pushed %d of %d images; failures: %v", got, want, c.failures)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// upgradeSameImage pulls ref and compares its manifest, config and layer
// bytes with want.
func upgradeSameImage(ctx context.Context, ref name.Reference, want v1.Image) error {
	got, err := remote.Image(ref, remote.WithContext(ctx))
	if err != nil {
		return err
	}
	for _, part := range []struct {
		what      string
		want, got func() ([]byte, error)
	}{{"manifest", want.RawManifest, got.RawManifest}, {"config", want.RawConfigFile, got.RawConfigFile}} {
		w, err := part.want()
		if err != nil {
			return err
		}
		g, err := part.got()
		if err != nil {
			return fmt.Errorf("%s: %w", part.what, err)
		}
		if !bytes.Equal(g, w) {
			return fmt.Errorf("%s differs from what was pushed", part.what)
		}
	}
	wl, _ := want.Layers()
	gl, err := got.Layers()
	if err != nil || len(gl) != len(wl) {
		return fmt.Errorf("%d layers (%v), want %d", len(gl), err, len(wl))
	}
	for i := range wl {
		wd, _ := wl[i].Digest()
		rc, err := gl[i].Compressed()
		if err != nil {
			return fmt.Errorf("layer %d: %w", i, err)
		}
		h := sha256.New()
		_, err = io.Copy(h, rc)
		rc.Close()
		if err != nil {
			return fmt.Errorf("layer %d: %w", i, err)
		}
		if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != wd.String() {
			return fmt.Errorf("layer %d has %s, want %s", i, got, wd)
		}
	}
	return nil
}

// A cluster of the previous supported release (deploy/upgrade-from), with
// mutual TLS and an encrypted gossip keyring, is upgraded node by node to
// this build while a client pushes and pulls through every node. Mixed,
// the cluster works both ways: a new follower behind an old leader, then
// old followers behind a new leader. No client operation fails beyond its
// retries, every image pushed pulls back byte for byte from every node, and
// the state digests of all three nodes are equal at each step.
func TestRollingUpgrade(t *testing.T) {
	e2eNeedBinary(t)
	began := time.Now()
	commit, err := upgradeFrom(upgradeFromFile)
	if err != nil {
		t.Fatal(err)
	}
	oldBin := upgradeBuildOld(t, commit)
	built := time.Now()
	u := startUpgradeCluster(t, oldBin)

	hosts := make([]string, len(u.nodes))
	for i, n := range u.nodes {
		hosts[i] = n.http
	}
	c := &upgradeClient{hosts: hosts}
	c.start()
	defer c.abandon()
	c.progress(t, 5)

	// step checks, with the client paused, that the cluster converged and
	// that each node runs what it should.
	step := func(what string, old map[string]bool) *pb.ClusterStatusResponse {
		t.Helper()
		c.progress(t, 5)
		c.pause()
		defer c.resume()
		st := u.converged(what)
		for _, n := range u.nodes {
			u.checkRuns(st, n.id, old[n.id])
		}
		t.Logf("%s: %s, all at index %d with equal state digests", what, versions(st), st.LeaderCommitIndex)
		return st
	}
	st := step("the old cluster", map[string]bool{"n0": true, "n1": true, "n2": true})
	leader := st.LeaderId
	var followers []string
	for _, n := range u.nodes {
		if n.id != leader {
			followers = append(followers, n.id)
		}
	}
	first, second := followers[0], followers[1]

	// A new follower behind an old leader.
	u.upgrade(first, e2eBinary)
	if st, err := u.status(); err != nil || st.LeaderId == first {
		u.transfer(leader) // an election while it restarted: give it back
	}
	old := map[string]bool{leader: true, second: true}
	st = step("a new follower behind an old leader", old)
	if st.LeaderId == first {
		t.Fatalf("the new node leads: %s", versions(st))
	}
	out, err := exec.Command(e2eBinary, slices.Concat([]string{"cluster", "status", "--addr", u.node(first).grpc}, u.adminFlags)...).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "LOG FORMAT") || !strings.Contains(string(out), upgradeOldVersion) {
		t.Fatalf("meridian cluster status of the mixed cluster: %v\n%s", err, out)
	}
	t.Logf("meridian cluster status, mixed:\n%s", out)

	// Old followers behind a new leader.
	u.transfer(first)
	st = step("old followers behind a new leader", old)
	if st.LeaderId != first {
		t.Fatalf("leadership left the new node: %s", versions(st))
	}
	// A change of the new log format (a webhook) is refused by the new
	// leader while old nodes would crash on it.
	webhookAdd := func() (string, error) {
		out, err := exec.Command(e2eBinary, slices.Concat([]string{"webhook", "add", "ci", "--url", "https://ci.example/hook",
			"--addr", u.node(first).grpc}, u.adminFlags)...).CombinedOutput()
		return string(out), err
	}
	if out, err := webhookAdd(); err == nil || !strings.Contains(out, "finish the rolling upgrade") {
		t.Fatalf("a webhook added to a mixed cluster: %v\n%s\nwant the log-format refusal", err, out)
	}

	u.upgrade(second, e2eBinary)
	delete(old, second)
	step("the second follower upgraded", old)

	u.upgrade(leader, e2eBinary)
	delete(old, leader)
	step("every node upgraded", old)
	// Now the new format is everyone's: the webhook goes in, and every node
	// applies it.
	deadline := time.Now().Add(time.Minute)
	for {
		out, err := webhookAdd()
		if err == nil {
			break
		}
		if !strings.Contains(out, "finish the rolling upgrade") || time.Now().After(deadline) {
			t.Fatalf("a webhook added once every node is upgraded: %v\n%s", err, out)
		}
		time.Sleep(500 * time.Millisecond) // gossip still carries a restarted node's format
	}

	c.progress(t, 5)
	c.finish()
	if len(c.failures) > 0 {
		t.Fatalf("%d client operations failed beyond their retries:\n%s", len(c.failures), strings.Join(c.failures, "\n"))
	}
	t.Logf("client: %d images pushed, %d pulls checked, %d operations needed a retry", len(c.pushed), c.pulls, c.retried.Load())

	// Every image from every node, byte for byte, and one last comparison
	// of the replicas.
	for _, n := range u.nodes {
		for _, p := range c.pushed {
			ref, err := c.ref(n.http, p.tag)
			if err != nil {
				t.Fatal(err)
			}
			e2eCheckImage(t, ref, p.img)
		}
	}
	u.converged("after the upgrade")

	// The log now holds format-2 entries (the webhook): a node of the old
	// release that tries to join is kept out of the Raft configuration,
	// where it would stop at the first of them.
	if out, err := exec.Command(e2eBinary, "ca", "issue", "--dir", u.pki, "--role", "node", "--id", "n3").CombinedOutput(); err != nil {
		t.Fatalf("issue n3: %v\n%s", err, out)
	}
	p := upgradePorts(t, 4)
	n3 := &upgradeNode{id: "n3", dir: filepath.Join(u.dir, "n3"), http: p[0], grpc: p[1]}
	n3.args = slices.Clone(u.nodes[1].args) // a joiner's flags
	for flag, v := range map[string]string{"--node-id": "n3", "--data-dir": n3.dir, "--http-addr": p[0], "--grpc-addr": p[1],
		"--raft-addr": p[2], "--gossip-addr": p[3], "--tls-cert": filepath.Join(u.pki, "n3.crt"), "--tls-key": filepath.Join(u.pki, "n3.key")} {
		i := slices.Index(n3.args, flag)
		if i < 0 {
			t.Fatalf("no %s in %v", flag, n3.args)
		}
		n3.args[i+1] = v
	}
	u.start(n3, oldBin, "old")
	seen := time.Time{}
	for deadline := time.Now().Add(time.Minute); ; {
		st, err := u.status()
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range st.Members {
			if m.Id != "n3" {
				continue
			}
			if m.Suffrage != "none" {
				t.Fatalf("an old-release node joined a log of format 2: %s is a %s", m.Id, m.Suffrage)
			}
			if m.Health == "alive" && seen.IsZero() {
				seen = time.Now()
			}
		}
		if !seen.IsZero() && time.Since(seen) > 10*time.Second {
			break // alive in gossip for 10 s, never added
		}
		if time.Now().After(deadline) {
			t.Fatalf("n3 never showed up in gossip:\n%s", n3.proc.logTail())
		}
		time.Sleep(500 * time.Millisecond)
	}
	n3.proc.kill()
	t.Logf("rolling upgrade from %s: %v (old build %v, cluster %v)", commit[:12], time.Since(began).Round(time.Second),
		built.Sub(began).Round(time.Second), time.Since(built).Round(time.Second))
}
