package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/meridian-registry/meridian/consensus"
	"github.com/meridian-registry/meridian/node/webhook"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// whReceiver is a webhook receiver as a CI system would run one: it checks
// each delivery's signature, refuses forged ones, and deduplicates by
// event id.
type whReceiver struct {
	t      *testing.T
	srv    *httptest.Server
	secret atomic.Value // string

	mu         sync.Mutex
	seen       map[string]webhook.CloudEvent
	order      []string // event ids in the order they first arrived
	deliveries int
	forged     int // deliveries whose signature did not verify
	// delay slows every answer, so deliveries are in flight when a node dies.
	delay time.Duration
}

func newWHReceiver(t *testing.T, secret string) *whReceiver {
	r := &whReceiver{t: t, seen: map[string]webhook.CloudEvent{}}
	r.secret.Store(secret)
	r.srv = httptest.NewServer(http.HandlerFunc(r.serve))
	t.Cleanup(r.srv.Close)
	return r
}

func (r *whReceiver) serve(w http.ResponseWriter, req *http.Request) {
	body, err := io.ReadAll(req.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	time.Sleep(r.delay)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.deliveries++
	if !webhook.Verify(r.secret.Load().(string), body, req.Header.Get(webhook.SignatureHeader)) {
		r.forged++
		http.Error(w, "signature does not verify", http.StatusUnauthorized)
		return
	}
	var ce webhook.CloudEvent
	if err := json.Unmarshal(body, &ce); err != nil || ce.SpecVersion != "1.0" || ce.ID == "" || req.Header.Get("Content-Type") != webhook.ContentType {
		http.Error(w, fmt.Sprintf("not a CloudEvent: %v", err), http.StatusBadRequest)
		return
	}
	if _, dup := r.seen[ce.ID]; !dup {
		r.seen[ce.ID] = ce
		r.order = append(r.order, ce.ID)
	}
	w.WriteHeader(http.StatusNoContent)
}

// pushed returns, per repository, the digests of manifest.pushed events.
func (r *whReceiver) pushed() map[string][]string { return r.digests("manifest.pushed") }

// digests returns, per repository, the digests of the events of kind.
func (r *whReceiver) digests(kind string) map[string][]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[string][]string{}
	for _, ce := range r.seen {
		if ce.Type == webhook.TypePrefix+kind {
			out[ce.Data.Repository] = append(out[ce.Data.Repository], ce.Data.Digest)
		}
	}
	return out
}

// whCluster is three plain nodes on loopback whose processes the test can
// kill -9 and restart on the same addresses.
type whCluster struct {
	t     *testing.T
	dir   string
	args  [][]string
	nodes []*e2eProc
}

func startWHCluster(t *testing.T, extra ...string) *whCluster {
	c := &whCluster{t: t, dir: t.TempDir()}
	common := slices.Concat([]string{"--cluster-id", "wh", "--gossip-profile", "local",
		"--region-store", "east=file://" + filepath.Join(c.dir, "blobs", "east")}, extra)
	for i := range 3 {
		id := fmt.Sprintf("n%d", i)
		args := slices.Concat([]string{"serve", "--node-id", id, "--region", "east", "--data-dir", filepath.Join(c.dir, id)}, common)
		if i > 0 {
			args = append(args, "--join", c.nodes[0].ready.GossipAddr)
		}
		p := gwe2eStart(t, id, c.dir, append(slices.Clone(args), e2eLoopback...)...)
		p.waitWritten()
		c.args = append(c.args, args)
		c.nodes = append(c.nodes, p)
	}
	for _, p := range c.nodes {
		p.waitReady()
	}
	return c
}

// restart starts node i again on its data directory and addresses.
func (c *whCluster) restart(i int) {
	old := c.nodes[i].ready
	join := c.nodes[(i+1)%3].ready.GossipAddr
	args := slices.Concat(c.args[i],
		[]string{"--http-addr", old.HTTPAddr, "--grpc-addr", old.GRPCAddr, "--raft-addr", old.RaftAddr, "--gossip-addr", old.GossipAddr})
	if i == 0 {
		args = append(args, "--join", join)
	}
	p := gwe2eStart(c.t, fmt.Sprintf("n%d", i), c.dir, args...)
	p.waitWritten()
	p.waitReady()
	c.nodes[i] = p
}

// status asks node i for the cluster status.
func (c *whCluster) status(i int) (*pb.ClusterStatusResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, e2eBinary, "cluster", "status", "--json", "--timeout", "5s", "--addr", c.nodes[i].ready.GRPCAddr)
	cmd.Env = e2eEnv()
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%v: %s", err, out)
	}
	st := &pb.ClusterStatusResponse{}
	return st, (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal([]byte(out), st)
}

// leader waits until the live nodes agree on a leader and returns its index.
func (c *whCluster) leader(live ...int) int {
	c.t.Helper()
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		st, err := c.status(live[0])
		if err == nil && st.LeaderId != "" {
			for _, i := range live {
				if fmt.Sprintf("n%d", i) == st.LeaderId {
					return i
				}
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	c.t.Fatalf("no leader among nodes %v", live)
	return -1
}

// Every event of a workload reaches the receiver, signed, exactly once
// after deduplication by id and in log order, through a kill -9 of the
// leader that was delivering and the leader change that follows; events
// of repositories the webhook does not cover stay away.
func TestWebhookDeliveryThroughLeaderKill(t *testing.T) {
	e2eNeedBinary(t)
	c := startWHCluster(t)
	secret := "a-receiver-secret-of-some-length"
	recv := newWHReceiver(t, secret)
	recv.delay = 15 * time.Millisecond
	secretFile := filepath.Join(c.dir, "hook.secret")
	if err := os.WriteFile(secretFile, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := "--addr=" + c.nodes[1].ready.GRPCAddr
	cli, mustCLI := adminCLI(t, addr)
	if out, err := cli("webhook", "add", "ci", "--url", recv.srv.URL+"/hook", "--secret-file", secretFile); err == nil || !strings.Contains(out, "--insecure-http") {
		t.Fatalf("a plain-HTTP webhook without --insecure-http: %v\n%s", err, out)
	}
	mustCLI("webhook", "add", "ci", "--url", recv.srv.URL+"/hook", "--secret-file", secretFile, "--insecure-http",
		"--repositories", "wh", "--events", "manifest,tag")
	if out := mustCLI("webhook", "list"); strings.Contains(out, secret) || !strings.Contains(out, "ci") {
		t.Fatalf("webhook list shows the secret or not the webhook:\n%s", out)
	}

	// Pushers write through every node while the leader is killed.
	var (
		mu    sync.Mutex
		acked = map[string]string{} // repo → digest of each acknowledged push
		stop  atomic.Bool
		wg    sync.WaitGroup
		seq   atomic.Int64
	)
	push := func(p *e2eProc, repo string) {
		img, err := random.Image(256, 1)
		if err != nil {
			t.Error(err)
			return
		}
		if err := remote.Write(p.ref(repo+":v1"), img); err != nil {
			return // the node died under it, or the leader moved: not acknowledged
		}
		d, _ := img.Digest()
		mu.Lock()
		acked[repo] = d.String()
		mu.Unlock()
	}
	for w := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				n := seq.Add(1)
				i := int(n) % 3
				mu.Lock()
				p := c.nodes[(i+w)%3]
				mu.Unlock()
				push(p, fmt.Sprintf("wh/app%d", n))
				if n%5 == 0 {
					push(p, fmt.Sprintf("other/app%d", n)) // not covered
				}
			}
		}()
	}
	time.Sleep(3 * time.Second)
	lead := c.leader(0, 1, 2)
	t.Logf("kill -9 of the leader n%d", lead)
	mu.Lock()
	c.nodes[lead].kill()
	mu.Unlock()
	live := slices.DeleteFunc([]int{0, 1, 2}, func(i int) bool { return i == lead })
	next := c.leader(live...)
	t.Logf("new leader n%d", next)
	time.Sleep(3 * time.Second)
	mu.Lock()
	c.restart(lead)
	mu.Unlock()
	time.Sleep(2 * time.Second)
	stop.Store(true)
	wg.Wait()

	mu.Lock()
	want := maps.Clone(acked)
	mu.Unlock()
	maps.DeleteFunc(want, func(repo, _ string) bool { return !strings.HasPrefix(repo, "wh/") })
	if len(want) < 10 {
		t.Fatalf("only %d pushes acknowledged: the workload did not run", len(want))
	}
	c.nodes[next].poll("every acknowledged push delivered", 2*time.Minute, func() error {
		got, tags := recv.pushed(), recv.digests("tag.updated")
		for repo, d := range want {
			if !slices.Contains(got[repo], d) || !slices.Contains(tags[repo], d) {
				return fmt.Errorf("%d of %d pushes delivered; missing %s@%s or its tag", len(got), len(want), repo, d)
			}
		}
		return nil
	})

	recv.mu.Lock()
	defer recv.mu.Unlock()
	var prevIdx uint64
	var prevSeq uint32
	for _, id := range recv.order {
		ce := recv.seen[id]
		if !strings.HasPrefix(ce.Data.Repository, "wh/") {
			t.Errorf("event %s of %q reached a webhook covering wh only", id, ce.Data.Repository)
		}
		if k := strings.TrimPrefix(ce.Type, webhook.TypePrefix); !strings.HasPrefix(k, "manifest.") && !strings.HasPrefix(k, "tag.") {
			t.Errorf("event %s of kind %s passed the manifest,tag filter", id, k)
		}
		idx, sq, err := consensus.ParseEventID(id)
		if err != nil {
			t.Fatal(err)
		}
		if idx < prevIdx || idx == prevIdx && sq <= prevSeq {
			t.Errorf("event %s arrived first after %s: out of log order", id, consensus.EventID(prevIdx, prevSeq))
		}
		prevIdx, prevSeq = idx, sq
		if ce.Source != webhook.Source("wh") || ce.Data.Index != idx {
			t.Errorf("event %s: source %q, data.index %d", id, ce.Source, ce.Data.Index)
		}
	}
	// Each repository is pushed once (a client may retry the manifest
	// PUT: that is another pushed event of the same digest), so its tag
	// moved once.
	digests, tagged := map[string]map[string]bool{}, map[string]int{}
	for _, ce := range recv.seen {
		switch strings.TrimPrefix(ce.Type, webhook.TypePrefix) {
		case "manifest.pushed":
			if digests[ce.Data.Repository] == nil {
				digests[ce.Data.Repository] = map[string]bool{}
			}
			digests[ce.Data.Repository][ce.Data.Digest] = true
		case "tag.updated":
			tagged[ce.Data.Repository]++
		}
	}
	for repo, ds := range digests {
		if len(ds) != 1 || tagged[repo] != 1 {
			t.Errorf("%s: pushed events of %d digests and %d tag events, want 1 and 1", repo, len(ds), tagged[repo])
		}
	}
	if recv.forged != 0 {
		t.Errorf("%d deliveries with a signature that did not verify", recv.forged)
	}
	t.Logf("%d acknowledged pushes; %d distinct events from %d deliveries (%d sent again after the leader change)",
		len(want), len(recv.seen), recv.deliveries, recv.deliveries-len(recv.seen))
}

// A receiver holding the wrong secret detects every delivery as forged;
// the events become dead letters after their retries, `webhook deliveries`
// shows them, and once the receiver has the right secret a replay
// delivers them and empties the list. `webhook test` reports the
// receiver's answer.
func TestWebhookWrongSecretAndDeadLetters(t *testing.T) {
	e2eNeedBinary(t)
	c := startWHCluster(t, "--webhook-max-attempts", "2", "--webhook-backoff", "50ms")
	recv := newWHReceiver(t, "the-receivers-idea-of-the-secret")
	secretFile := filepath.Join(c.dir, "hook.secret")
	if err := os.WriteFile(secretFile, []byte("the-clusters-actual-secret-value"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, mustCLI := adminCLI(t, "--addr="+c.nodes[0].ready.GRPCAddr)
	cli, _ := adminCLI(t, "--addr="+c.nodes[0].ready.GRPCAddr)
	for _, bad := range [][]string{
		{"webhook", "add", "x", "--url", "ftp://example/hook", "--insecure-http", "--secret-file", secretFile},
		{"webhook", "add", "x", "--url", "https://example/hook", "--events", "bogus", "--secret-file", secretFile},
		{"webhook", "add", "x y", "--url", "https://example/hook", "--secret-file", secretFile},
		{"webhook", "deliveries", "nope"},
	} {
		if out, err := cli(bad...); err == nil {
			t.Errorf("meridian %s succeeded:\n%s", strings.Join(bad, " "), out)
		}
	}
	mustCLI("webhook", "add", "ci", "--url", recv.srv.URL, "--secret-file", secretFile, "--insecure-http")
	if out, err := cli("webhook", "test", "ci"); err == nil || !strings.Contains(out, "401") {
		t.Fatalf("webhook test against a receiver with the wrong secret: %v\n%s", err, out)
	}

	img, _ := random.Image(256, 1)
	if err := remote.Write(c.nodes[0].ref("dl/app:v1"), img); err != nil {
		t.Fatal(err)
	}
	var out string
	c.nodes[0].poll("dead letters", time.Minute, func() error {
		out = mustCLI("webhook", "deliveries", "ci")
		if !strings.Contains(out, "2 dead letters") {
			return fmt.Errorf("no dead letters yet:\n%s", out)
		}
		return nil
	})
	if !strings.Contains(out, "manifest.pushed") || !strings.Contains(out, "tag.updated") || !strings.Contains(out, "401") {
		t.Fatalf("deliveries do not show the dead letters and the receiver's refusal:\n%s", out)
	}
	recv.mu.Lock()
	forged := recv.forged
	recv.mu.Unlock()
	// The test event, the first event's 2 attempts, and 1 for the second:
	// once an event ran out of attempts the receiver counts as down, and
	// later events get one attempt each until one goes through.
	if forged != 4 {
		t.Fatalf("the receiver detected %d forged deliveries, want 4", forged)
	}
	if len(recv.pushed()) != 0 {
		t.Fatal("a delivery signed with another secret was accepted")
	}

	recv.secret.Store("the-clusters-actual-secret-value")
	if out := mustCLI("webhook", "test", "ci"); !strings.Contains(out, "HTTP 204") {
		t.Fatalf("webhook test with the right secret:\n%s", out)
	}
	mustCLI("webhook", "deliveries", "ci", "--replay")
	c.nodes[0].poll("replayed", time.Minute, func() error {
		out = mustCLI("webhook", "deliveries", "ci")
		if !strings.Contains(out, " 0 dead letters") {
			return fmt.Errorf("dead letters left:\n%s", out)
		}
		return nil
	})
	d, _ := img.Digest()
	if got := recv.pushed()["dl/app"]; len(got) != 1 || got[0] != d.String() {
		t.Fatalf("after the replay the receiver has pushes %v, want %s", got, d)
	}

	// A server that is down (gossip has declared it dead) does not stall
	// delivery: progress entries are not held back by the log-format gate.
	lead := c.leader(0, 1, 2)
	down := (lead + 1) % 3
	c.nodes[down].kill()
	c.nodes[lead].poll("the stopped node declared dead", time.Minute, func() error {
		st, err := c.status(lead)
		if err != nil {
			return err
		}
		for _, m := range st.Members {
			if m.Id == fmt.Sprintf("n%d", down) && m.Health != "alive" {
				return nil
			}
		}
		return fmt.Errorf("n%d still alive in gossip", down)
	})
	img2, _ := random.Image(256, 1)
	if err := remote.Write(c.nodes[lead].ref("dl/down:v1"), img2); err != nil {
		t.Fatal(err)
	}
	c.nodes[lead].poll("delivery with a server down", time.Minute, func() error {
		if len(recv.pushed()["dl/down"]) == 0 {
			return errors.New("not delivered yet")
		}
		return nil
	})
	_, mustLeadCLI := adminCLI(t, "--addr="+c.nodes[lead].ready.GRPCAddr)
	if out := mustLeadCLI("webhook", "deliveries", "ci"); !strings.Contains(out, " 0 events after it") {
		t.Fatalf("progress not recorded with a server down:\n%s", out)
	}

	mustLeadCLI("webhook", "delete", "ci")
	if out := mustLeadCLI("webhook", "list"); strings.Contains(out, "ci") {
		t.Fatalf("deleted webhook still listed:\n%s", out)
	}
}
