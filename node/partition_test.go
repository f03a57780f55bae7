package node_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meridian-registry/meridian/node"
	"github.com/meridian-registry/meridian/node/clustertest"
)

// TestClusterMinorityPartition cuts two of five voters off from the other
// three. The majority keeps accepting pushes; the minority refuses writes
// with 503 and Retry-After within the apply timeout, and never answers a
// read with a false 404 (it serves what it holds or says 503); after
// healing, every tag pushed during the cut reads back through the former
// minority.
func TestClusterMinorityPartition(t *testing.T) {
	for _, tc := range []struct {
		name string
		// minority picks the two nodes to cut, given the leader.
		minority func(leader int) []int
	}{
		{"two followers", func(l int) []int { return []int{(l + 1) % 5, (l + 2) % 5} }},
		{"the leader and a follower", func(l int) []int { return []int{l, (l + 1) % 5} }},
	} {
		t.Run(tc.name, func(t *testing.T) { testMinorityPartition(t, tc.minority) })
	}
}

func testMinorityPartition(t *testing.T, pick func(leader int) []int) {
	const applyTimeout = 3 * time.Second
	// slack covers scheduling and the HTTP round trip on a loaded machine.
	const slack = 2 * time.Second
	c := clustertest.New(t, 5, clustertest.WithVoters(5), clustertest.WithConfig(func(_ int, cfg *node.Config) {
		cfg.ApplyTimeout = applyTimeout
	}))
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	if err := c.WaitVoters(ctx, 5); err != nil {
		t.Fatal(err)
	}
	leader, err := c.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	minority := pick(leader)
	var majority []int
	for i := range 5 {
		if !slices.Contains(minority, i) {
			majority = append(majority, i)
		}
	}
	reg := rawRegistry{c: c, client: c.Client()}
	const repo = "partition/app"
	img, err := reg.pushSmallImage(ctx, leader, repo)
	if err != nil {
		t.Fatal(err)
	}

	// Tags every node holds before the cut.
	before := map[string]string{}
	for k := range 5 {
		tag := fmt.Sprintf("before-%d", k)
		r, err := reg.putTag(ctx, k, repo, tag, img.manifest("before", k))
		if err != nil || r.status != http.StatusCreated {
			t.Fatalf("push %s through node %d: %v %v", tag, k, r, err)
		}
		before[tag] = r.digest
	}
	if err := c.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}

	c.Cut(minority...)
	t.Logf("leader was node %d; cut nodes %v off from %v", leader, minority, majority)

	// (a) The majority accepts pushes. When the old leader is cut, the
	// first ones may wait for the election; after one succeeds, every push
	// must.
	during := map[string]string{}
	k := 0
	pushMajority := func() error {
		via := majority[k%len(majority)]
		tag := fmt.Sprintf("during-%d", k)
		r, err := reg.putTag(ctx, via, repo, tag, img.manifest("during", k))
		if err != nil || r.status != http.StatusCreated {
			return fmt.Errorf("push %s through majority node %d: %v %v", tag, via, r, err)
		}
		during[tag] = r.digest
		k++
		return nil
	}
	start := time.Now()
	var lastErr error
	if !pollUntil(ctx, func() bool { lastErr = pushMajority(); return lastErr == nil }) {
		t.Fatalf("the majority accepted no push within the deadline: %v", lastErr)
	}
	newLeader, err := c.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("first push through the majority %v after the cut; leader now node %d", time.Since(start).Round(time.Millisecond), newLeader)
	if slices.Contains(minority, newLeader) {
		t.Fatalf("node %d leads, but it is in the minority %v", newLeader, minority)
	}
	for range 5 {
		if err := pushMajority(); err != nil {
			t.Fatal(err)
		}
	}

	if err := waitLeaderless(ctx, c, minority); err != nil {
		t.Fatal(err)
	}

	// (b) and (c): every request through the minority at once, while the
	// majority keeps taking pushes; each answer is checked on its own.
	type probe struct {
		what  string
		run   func() (registryReply, error)
		check func(registryReply, time.Duration) error
	}
	refused := func(r registryReply, took time.Duration) error {
		if r.status != http.StatusServiceUnavailable {
			return fmt.Errorf("status %d, want 503", r.status)
		}
		if took > applyTimeout+slack {
			return fmt.Errorf("503 after %v, want it within the %v apply timeout", took.Round(time.Millisecond), applyTimeout)
		}
		return r.unavailable()
	}
	var probes []probe
	for _, m := range minority {
		tag := fmt.Sprintf("minority-%d", m)
		body := img.manifest("minority", m)
		probes = append(probes, probe{
			what:  fmt.Sprintf("PUT %s through minority node %d", tag, m),
			run:   func() (registryReply, error) { return reg.putTag(ctx, m, repo, tag, body) },
			check: refused,
		})
		for tag, want := range before {
			for _, ref := range []string{tag, want} {
				probes = append(probes, probe{
					what: fmt.Sprintf("GET %s (pushed before the cut) through minority node %d", ref, m),
					run:  func() (registryReply, error) { return reg.getManifest(ctx, m, http.MethodGet, repo, ref) },
					check: func(r registryReply, took time.Duration) error {
						if r.status == http.StatusOK {
							return r.served(want)
						}
						return refused(r, took)
					},
				})
			}
		}
		for tag, want := range during {
			for _, ref := range []string{tag, want} {
				for _, method := range []string{http.MethodGet, http.MethodHead} {
					probes = append(probes, probe{
						what: fmt.Sprintf("%s %s (pushed during the cut) through minority node %d", method, ref, m),
						run:  func() (registryReply, error) { return reg.getManifest(ctx, m, method, repo, ref) },
						// The minority cannot have it, nor confirm a miss.
						check: refused,
					})
				}
			}
		}
	}
	var wg sync.WaitGroup
	failures := make([]error, len(probes))
	statuses := make([]int, len(probes))
	took := make([]time.Duration, len(probes))
	for i, p := range probes {
		wg.Go(func() {
			start := time.Now()
			r, err := p.run()
			took[i] = time.Since(start)
			if err == nil {
				statuses[i] = r.status
				err = p.check(r, took[i])
			}
			if err != nil {
				failures[i] = fmt.Errorf("%s: %w (after %v)", p.what, err, took[i].Round(time.Millisecond))
			}
		})
	}
	// The majority is unaffected meanwhile.
	for range 5 {
		if err := pushMajority(); err != nil {
			t.Error(err)
			break
		}
	}
	wg.Wait()
	counts := map[int]int{}
	var slowest503 time.Duration
	for i, err := range failures {
		counts[statuses[i]]++
		if statuses[i] == http.StatusServiceUnavailable {
			slowest503 = max(slowest503, took[i])
		}
		if err != nil {
			t.Error(err)
		}
	}
	t.Logf("%d requests through the minority at once: statuses %v, the slowest 503 after %v; %d pushes through the majority during the cut",
		len(probes), counts, slowest503.Round(time.Millisecond), len(during))

	// (d) After healing, the former minority serves every tag pushed
	// during the cut, and takes writes again.
	c.Heal(minority...)
	if err := c.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}
	for _, m := range minority {
		for tag, want := range during {
			r, err := reg.getManifest(ctx, m, http.MethodGet, repo, tag)
			if err == nil {
				err = r.served(want)
			}
			if err != nil {
				t.Errorf("GET %s through healed node %d: %v", tag, m, err)
			}
		}
		tag := fmt.Sprintf("healed-%d", m)
		var r registryReply
		if !pollUntil(ctx, func() bool {
			r, err = reg.putTag(ctx, m, repo, tag, img.manifest("healed", m))
			return err == nil && r.status == http.StatusCreated
		}) {
			t.Errorf("PUT %s through healed node %d: %v %v", tag, m, r, err)
		}
	}
}

// waitLeaderless waits until none of nodes knows a leader: the proof that
// a cut isolates them from the majority's leader (a connection that
// escaped the cut would keep the leader's heartbeats coming).
func waitLeaderless(ctx context.Context, c *clustertest.Cluster, nodes []int) error {
	var last string
	if pollUntil(ctx, func() bool {
		for _, i := range nodes {
			if id, _ := c.Node(i).Consensus().Leader(); id != "" {
				last = fmt.Sprintf("node %d still follows leader %s", i, id)
				return false
			}
		}
		return true
	}) {
		return nil
	}
	return fmt.Errorf("the cut nodes %v never lost their leader: %s (a connection crossed the cut?)", nodes, last)
}

// pollUntil calls cond every 20ms until it holds (true) or ctx ends (false).
func pollUntil(ctx context.Context, cond func() bool) bool {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			return false
		case <-tick.C:
		}
	}
	return true
}

// rawRegistry speaks the OCI Distribution API to a cluster's nodes over
// plain HTTP, so tests see every status and header the client would.
type rawRegistry struct {
	c      *clustertest.Cluster
	client *http.Client
}

// registryReply is what a test needs of a response.
type registryReply struct {
	status      int
	digest      string // Docker-Content-Digest
	retryAfter  string
	contentType string
	body        []byte
}

func (r registryReply) String() string {
	return fmt.Sprintf("status %d, digest %q, Retry-After %q, body %.300s", r.status, r.digest, r.retryAfter, r.body)
}

// served checks a 200 answer to a GET of the manifest with digest want.
func (r registryReply) served(want string) error {
	switch got := digestOf(r.body); {
	case r.status != http.StatusOK:
		return fmt.Errorf("status %d, want 200 (%v)", r.status, r)
	case r.digest != want:
		return fmt.Errorf("Docker-Content-Digest %q, want %s", r.digest, want)
	case got != want:
		return fmt.Errorf("body has digest %s, want %s", got, want)
	}
	return nil
}

// unavailable checks that a 503 says when to retry and, unless it answers
// a HEAD, carries an OCI error envelope.
func (r registryReply) unavailable() error {
	if r.retryAfter == "" {
		return fmt.Errorf("503 without Retry-After (%v)", r)
	}
	if r.body == nil {
		return nil
	}
	var env struct {
		Errors []struct {
			Code    string `json:"code"`
			Message string `json:"message"`
		} `json:"errors"`
	}
	if err := json.Unmarshal(r.body, &env); err != nil || len(env.Errors) == 0 || env.Errors[0].Code == "" {
		return fmt.Errorf("503 without an OCI error envelope (%v)", r)
	}
	if !strings.HasPrefix(r.contentType, "application/json") {
		return fmt.Errorf("503 envelope with Content-Type %q", r.contentType)
	}
	return nil
}

func (g rawRegistry) do(ctx context.Context, method, url string, body []byte, header map[string]string) (registryReply, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, rd)
	if err != nil {
		return registryReply{}, err
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := g.client.Do(req)
	if err != nil {
		return registryReply{}, err
	}
	defer resp.Body.Close()
	r := registryReply{
		status:      resp.StatusCode,
		digest:      resp.Header.Get("Docker-Content-Digest"),
		retryAfter:  resp.Header.Get("Retry-After"),
		contentType: resp.Header.Get("Content-Type"),
	}
	if method != http.MethodHead {
		if r.body, err = io.ReadAll(resp.Body); err != nil {
			return r, err
		}
		if r.body == nil {
			r.body = []byte{}
		}
	}
	return r, nil
}

// putTag PUTs an OCI image manifest by tag through node i.
func (g rawRegistry) putTag(ctx context.Context, i int, repo, tag string, manifest []byte) (registryReply, error) {
	return g.do(ctx, http.MethodPut, g.c.URL(i)+"/v2/"+repo+"/manifests/"+tag, manifest,
		map[string]string{"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
}

// getManifest GETs or HEADs a manifest by tag or digest through node i.
func (g rawRegistry) getManifest(ctx context.Context, i int, method, repo, ref string) (registryReply, error) {
	return g.do(ctx, method, g.c.URL(i)+"/v2/"+repo+"/manifests/"+ref, nil,
		map[string]string{"Accept": "application/vnd.oci.image.manifest.v1+json"})
}

// pushBlob uploads content in one request (POST with ?digest=) through
// node i and returns its descriptor.
func (g rawRegistry) pushBlob(ctx context.Context, i int, repo, mediaType string, content []byte) (blobDescriptor, error) {
	d := blobDescriptor{MediaType: mediaType, Digest: digestOf(content), Size: len(content)}
	r, err := g.do(ctx, http.MethodPost, g.c.URL(i)+"/v2/"+repo+"/blobs/uploads/?digest="+d.Digest, content,
		map[string]string{"Content-Type": "application/octet-stream"})
	if err == nil && r.status != http.StatusCreated {
		err = fmt.Errorf("push blob %s through node %d: %v", d.Digest, i, r)
	}
	return d, err
}

// pushSmallImage pushes a config and a layer into repo through node i, for
// manifests made with smallImage.manifest.
func (g rawRegistry) pushSmallImage(ctx context.Context, i int, repo string) (smallImage, error) {
	var img smallImage
	var err error
	if img.Config, err = g.pushBlob(ctx, i, repo, "application/vnd.oci.image.config.v1+json", []byte(`{"architecture":"amd64","os":"linux"}`)); err != nil {
		return img, err
	}
	img.Layer, err = g.pushBlob(ctx, i, repo, "application/vnd.oci.image.layer.v1.tar", []byte("one small layer"))
	return img, err
}

type blobDescriptor struct {
	MediaType string `json:"mediaType"`
	Digest    string `json:"digest"`
	Size      int    `json:"size"`
}

// smallImage is a config and a layer already pushed; manifests over them
// differ only by an annotation.
type smallImage struct {
	Config blobDescriptor
	Layer  blobDescriptor
}

// manifest is an image manifest over img, distinct for each (kind, k).
func (img smallImage) manifest(kind string, k int) []byte {
	b, _ := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"config":        img.Config,
		"layers":        []blobDescriptor{img.Layer},
		"annotations":   map[string]string{"test." + kind: fmt.Sprint(k)},
	})
	return b
}

// digestOf is the sha256 digest a registry gives body.
func digestOf(body []byte) string {
	sum := sha256.Sum256(body)
	return "sha256:" + hex.EncodeToString(sum[:])
}
