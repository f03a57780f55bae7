package main

import (
	"bytes"
	"context"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func rowsByFigure(rows []benchRow) map[string]benchRow {
	m := map[string]benchRow{}
	for _, r := range rows {
		m[r.Figure] = r
	}
	return m
}

// TestClusterRowsJudgeTargets checks the gateway, storm, tag commit and S3
// rows: each ratio is the median of the per-run (per-slice) ratios, judged
// against its target, and failed requests make a row ERR.
func TestClusterRowsJudgeTargets(t *testing.T) {
	pulls := func(size int64, mbps ...float64) pullResult {
		var p pullResult
		for _, v := range mbps {
			p.add(size, time.Duration(float64(size)/(v*1e6)*float64(time.Second)))
		}
		return p
	}
	const size = 256 << 20
	load := func(slices ...float64) loadResult {
		return loadResult{Concurrency: 32, Requests: 1000, RPS: medianBy(slices, identity), SlicesRPS: slices, P50Ms: 1, P99Ms: 2}
	}
	rep := &benchReport{
		Cluster: &clusterResult{
			Security:    "mTLS on",
			GatewayPull: pulls(size, 800, 400, 900), NodePull: pulls(size, 1000, 1000, 1000), // ratios .8 .4 .9: median .8, met
			GatewayManifestGET: load(600, 700), NodeManifestGET: load(1000, 1000), // .6 .7: upper median .7, met
			StormClients: 64, StormBytes: 64 << 20,
			GatewayStorm: pulls(64<<20, 500, 500, 500), StaticStorm: pulls(64<<20, 2000, 2000, 2000), // .25, missed
			TagCommits: &loadResult{Concurrency: 32, Requests: 30000, RPS: 3000, P50Ms: 12, P99Ms: 40},
			Follower:   "n1", Leader: "n0",
		},
		S3: &s3Result{
			GatewayPull: pulls(size, 900), RawPull: pulls(size, 1000),
			GatewayPush: pulls(size, 100), RawPush: pulls(size, 200),
		},
	}
	rep.buildRows()
	rows := rowsByFigure(rep.Rows)
	for fig, want := range map[string]struct {
		ratio   float64
		verdict string
	}{
		"gateway pull 256 MiB, file:// regions":               {0.8, verdictMet},
		"gateway manifest GET by tag, 32 clients":             {0.7, verdictMet},
		"pull storm: 64 clients GET one 64 MiB blob, gateway": {0.25, verdictMissed},
		"gateway pull 256 MiB, S3 region (versitygw)":         {0.9, verdictMet},
		"gateway push 256 MiB, S3 region (versitygw)":         {0.5, verdictMissed},
	} {
		row, ok := rows[fig]
		if !ok {
			t.Errorf("no row %q in %v", fig, rep.Rows)
			continue
		}
		if math.Abs(row.Ratio-want.ratio) > 1e-6 || row.Result != want.verdict || row.Target == "" {
			t.Errorf("%s: ratio %.4f, %s (target %q), want %.2f, %s", fig, row.Ratio, row.Result, row.Target, want.ratio, want.verdict)
		}
	}
	// 3,000 commits/s, but a median of 12 ms: both targets must hold.
	tc := rows["tag commits, 3 nodes, 32 writers through a follower"]
	if tc.Result != verdictMissed || tc.Unit != "commits/s" || !strings.Contains(tc.Detail, "follower n1 (leader n0)") {
		t.Errorf("tag commits at 3000/s with p50 12 ms: %+v, want MISSED", tc)
	}
	rep.Cluster.TagCommits.P50Ms = 9
	rep.buildRows()
	if tc := rowsByFigure(rep.Rows)["tag commits, 3 nodes, 32 writers through a follower"]; tc.Result != verdictMet {
		t.Errorf("tag commits at 3000/s with p50 9 ms: %s, want MET", tc.Result)
	}
	rep.Cluster.TagCommits.RPS = 1999
	rep.buildRows()
	if tc := rowsByFigure(rep.Rows)["tag commits, 3 nodes, 32 writers through a follower"]; tc.Result != verdictMissed {
		t.Errorf("tag commits at 1999/s: %s, want MISSED", tc.Result)
	}
	rep.Cluster.TagCommits.RPS, rep.Cluster.TagCommits.Errors = 3000, 1
	rep.Cluster.GatewayManifestGET.Errors = 2
	rep.buildRows()
	rows = rowsByFigure(rep.Rows)
	for _, fig := range []string{"tag commits, 3 nodes, 32 writers through a follower", "gateway manifest GET by tag, 32 clients"} {
		if rows[fig].Result != verdictError {
			t.Errorf("%s with failed requests: %s, want ERR", fig, rows[fig].Result)
		}
	}

	// A part that failed or was skipped says so in the table.
	rep.Cluster.Error = "bench: cluster: boom"
	rep.S3 = &s3Result{Skipped: "versitygw not found on PATH"}
	rep.buildRows()
	rows = rowsByFigure(rep.Rows)
	if rows["cluster rows"].Result != verdictError || rows["gateway on an S3 region"].Result != verdictNA {
		t.Errorf("failed cluster part / skipped S3 part: %+v / %+v", rows["cluster rows"], rows["gateway on an S3 region"])
	}
	var table bytes.Buffer
	rep.writeTable(&table)
	for _, s := range []string{"commits/s", "MISSED", "not measured: versitygw not found", "mTLS on"} {
		if !strings.Contains(table.String(), s) {
			t.Errorf("table lacks %q:\n%s", s, table.String())
		}
	}
}

// TestNodePullAgainstTheFasterReference: run by run, the node's pull is held
// to the faster of Distribution and the static file server.
func TestNodePullAgainstTheFasterReference(t *testing.T) {
	mk := func(runs ...float64) pullResult {
		var p pullResult
		for _, v := range runs {
			p.add(1e6, time.Duration(float64(time.Second)/v))
		}
		return p
	}
	rep := &benchReport{
		Limits:       benchLimits{Static: &staticResult{Server: "nginx", Pull: mk(1000, 500, 1000)}},
		Meridian:     &registryResult{Name: "meridian", Pull: mk(950, 950, 900)},
		Distribution: &registryResult{Name: "distribution", Pull: mk(500, 1000, 1000)},
	}
	rep.buildRows()
	row := rowsByFigure(rep.Rows)["meridian pull, GET + sha256"]
	// Faster per run: 1000, 1000, 1000; ratios .95 .95 .9: median .95.
	if math.Abs(row.Ratio-0.95) > 1e-6 || row.Result != verdictMet || row.Limit != "faster of static file server and distribution" {
		t.Errorf("pull row %+v, want ratio 0.95 against the faster of both, MET", row)
	}
	rep.Meridian.Pull = mk(940, 940, 940)
	rep.buildRows()
	if row := rowsByFigure(rep.Rows)["meridian pull, GET + sha256"]; row.Result != verdictMissed {
		t.Errorf("pull at 0.94 of the faster: %s, want MISSED", row.Result)
	}
	if got, best := fasterRuns([][]float64{{1, 5, 3}, {2, 4, 9}}); !slicesEqual(got, []float64{2, 5, 9}) || best != 1 {
		t.Errorf("fasterRuns = %v, %d", got, best)
	}
}

func slicesEqual(a, b []float64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestStormChecksEveryBody: a storm fails, rather than counting bytes, when
// a client gets a non-200, a short body or wrong bytes.
func TestStormChecksEveryBody(t *testing.T) {
	b := newBlobSpec(5, 3<<20+7)
	good := new(bytes.Buffer)
	io.Copy(good, b.reader())
	crc := blobCRC(b)
	serve := func(body func(n int) []byte, status func(n int) int) *httptest.Server {
		var n int
		var mu = make(chan struct{}, 1)
		return httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu <- struct{}{}
			n++
			i := n
			<-mu
			if r.Header.Get("Authorization") != "Bearer x" {
				http.Error(w, "no token", http.StatusUnauthorized)
				return
			}
			w.WriteHeader(status(i))
			w.Write(body(i))
		}))
	}
	ok := func(int) int { return http.StatusOK }
	whole := func(int) []byte { return good.Bytes() }
	corrupt := func(i int) []byte {
		if i != 3 {
			return good.Bytes()
		}
		c := bytes.Clone(good.Bytes())
		c[len(c)/2] ^= 1
		return c
	}
	short := func(i int) []byte {
		if i == 2 {
			return good.Bytes()[:good.Len()-1]
		}
		return good.Bytes()
	}
	notFound := func(i int) int {
		if i == 4 {
			return http.StatusNotFound
		}
		return http.StatusOK
	}
	ctx := context.Background()
	srv := serve(whole, ok)
	defer srv.Close()
	if _, err := storm(ctx, srv.URL, "Bearer x", 8, b.size, crc); err != nil {
		t.Errorf("good server: %v", err)
	}
	if _, err := storm(ctx, srv.URL, "", 8, b.size, crc); err == nil || !strings.Contains(err.Error(), "401") {
		t.Errorf("without the token: %v, want the 401 reported", err)
	}
	for name, s := range map[string]*httptest.Server{
		"corrupt body": serve(corrupt, ok), "short body": serve(short, ok), "404": serve(whole, notFound),
	} {
		_, err := storm(ctx, s.URL, "Bearer x", 8, b.size, crc)
		s.Close()
		if err == nil || !strings.Contains(err.Error(), "1 of 8 clients failed") {
			t.Errorf("%s: %v, want one failed client", name, err)
		}
	}
}

// TestRunBenchCluster runs the cluster part of the bench against real
// `meridian serve` and `meridian gateway` processes, small: every row must
// be measured and judged. It takes about a minute.
func TestRunBenchCluster(t *testing.T) {
	gwe2eNeedBinary(t)
	opts := testBenchOptions(t)
	opts.cluster, opts.meridianCmd = true, []string{e2eBinary}
	opts.size, opts.runs, opts.duration = 2<<20, 1, 500*time.Millisecond
	if opts.versitygw = os.Getenv("MERIDIAN_VERSITYGW"); opts.versitygw == "" {
		// The package directory is cmd/meridian; make installs tools in bin/tools.
		opts.versitygw = filepath.Join("..", "..", "bin", "tools", "versitygw")
	}
	if _, err := os.Stat(opts.versitygw); err != nil {
		t.Logf("versitygw not found (%v): the S3 rows are skipped", err)
		opts.versitygw = "none"
	}
	opts.profiles = t.TempDir()
	rep, err := runBench(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	c := rep.Cluster
	if c == nil || c.Error != "" {
		t.Fatalf("cluster part: %+v", c)
	}
	// --profiles: a CPU profile (gzip-compressed protobuf) of each member
	// under each load.
	for _, name := range []string{"manifest-get-gateway", "manifest-get-node-behind-gateway", "manifest-get-node-direct",
		"tag-commits-leader", "tag-commits-follower"} {
		b, err := os.ReadFile(filepath.Join(opts.profiles, name+".pprof"))
		if err != nil || len(b) < 2 || b[0] != 0x1f || b[1] != 0x8b {
			t.Errorf("profile %s: %d bytes, %v; want a gzip-compressed CPU profile", name, len(b), err)
		}
	}
	for name, p := range map[string]pullResult{"gateway pull": c.GatewayPull, "gateway first pull": c.GatewayColdPull,
		"gateway second pull": c.GatewayFillPull, "node pull": c.NodePull,
		"gateway storm": c.GatewayStorm, "static storm": c.StaticStorm} {
		if len(p.RunsMBps) != 1 || !(p.MBps > 0) {
			t.Errorf("%s: %+v, want one measured run", name, p)
		}
	}
	if c.GatewayStorm.Bytes != stormClients*opts.size {
		t.Errorf("storm moved %d bytes, want %d clients × %d", c.GatewayStorm.Bytes, stormClients, opts.size)
	}
	if c.TagCommits == nil || c.TagCommits.Requests == 0 || c.TagCommits.Errors != 0 || c.Follower == c.Leader {
		t.Errorf("tag commits: %+v through %s (leader %s)", c.TagCommits, c.Follower, c.Leader)
	}
	for _, l := range []loadResult{c.GatewayManifestGET, c.NodeManifestGET} {
		if l.Requests == 0 || l.Errors != 0 {
			t.Errorf("manifest load: %+v", l)
		}
	}
	want := []string{"gateway pull 2 MiB, file:// regions", "gateway pull 2 MiB, first read of a blob",
		"gateway pull 2 MiB, second read of a blob", "gateway manifest GET by tag, 4 clients",
		"pull storm: 64 clients GET one 2 MiB blob, gateway", "tag commits, 3 nodes, 32 writers through a follower"}
	if opts.versitygw != "none" {
		want = append(want, "gateway pull 2 MiB, S3 region (versitygw)", "gateway push 2 MiB, S3 region (versitygw)")
	}
	rows := rowsByFigure(rep.Rows)
	for _, fig := range want {
		if r := rows[fig]; r.Result != verdictMet && r.Result != verdictMissed {
			t.Errorf("%s: %+v, want judged MET or MISSED", fig, r)
		}
	}
}

func TestNextLink(t *testing.T) {
	for _, tc := range []struct{ link, want string }{
		{"", ""},
		{`</v2/a/tags/list?last=t9&n=2>; rel="next"`, "http://h:1/v2/a/tags/list?last=t9&n=2"},
		{`<http://other/x>; rel="prev", </v2/a/tags/list?n=2&last=b>; rel="next"`, "http://h:1/v2/a/tags/list?n=2&last=b"},
		{`</v2/a/tags/list?n=2>; rel="prev"`, ""},
	} {
		got, err := nextLink("http://h:1", tc.link)
		if err != nil || got != tc.want {
			t.Errorf("nextLink(%q) = %q, %v; want %q", tc.link, got, err, tc.want)
		}
	}
}

// TestScaleRows: the p99 growth is judged as at most 1.5×, RSS under 1 GiB,
// and a run without a snapshot says why.
func TestScaleRows(t *testing.T) {
	rep := &benchReport{Scale: &scaleResult{Tags: 1_000_000, Committed: 1_000_000,
		Commits:    loadResult{Concurrency: 32, Requests: 1_000_000, RPS: 1500},
		TagGetBase: loadResult{Concurrency: 4, Requests: 1000, P99Ms: 2}, TagGetFull: loadResult{Concurrency: 4, Requests: 1000, P99Ms: 3},
		RSS: map[string]int64{"n0": 100 << 20, "n1": 1 << 30}, PeakRSS: map[string]int64{"n0": 120 << 20, "n1": 1 << 30}}}
	rep.buildRows()
	rows := rowsByFigure(rep.Rows)
	if r := rows["scale: tag GET at 1000000 tags, p99"]; r.Result != verdictMet || r.Ratio != 1.5 {
		t.Errorf("p99 1.5× the 1k figure: %+v, want MET", r)
	}
	if rows["scale: RSS of node n0"].Result != verdictMet || rows["scale: RSS of node n1"].Result != verdictMissed {
		t.Errorf("RSS rows: %+v / %+v", rows["scale: RSS of node n0"], rows["scale: RSS of node n1"])
	}
	if r := rows["scale: Raft snapshot"]; r.Result != verdictNA {
		t.Errorf("no snapshot: %+v", r)
	}
	rep.Scale.TagGetFull.P99Ms = 3.1
	rep.Scale.Snapshot = &snapshotInfo{Node: "n0", Index: 9000, Bytes: 5 << 20, WriteSeconds: 0.5}
	rep.buildRows()
	rows = rowsByFigure(rep.Rows)
	if r := rows["scale: tag GET at 1000000 tags, p99"]; r.Result != verdictMissed {
		t.Errorf("p99 1.55× the 1k figure: %+v, want MISSED", r)
	}
	if r := rows["scale: Raft snapshot size"]; r.Value != 5 || !strings.Contains(r.Detail, "index 9000") {
		t.Errorf("snapshot row: %+v", r)
	}
}

// TestNewestSnapshot reads a snapshot store's layout: the highest index
// wins, its size is its files', its write time runs from the name's
// milliseconds to meta.json's modification.
func TestNewestSnapshot(t *testing.T) {
	dir := t.TempDir()
	created := time.Now().Add(-3 * time.Second).Truncate(time.Millisecond)
	mk := func(name string, state int) {
		d := filepath.Join(dir, "raft", "snapshots", name)
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(d, "state.bin"), make([]byte, state), 0o644)
		os.WriteFile(filepath.Join(d, "meta.json"), []byte("{}"), 0o644)
	}
	mk("2-100-"+strconv.FormatInt(created.UnixMilli(), 10), 10)
	mk("3-250-"+strconv.FormatInt(created.UnixMilli(), 10), 1000)
	mk("3-90-"+strconv.FormatInt(created.UnixMilli(), 10), 5000)
	s, err := newestSnapshot(dir)
	if err != nil {
		t.Fatal(err)
	}
	if s.Index != 250 || s.Bytes != 1002 || s.WriteSeconds < 2.5 || s.WriteSeconds > 60 {
		t.Errorf("newest snapshot %+v, want index 250, 1002 bytes, written about 3 s after creation", s)
	}
	if _, err := newestSnapshot(t.TempDir()); err == nil {
		t.Error("an empty data dir has a snapshot")
	}
}
