package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// `meridian bench --scale`: one repository filled with --tags tags,
// committed through a follower of a 3-node cluster of `meridian serve`
// processes, and what grows with the count: tag GET latency at 1k tags and
// at the full count, paging through the tags list, each node's memory, the
// Raft snapshot's size and the time to write it, and a follower's restart
// and catch-up from its snapshot.

// Scale targets (issue 14).
const (
	targetScaleTagGetP99Growth = 1.5     // tag GET p99 at the full count ≤ 1.5× its p99 at 1k tags
	targetScaleRSSBytes        = 1 << 30 // RSS of each node < 1 GiB
	scaleBaseTags              = 1000
	scaleRepo                  = "bench/scale"
	scaleWriters               = 32
	scaleReaders               = 4
	scaleReadDuration          = 5 * time.Second
	scalePageSize              = 1000
)

// scaleResult is what the scale run measured.
type scaleResult struct {
	Tags      int    `json:"tags"`
	Security  string `json:"security"`
	Follower  string `json:"follower"`
	Leader    string `json:"leader"`
	Committed int64  `json:"committed"`

	Commits       loadResult `json:"commits"`
	TagGetBase    loadResult `json:"tag_get_at_1k"`
	TagGetFull    loadResult `json:"tag_get_at_full_count"`
	ListPages     int        `json:"list_pages"`
	ListTags      int        `json:"list_tags"`
	ListSeconds   float64    `json:"list_seconds"`
	ListPageP50Ms float64    `json:"list_page_p50_ms"`
	ListPageP99Ms float64    `json:"list_page_p99_ms"`

	RSS     map[string]int64 `json:"rss_bytes"`      // VmRSS per node after the reads
	PeakRSS map[string]int64 `json:"peak_rss_bytes"` // VmHWM per node

	Snapshot *snapshotInfo `json:"snapshot,omitempty"` // the leader's newest

	RestartTagsWhileDown int     `json:"restart_tags_while_down"`
	RestartReadySeconds  float64 `json:"restart_ready_seconds"`
	CatchUpSeconds       float64 `json:"catch_up_seconds"`
	RestartSnapshotIndex uint64  `json:"restart_snapshot_index"` // of the follower's newest snapshot when it stopped
	CatchUpToIndex       uint64  `json:"catch_up_to_index"`
}

// snapshotInfo is a Raft snapshot on disk.
type snapshotInfo struct {
	Node  string `json:"node"`
	Index uint64 `json:"index"`
	Bytes int64  `json:"bytes"`
	// WriteSeconds runs from the snapshot's creation (the time in its
	// directory's name) to its meta.json, written when it was complete.
	WriteSeconds float64 `json:"write_seconds"`
}

// runScale runs the scale measurement and returns its rows.
func runScale(ctx context.Context, opts benchOptions) (*benchReport, error) {
	if opts.progress == nil {
		opts.progress = io.Discard
	}
	logf := func(format string, args ...any) { fmt.Fprintf(opts.progress, "bench: "+format+"\n", args...) }
	if err := os.MkdirAll(opts.dir, 0o755); err != nil {
		return nil, err
	}
	root, err := os.MkdirTemp(opts.dir, "meridian-bench-scale-")
	if err != nil {
		return nil, err
	}
	if root, err = filepath.Abs(root); err != nil {
		return nil, err
	}
	if opts.keep {
		defer logf("kept %s", root)
	} else {
		defer os.RemoveAll(root)
	}
	rep := &benchReport{Environment: currentEnvironment(root), Started: time.Now().UTC(), Scale: &scaleResult{Tags: opts.tags}}
	defer func() {
		rep.Environment.LoadAvgEnd = loadAvg()
		rep.buildRows()
	}()
	err = scaleRun(ctx, opts, root, rep.Scale, logf)
	return rep, err
}

func scaleRun(ctx context.Context, opts benchOptions, root string, res *scaleResult, logf func(string, ...any)) error {
	dir := filepath.Join(root, "cluster")
	spec := benchClusterSpec{id: "bench-scale", nodeRegions: []string{"us-east", "eu-west", "ap-south"}, mtls: true,
		// Raft checks its snapshot threshold every 5 s instead of every 2
		// minutes, so that the snapshot figures come from this run.
		serveArgs: []string{"--snapshot-interval", "5s"}}
	for _, r := range spec.nodeRegions {
		spec.regions = append(spec.regions, benchRegion{r, "file://" + filepath.Join(dir, "blobs", r)})
	}
	logf("scale: starting 3 nodes (file:// regions), mutual TLS; %d tags in %s", opts.tags, scaleRepo)
	c, err := startBenchCluster(ctx, opts.meridianCmd, dir, spec)
	if err != nil {
		return fmt.Errorf("bench: scale: %w", err)
	}
	defer c.stop()
	res.Security = c.mtlsLabel()
	f, leader, err := c.follower(ctx)
	if err != nil {
		return fmt.Errorf("bench: scale: %w", err)
	}
	res.Follower, res.Leader = f.ready.NodeID, leader

	hc := c.adminClient(f.base, scaleWriters)
	defer hc.CloseIdleConnections()
	base := f.base
	push := func(path string) string { return base + "/v2/" + scaleRepo + path }
	config := []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}`)
	layer := newBlobSpec(4001, 1<<20)
	for _, b := range [][]byte{config} {
		resp, err := send(ctx, hc, http.MethodPost, push("/blobs/uploads/?digest="+sha256Digest(b)), strings.NewReader(string(b)), int64(len(b)), nil)
		if err == nil {
			err = expect(resp, http.StatusCreated, "POST ?digest=")
		}
		if err != nil {
			return fmt.Errorf("bench: scale: %w", err)
		}
	}
	resp, err := send(ctx, hc, http.MethodPost, push("/blobs/uploads/?digest="+layer.digest), layer.reader(), layer.size, nil)
	if err == nil {
		err = expect(resp, http.StatusCreated, "POST ?digest=")
	}
	if err != nil {
		return fmt.Errorf("bench: scale: %w", err)
	}
	manifest := imageManifest(sha256Digest(config), int64(len(config)), layer)

	tok := &refreshingToken{fetch: func() (string, time.Duration, error) {
		tr, err := fetchToken(ctx, hc, f.base+"/auth/token?scope=repository:"+scaleRepo+":pull,push&service="+c.spec.id, c.basicAuth())
		return "Bearer " + tr.Token, time.Duration(tr.ExpiresIn) * time.Second, err
	}}
	tagName := func(i int) string { return fmt.Sprintf("t%08d", i) }
	var commits loadSample
	commit := func(from, to int) error {
		logf("scale: committing tags %d to %d through follower %s (leader %s), %d writers", from, to, f.ready.NodeID, leader, scaleWriters)
		s, err := commitTags(ctx, hc, tok, base, from, to, tagName, manifest, logf)
		commits.merge(s)
		res.Committed = int64(len(commits.lat))
		return err
	}
	if err := commit(0, min(scaleBaseTags, opts.tags)); err != nil {
		return err
	}
	if res.TagGetBase, err = tagGetLoad(ctx, hc, tok, base, min(scaleBaseTags, opts.tags), tagName, len(manifest)); err != nil {
		return err
	}
	logf("scale: tag GET at %d tags: p50 %.2f ms, p99 %.2f ms", min(scaleBaseTags, opts.tags), res.TagGetBase.P50Ms, res.TagGetBase.P99Ms)
	if opts.tags > scaleBaseTags {
		if err := commit(scaleBaseTags, opts.tags); err != nil {
			return err
		}
	}
	res.Commits = commits.result(scaleWriters)

	// Reads on a follower are local: wait until it has applied every
	// commit before counting the tags.
	if err := c.waitApplied(ctx, f); err != nil {
		return fmt.Errorf("bench: scale: %w", err)
	}
	logf("scale: paging through the tags list, %d a page", scalePageSize)
	pages, err := listAllTags(ctx, hc, tok, base)
	if err != nil {
		return err
	}
	res.ListPages, res.ListSeconds = len(pages.lat), pages.elapsed.Seconds()
	pr := pages.result(1)
	res.ListPageP50Ms, res.ListPageP99Ms, res.ListTags = pr.P50Ms, pr.P99Ms, int(pages.errors)
	if int64(res.ListTags) != res.Committed {
		return fmt.Errorf("bench: scale: the tags list holds %d tags, %d were committed", res.ListTags, res.Committed)
	}
	if res.TagGetFull, err = tagGetLoad(ctx, hc, tok, base, opts.tags, tagName, len(manifest)); err != nil {
		return err
	}
	logf("scale: tag GET at %d tags: p50 %.2f ms, p99 %.2f ms", opts.tags, res.TagGetFull.P50Ms, res.TagGetFull.P99Ms)
	res.RSS, res.PeakRSS = map[string]int64{}, map[string]int64{}
	for _, n := range c.nodes {
		res.RSS[n.ready.NodeID], res.PeakRSS[n.ready.NodeID] = procMemory(n.proc)
	}
	for _, n := range c.nodes {
		if n.ready.NodeID == leader {
			if s, err := newestSnapshot(filepath.Join(dir, n.id)); err == nil {
				s.Node = leader
				res.Snapshot = s
			} else {
				logf("scale: no snapshot on the leader: %v", err)
			}
		}
	}
	return followerRestart(ctx, c, f, hc, tok, opts.tags, tagName, manifest, res, logf)
}

// followerRestart stops the follower, commits more tags through another
// node, starts the follower again and times its readiness and its catch-up
// to the commit index reached meanwhile.
func followerRestart(ctx context.Context, c *benchCluster, f *clusterMember, hc *http.Client, tok *refreshingToken,
	from int, tagName func(int) string, manifest []byte, res *scaleResult, logf func(string, ...any)) error {
	var other *clusterMember
	for _, n := range c.nodes {
		if n != f && n.ready.NodeID != res.Leader {
			other = n
		}
	}
	if other == nil {
		return nil
	}
	if s, err := newestSnapshot(filepath.Join(c.dir, f.id)); err == nil {
		res.RestartSnapshotIndex = s.Index
	}
	logf("scale: stopping follower %s", f.ready.NodeID)
	if err := f.proc.stop(); err != nil {
		return fmt.Errorf("bench: scale: %w", err)
	}
	res.RestartTagsWhileDown = max(1000, from/100)
	otherClient := c.adminClient(other.base, scaleWriters)
	defer otherClient.CloseIdleConnections()
	otherTok := &refreshingToken{fetch: func() (string, time.Duration, error) {
		tr, err := fetchToken(ctx, otherClient, other.base+"/auth/token?scope=repository:"+scaleRepo+":pull,push&service="+c.spec.id, c.basicAuth())
		return "Bearer " + tr.Token, time.Duration(tr.ExpiresIn) * time.Second, err
	}}
	logf("scale: committing %d tags through %s while %s is down", res.RestartTagsWhileDown, other.ready.NodeID, f.ready.NodeID)
	if _, err := commitTags(ctx, otherClient, otherTok, other.base, from, from+res.RestartTagsWhileDown, tagName, manifest, logf); err != nil {
		return err
	}
	st, err := c.clusterStatus()
	if err != nil {
		return fmt.Errorf("bench: scale: %w", err)
	}
	res.CatchUpToIndex = st.LeaderCommitIndex
	logf("scale: starting %s again; catching up to index %d", f.ready.NodeID, res.CatchUpToIndex)
	start := time.Now()
	m, err := startMember(ctx, f.id, f.dir, f.argv)
	if err != nil {
		return fmt.Errorf("bench: scale: restart: %w", err)
	}
	*f = *m
	if err := waitHTTP(ctx, f.proc, f.base+"/readyz", http.StatusOK); err != nil {
		return fmt.Errorf("bench: scale: restart: %w%s", err, f.proc.logTail())
	}
	res.RestartReadySeconds = time.Since(start).Seconds()
	if err := c.waitIndex(ctx, f, res.CatchUpToIndex); err != nil {
		return fmt.Errorf("bench: scale: %w", err)
	}
	res.CatchUpSeconds = time.Since(start).Seconds()
	return nil
}

// waitApplied waits until n has applied the leader's commit index.
func (c *benchCluster) waitApplied(ctx context.Context, n *clusterMember) error {
	st, err := c.clusterStatus()
	if err != nil {
		return err
	}
	return c.waitIndex(ctx, n, st.LeaderCommitIndex)
}

// waitIndex waits until n has applied index.
func (c *benchCluster) waitIndex(ctx context.Context, n *clusterMember, index uint64) error {
	return pollFor(ctx, n.proc, fmt.Sprintf("index %d applied", index), 30*time.Minute, func() error {
		st, err := c.clusterStatus()
		if err != nil {
			return err
		}
		for _, m := range st.Members {
			if m.Id == n.ready.NodeID && m.Status != nil && m.Status.AppliedIndex >= index {
				return nil
			}
		}
		return fmt.Errorf("%s has not applied index %d", n.ready.NodeID, index)
	})
}

// refreshingToken is a registry token fetched again before it expires, for
// runs longer than its lifetime.
type refreshingToken struct {
	fetch   func() (string, time.Duration, error)
	mu      sync.Mutex
	value   string
	expires time.Time
}

func (t *refreshingToken) get() (string, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.value != "" && time.Now().Add(30*time.Second).Before(t.expires) {
		return t.value, nil
	}
	start := time.Now()
	v, ttl, err := t.fetch()
	if err != nil {
		return "", err
	}
	if ttl <= 0 {
		ttl = time.Minute
	}
	t.value, t.expires = v, start.Add(ttl)
	return v, nil
}

// commitTags PUTs the manifest under tags from to to-1 from scaleWriters
// clients and returns their latencies. A failed PUT ends the run with its
// error: every tag must be there for the list to be checked.
func commitTags(ctx context.Context, hc *http.Client, tok *refreshingToken, base string, from, to int,
	tagName func(int) string, manifest []byte, logf func(string, ...any)) (loadSample, error) {
	var next atomic.Int64
	next.Store(int64(from))
	workers := make([]loadSample, scaleWriters)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	start := time.Now()
	done := make(chan struct{})
	go func() { // progress every 10 s
		t := time.NewTicker(10 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				n := next.Load() - int64(from)
				logf("scale: %d tags committed, %.0f/s", n, float64(n)/time.Since(start).Seconds())
			}
		}
	}()
	for w := range workers {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= to || ctx.Err() != nil {
					return
				}
				auth, err := tok.get()
				t0 := time.Now()
				if err == nil {
					err = putManifestTagRepo(ctx, hc, base, scaleRepo, tagName(i), auth, manifest)
				}
				if err != nil {
					errOnce.Do(func() { firstErr = fmt.Errorf("bench: scale: tag %s: %w", tagName(i), err) })
					cancel()
					return
				}
				workers[w].lat = append(workers[w].lat, time.Since(t0))
			}
		})
	}
	wg.Wait()
	close(done)
	var s loadSample
	for _, w := range workers {
		s.merge(w)
	}
	s.elapsed = time.Since(start)
	s.rps = []float64{float64(len(s.lat)) / s.elapsed.Seconds()}
	return s, firstErr
}

func putManifestTagRepo(ctx context.Context, hc *http.Client, base, repo, tag, authorization string, m []byte) error {
	resp, err := send(ctx, hc, http.MethodPut, base+"/v2/"+repo+"/manifests/"+tag, strings.NewReader(string(m)), int64(len(m)),
		http.Header{"Content-Type": {mediaTypeManifest}, "Authorization": {authorization}})
	if err != nil {
		return err
	}
	return expect(resp, http.StatusCreated, "PUT manifest")
}

// tagGetLoad GETs random tags among the first count from scaleReaders
// clients for scaleReadDuration; every answer must be the manifest.
func tagGetLoad(ctx context.Context, hc *http.Client, tok *refreshingToken, base string, count int, tagName func(int) string, manifestLen int) (loadResult, error) {
	auth, err := tok.get()
	if err != nil {
		return loadResult{}, err
	}
	s := closedLoop(ctx, scaleReaders, scaleReadDuration, func() func() error {
		buf := make([]byte, manifestLen+1)
		return func() error {
			u := base + "/v2/" + scaleRepo + "/manifests/" + tagName(rand.IntN(count))
			return getManifest(ctx, hc, u, auth, buf, manifestLen)
		}
	})
	r := s.result(scaleReaders)
	if err := ctx.Err(); err != nil {
		return r, err
	}
	if r.Errors > 0 || r.Requests == 0 {
		return r, fmt.Errorf("bench: scale: tag GET: %d of %d failed, first: %s", r.Errors, r.Errors+r.Requests, r.FirstError)
	}
	return r, nil
}

// listAllTags pages through the repository's tags list, following each
// page's Link, and checks that the tags come in order without repeats. The
// sample holds each page's latency; its errors field counts the tags.
func listAllTags(ctx context.Context, hc *http.Client, tok *refreshingToken, base string) (loadSample, error) {
	var s loadSample
	next := base + "/v2/" + scaleRepo + "/tags/list?n=" + strconv.Itoa(scalePageSize)
	last := ""
	start := time.Now()
	for next != "" {
		auth, err := tok.get()
		if err != nil {
			return s, err
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, next, nil)
		if err != nil {
			return s, err
		}
		req.Header.Set("Authorization", auth)
		t0 := time.Now()
		resp, err := hc.Do(req)
		if err != nil {
			return s, fmt.Errorf("bench: scale: tags list: %w", err)
		}
		var page struct {
			Tags []string `json:"tags"`
		}
		err = json.NewDecoder(resp.Body).Decode(&page)
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return s, fmt.Errorf("bench: scale: tags list: %s", resp.Status)
		}
		if err != nil {
			return s, fmt.Errorf("bench: scale: tags list: %w", err)
		}
		s.lat = append(s.lat, time.Since(t0))
		for _, t := range page.Tags {
			if t <= last {
				return s, fmt.Errorf("bench: scale: tags list: %q after %q", t, last)
			}
			last = t
		}
		s.errors += int64(len(page.Tags))
		next, err = nextLink(base, resp.Header.Get("Link"))
		if err != nil {
			return s, err
		}
	}
	s.elapsed = time.Since(start)
	return s, nil
}

// nextLink is the URL of a Link header's rel="next", resolved against base;
// "" when there is none.
func nextLink(base, link string) (string, error) {
	if link == "" {
		return "", nil
	}
	for _, part := range strings.Split(link, ",") {
		target, params, ok := strings.Cut(strings.TrimSpace(part), ";")
		if !ok || !strings.Contains(params, `rel="next"`) {
			continue
		}
		target = strings.TrimSuffix(strings.TrimPrefix(strings.TrimSpace(target), "<"), ">")
		b, err := url.Parse(base)
		if err != nil {
			return "", err
		}
		u, err := b.Parse(target)
		if err != nil {
			return "", fmt.Errorf("bad Link %q: %w", link, err)
		}
		return u.String(), nil
	}
	return "", nil
}

// procMemory is a process's resident set now and at its peak (VmRSS,
// VmHWM), 0 where /proc does not say.
func procMemory(p *process) (rss, peak int64) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		return 0, 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		key, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
		if err != nil {
			continue
		}
		switch key {
		case "VmRSS":
			rss = kb << 10
		case "VmHWM":
			peak = kb << 10
		}
	}
	return rss, peak
}

// newestSnapshot finds the Raft snapshot with the highest index under a
// node's data dir: a directory TERM-INDEX-MILLIS holding meta.json.
func newestSnapshot(dataDir string) (*snapshotInfo, error) {
	var best *snapshotInfo
	err := filepath.WalkDir(dataDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || d.Name() != "meta.json" || filepath.Base(filepath.Dir(filepath.Dir(path))) != "snapshots" {
			return nil
		}
		name := strings.Split(filepath.Base(filepath.Dir(path)), "-")
		if len(name) != 3 {
			return nil
		}
		index, err1 := strconv.ParseUint(name[1], 10, 64)
		millis, err2 := strconv.ParseInt(name[2], 10, 64)
		meta, err3 := os.Stat(path)
		if err1 != nil || err2 != nil || err3 != nil {
			return nil
		}
		if best != nil && index <= best.Index {
			return nil
		}
		var size int64
		entries, _ := os.ReadDir(filepath.Dir(path))
		for _, e := range entries {
			if fi, err := e.Info(); err == nil {
				size += fi.Size()
			}
		}
		best = &snapshotInfo{Index: index, Bytes: size, WriteSeconds: meta.ModTime().Sub(time.UnixMilli(millis)).Seconds()}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if best == nil {
		return nil, errors.New("no snapshot in " + dataDir)
	}
	return best, nil
}

// scaleRows are the scale run's rows.
func (r *benchReport) scaleRows(add func(benchRow)) {
	s := r.Scale
	if s == nil {
		return
	}
	sec := s.Security
	if s.Commits.Requests > 0 {
		add(benchRow{Figure: fmt.Sprintf("scale: tags committed through a follower, %d writers", scaleWriters), Value: s.Commits.RPS, Unit: "commits/s",
			Detail: fmt.Sprintf("%d tags in %s through follower %s (leader %s); p50 %.2f ms, p99 %.2f ms; %s",
				s.Committed, scaleRepo, s.Follower, s.Leader, s.Commits.P50Ms, s.Commits.P99Ms, sec)})
	}
	base := min(scaleBaseTags, s.Tags)
	if b := s.TagGetBase; b.Requests > 0 {
		add(benchRow{Figure: fmt.Sprintf("scale: tag GET at %d tags, p99", base), Value: b.P99Ms, Unit: "ms",
			Detail: fmt.Sprintf("%d clients, random tags, %.0f req/s, p50 %.2f ms", b.Concurrency, b.RPS, b.P50Ms)})
	}
	if f, b := s.TagGetFull, s.TagGetBase; f.Requests > 0 {
		row := benchRow{Figure: fmt.Sprintf("scale: tag GET at %d tags, p99", s.Tags), Value: f.P99Ms, Unit: "ms",
			Detail: fmt.Sprintf("%d clients, random tags, %.0f req/s, p50 %.2f ms (at %d tags: %.2f ms)", f.Concurrency, f.RPS, f.P50Ms, base, b.P50Ms)}
		if b.Requests > 0 && b.P99Ms > 0 {
			row.Limit, row.LimitValue, row.Ratio = fmt.Sprintf("p99 at %d tags", base), b.P99Ms, f.P99Ms/b.P99Ms
			row.Target, row.Result = fmt.Sprintf("≤ %.2f", targetScaleTagGetP99Growth), verdictMissed
			if row.Ratio <= targetScaleTagGetP99Growth {
				row.Result = verdictMet
			}
		}
		add(row)
	}
	if s.ListPages > 0 {
		add(benchRow{Figure: "scale: tags list, paging through all", Value: s.ListSeconds, Unit: "s",
			Detail: fmt.Sprintf("from the follower once it applied every commit: %d tags in %d pages of %d, in order; page p50 %.2f ms, p99 %.2f ms", s.ListTags, s.ListPages, scalePageSize, s.ListPageP50Ms, s.ListPageP99Ms)})
	}
	ids := make([]string, 0, len(s.RSS))
	for id := range s.RSS {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		row := benchRow{Figure: fmt.Sprintf("scale: RSS of node %s", id), Value: float64(s.RSS[id]) / (1 << 20), Unit: "MiB",
			Detail: fmt.Sprintf("after %d tags and the reads; peak %.0f MiB", s.Committed, float64(s.PeakRSS[id])/(1<<20))}
		row.Target, row.Result = "< 1024 MiB", verdictMissed
		if s.RSS[id] > 0 && s.RSS[id] < targetScaleRSSBytes {
			row.Result = verdictMet
		}
		add(row)
	}
	if sn := s.Snapshot; sn != nil {
		add(benchRow{Figure: "scale: Raft snapshot size", Value: float64(sn.Bytes) / (1 << 20), Unit: "MiB",
			Detail: fmt.Sprintf("the leader's (%s) newest, at index %d", sn.Node, sn.Index)})
		add(benchRow{Figure: "scale: Raft snapshot write time", Value: sn.WriteSeconds, Unit: "s",
			Detail: "from the snapshot's creation to its meta.json (the FSM's capture before it is not included)"})
	}
	if s.Snapshot == nil && s.Committed > 0 {
		add(benchRow{Figure: "scale: Raft snapshot", Result: verdictNA,
			Detail: "the leader took none: fewer log entries than its snapshot threshold (--snapshot-threshold, 8192 by default)"})
	}
	if s.CatchUpSeconds > 0 {
		from := "from the log only (no snapshot on disk)"
		if s.RestartSnapshotIndex > 0 {
			from = fmt.Sprintf("from its snapshot at index %d, then the log", s.RestartSnapshotIndex)
		}
		add(benchRow{Figure: "scale: follower restart, to ready", Value: s.RestartReadySeconds, Unit: "s",
			Detail: fmt.Sprintf("restored %s", from)})
		add(benchRow{Figure: "scale: follower restart, to caught up", Value: s.CatchUpSeconds, Unit: "s",
			Detail: fmt.Sprintf("until it applied index %d, reached while %d tags were committed with it down", s.CatchUpToIndex, s.RestartTagsWhileDown)})
	}
}
