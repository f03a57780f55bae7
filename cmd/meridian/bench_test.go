package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// The bench tests assert what the bench reports and that it cleans up, never
// how fast anything was: a slow machine must not fail them.

// TestBenchServeHelper is `meridian serve` when the bench tests start this
// test binary as the node (the arguments after "--" are serve's). It returns
// when serve does, on SIGTERM, so the test binary exits normally.
func TestBenchServeHelper(t *testing.T) {
	if os.Getenv("BENCH_HELPER_SERVE") != "1" {
		t.Skip("helper process for the bench tests")
	}
	i := slices.Index(os.Args, "--")
	if err := serve(os.Args[i+1:]); err != nil {
		t.Fatal(err)
	}
}

func testBenchOptions(t *testing.T) benchOptions {
	return benchOptions{
		size: 3<<20 + 12345, chunk: 1 << 20, duration: 300 * time.Millisecond, concurrency: 4, runs: 2,
		dir: t.TempDir(), nginx: "none", distribution: "none",
		serveCmd: []string{os.Args[0], "-test.run=^TestBenchServeHelper$", "--"},
		serveEnv: []string{"BENCH_HELPER_SERVE=1"},
		progress: testWriter{t},
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func TestRunBench(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a node")
	}
	opts := testBenchOptions(t)
	rep, err := runBench(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	checkReport(t, rep, false)
	if entries, _ := os.ReadDir(opts.dir); len(entries) != 0 {
		t.Errorf("temp dir left behind: %v", entries)
	}
	if !strings.HasPrefix(rep.Limits.Static.Server, "Go http.FileServer") {
		t.Errorf("static server %q, want the Go fallback with --nginx=none", rep.Limits.Static.Server)
	}
	if got := rep.Meridian.PushMonolithic.Method; !strings.HasPrefix(got, "POST ?digest=") {
		t.Errorf("meridian monolithic push used %q, want a single POST ?digest=", got)
	}
}

// TestRunBenchWithNginxAndDistribution runs the comparison with CNCF
// Distribution: MERIDIAN_DISTRIBUTION names its binary (`make test` installs
// the pinned one and sets it), else `registry` is looked up on PATH. nginx is
// optional: without it on PATH the static-file limit comes from Go's file
// server and everything else still runs.
func TestRunBenchWithNginxAndDistribution(t *testing.T) {
	if testing.Short() {
		t.Skip("starts three servers")
	}
	opts := testBenchOptions(t)
	opts.keep = true
	opts.distribution = os.Getenv("MERIDIAN_DISTRIBUTION")
	if opts.distribution == "" {
		if _, err := exec.LookPath("registry"); err != nil {
			t.Skip("MERIDIAN_DISTRIBUTION is not set and registry is not on PATH; `make test` installs it and sets MERIDIAN_DISTRIBUTION")
		}
	}
	wantStatic := "nginx"
	opts.nginx = ""
	if _, err := exec.LookPath("nginx"); err != nil {
		t.Log("nginx is not on PATH: the static-file limit comes from Go's file server")
		opts.nginx, wantStatic = "none", "Go http.FileServer"
	}
	rep, err := runBench(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	checkReport(t, rep, true)
	if !strings.HasPrefix(rep.Limits.Static.Server, wantStatic) {
		t.Errorf("static server %q, want %s", rep.Limits.Static.Server, wantStatic)
	}
	if v := rep.Distribution.Version; !strings.HasPrefix(v, "v3.") {
		t.Errorf("distribution version %q, want the v3 release the bench was given", v)
	}
	if entries, _ := os.ReadDir(opts.dir); len(entries) != 1 {
		t.Errorf("--keep: want the temp dir kept, found %v", entries)
	}
}

// checkReport checks that every figure was measured and judged, and that
// the table and the JSON carry them.
func checkReport(t *testing.T, rep *benchReport, withDistribution bool) {
	t.Helper()
	if rep.Limits.DiskWrite == nil || rep.Limits.SHA256 == nil || rep.Limits.Static == nil || rep.Meridian == nil {
		t.Fatalf("missing measurements: %+v", rep)
	}
	if (rep.Distribution != nil) != withDistribution {
		t.Fatalf("distribution measured: %v, want %v (skipped: %s)", rep.Distribution != nil, withDistribution, rep.DistributionSkipped)
	}
	m := rep.Meridian
	if m.ManifestGETAnonymous == nil || m.TokenIssue == nil {
		t.Fatalf("meridian: anonymous manifest GET %v, token issuance %v: want both measured", m.ManifestGETAnonymous, m.TokenIssue)
	}
	for name, v := range map[string]float64{
		"disk": rep.Limits.DiskWrite.MBps, "sha256": rep.Limits.SHA256.MBps, "static": rep.Limits.Static.Pull.MBps,
		"push": m.PushMonolithic.MBps, "chunked push": m.PushChunked.MBps, "pull": m.Pull.MBps, "manifest GET": m.ManifestGET.RPS,
		"anonymous manifest GET": m.ManifestGETAnonymous.RPS, "token issuance": m.TokenIssue.RPS,
	} {
		if !(v > 0) {
			t.Errorf("%s: %v, want a positive figure", name, v)
		}
	}
	for name, l := range map[string]loadResult{"manifest GET": m.ManifestGET, "anonymous manifest GET": *m.ManifestGETAnonymous, "token issuance": *m.TokenIssue} {
		if l.Errors != 0 {
			t.Errorf("%s errors: %d (%s)", name, l.Errors, l.FirstError)
		}
	}
	// The token and anonymous loads alternate slice by slice.
	if len(m.ManifestGET.SlicesRPS) != len(m.ManifestGETAnonymous.SlicesRPS) {
		t.Errorf("slices: %d with a token, %d anonymous", len(m.ManifestGET.SlicesRPS), len(m.ManifestGETAnonymous.SlicesRPS))
	}
	for _, phase := range []string{"manifest_get", "manifest_get_anonymous", "token_issue"} {
		if m.CPU[phase].Runs == 0 {
			t.Errorf("no CPU figure for %s: %v", phase, m.CPU)
		}
	}
	if d := rep.Distribution; d != nil && (d.ManifestGETAnonymous != nil || d.TokenIssue != nil) {
		t.Errorf("distribution has Meridian's authentication figures: %+v", d)
	}
	if len(m.PushMonolithic.RunsMBps) != 2 || len(m.Pull.RunsMBps) != 2 {
		t.Errorf("want 2 runs of each push and pull, got %v and %v", m.PushMonolithic.RunsMBps, m.Pull.RunsMBps)
	}
	// The targets: both pushes against the disk (and the monolithic one
	// against Distribution), the pull, the manifest GET against Distribution
	// (without it, it cannot be judged) and against the same bytes as a static
	// file, and bearer vs anonymous.
	judged := map[string]string{}
	for _, row := range rep.Rows {
		if row.Target != "" {
			judged[row.Figure] = row.Result
		}
	}
	metOrMissed := []string{verdictMet, verdictMissed}
	want := map[string][]string{
		"meridian push, monolithic": metOrMissed, "meridian push, chunked": metOrMissed,
		"meridian pull, GET + sha256":                                     metOrMissed,
		"meridian manifest GET by tag, 4 clients":                         {verdictNA},
		"meridian manifest GET by tag vs the same bytes as a static file": metOrMissed,
		"meridian manifest GET by tag, bearer token vs anonymous":         metOrMissed,
	}
	if withDistribution {
		want["meridian manifest GET by tag, 4 clients"] = metOrMissed
		want["meridian push (fsync) vs distribution (no fsync)"] = metOrMissed
	}
	if len(judged) != len(want) {
		t.Errorf("%d targets judged (%q), want %d", len(judged), judged, len(want))
	}
	for fig, verdicts := range want {
		if got, ok := judged[fig]; !ok || !slices.Contains(verdicts, got) {
			t.Errorf("%s judged %q, want one of %q", fig, got, verdicts)
		}
	}
	if st := rep.Limits.Static.ManifestGET; st == nil || st.Requests == 0 || st.Errors != 0 ||
		len(st.SlicesRPS) != len(m.ManifestGET.SlicesRPS) {
		t.Errorf("static manifest load: %+v, want one slice for each of meridian's, without errors", st)
	}

	var table bytes.Buffer
	rep.writeTable(&table)
	for _, s := range []string{"limit: disk write", "meridian push, monolithic", "meridian manifest GET by tag, 4 clients",
		"meridian manifest GET by tag, bearer token vs anonymous", "meridian token issuance", "tokens/s", "RESULT"} {
		if !strings.Contains(table.String(), s) {
			t.Errorf("table lacks %q:\n%s", s, table.String())
		}
	}
	path := filepath.Join(t.TempDir(), "bench.json")
	if err := rep.writeJSON(path); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	var decoded benchReport
	if err := json.Unmarshal(b, &decoded); err != nil {
		t.Fatal(err)
	}
	if len(decoded.Rows) != len(rep.Rows) || decoded.Meridian.Pull.Bytes != rep.SizeBytes ||
		decoded.Meridian.ManifestGETAnonymous == nil || decoded.Meridian.TokenIssue == nil {
		t.Errorf("JSON does not round-trip the report:\n%s", b)
	}
}

func TestBlobSpecIsDeterministicAndStreams(t *testing.T) {
	size := int64(2<<20 + 100)
	a, b := newBlobSpec(7, size), newBlobSpec(7, size)
	if a.digest != b.digest {
		t.Fatalf("same seed, different digests: %s, %s", a.digest, b.digest)
	}
	if c := newBlobSpec(8, size); c.digest == a.digest {
		t.Fatal("different seeds give the same blob")
	}
	// Odd read sizes cross block boundaries and stamps.
	h := sha256.New()
	r, buf := a.reader(), make([]byte, 4097)
	var n int64
	var blocks [][]byte
	for {
		k, err := r.Read(buf[:1+int(n)%len(buf)])
		h.Write(buf[:k])
		n += int64(k)
		if err == io.EOF {
			break
		}
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); n != size || got != a.digest {
		t.Fatalf("read %d bytes with digest %s, want %d with %s", n, got, size, a.digest)
	}
	all, _ := io.ReadAll(a.reader())
	for i := int64(0); i < size/genBlockSize; i++ {
		blocks = append(blocks, all[i*genBlockSize:(i+1)*genBlockSize])
	}
	if bytes.Equal(blocks[0], blocks[1]) {
		t.Error("consecutive blocks are equal")
	}

	// The disk test writes the same bytes.
	path := filepath.Join(t.TempDir(), "blob")
	if _, err := measureFsyncWrite(context.Background(), path, a); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(path); !bytes.Equal(got, all) {
		t.Error("the disk test's file differs from the generator's bytes")
	}
}

// fakeRegistry behaves like CNCF Distribution where the bench must adapt: it
// ignores ?digest= on POST (202, a session) and answers with absolute
// Locations that carry their state in the query.
type fakeRegistry struct {
	mu        sync.Mutex
	uploads   map[string]*bytes.Buffer
	blobs     map[string][]byte
	manifests map[string][]byte
	srv       *httptest.Server
}

func newFakeRegistry(t *testing.T) *fakeRegistry {
	f := &fakeRegistry{uploads: map[string]*bytes.Buffer{}, blobs: map[string][]byte{}, manifests: map[string][]byte{}}
	f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeRegistry) serve(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	p := r.URL.Path
	session := func(id string) {
		w.Header().Set("Location", f.srv.URL+"/v2/"+benchRepo+"/blobs/uploads/"+id+"?_state=opaque")
		w.WriteHeader(http.StatusAccepted)
	}
	switch {
	case r.Method == http.MethodPost && strings.HasSuffix(p, "/blobs/uploads/"):
		id := fmt.Sprint(len(f.uploads))
		f.uploads[id] = &bytes.Buffer{}
		session(id)
	case strings.Contains(p, "/blobs/uploads/"):
		id := p[strings.LastIndex(p, "/")+1:]
		up, ok := f.uploads[id]
		if !ok || r.URL.Query().Get("_state") != "opaque" {
			http.Error(w, "unknown upload", http.StatusNotFound)
			return
		}
		io.Copy(up, r.Body)
		if r.Method == http.MethodPatch {
			session(id)
			return
		}
		if d := r.URL.Query().Get("digest"); d != sha256Digest(up.Bytes()) {
			http.Error(w, "digest mismatch", http.StatusBadRequest)
			return
		}
		f.blobs[r.URL.Query().Get("digest")] = up.Bytes()
		w.WriteHeader(http.StatusCreated)
	case strings.Contains(p, "/blobs/"):
		b, ok := f.blobs[p[strings.LastIndex(p, "/")+1:]]
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Write(b)
	case strings.Contains(p, "/manifests/") && r.Method == http.MethodPut:
		f.manifests[p], _ = io.ReadAll(r.Body)
		w.WriteHeader(http.StatusCreated)
	case strings.Contains(p, "/manifests/"):
		m, ok := f.manifests[p]
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Write(m)
	default:
		http.NotFound(w, r)
	}
}

func TestWorkloadAdaptsToRegistryWithoutMonolithicPOST(t *testing.T) {
	f := newFakeRegistry(t)
	opts := testBenchOptions(t)
	opts.size, opts.duration = 2<<20+1, 200*time.Millisecond
	target := newBenchTarget("fake", f.srv.URL, nil, opts.concurrency)
	w := &workload{opts: opts, blobs: newBenchBlobs(opts.size, opts.runs), rep: &benchReport{}, logf: t.Logf}
	if err := w.run(context.Background(), []*benchTarget{target}); err != nil {
		t.Fatal(err)
	}
	res := target.res
	if !strings.Contains(res.PushMonolithic.Method, "POST ?digest= not supported") {
		t.Errorf("monolithic method %q, want the POST+PUT fallback", res.PushMonolithic.Method)
	}
	// Four big blobs (two runs of each push) and the config blob.
	if len(f.blobs) != 5 {
		t.Errorf("registry holds %d blobs, want 5", len(f.blobs))
	}
	if len(res.PushChunked.RunsMBps) != 2 || len(res.Pull.RunsMBps) != 2 {
		t.Errorf("want 2 runs of each push and pull, got %v and %v", res.PushChunked.RunsMBps, res.Pull.RunsMBps)
	}
	if res.ManifestGET.Requests == 0 || res.ManifestGET.Errors != 0 {
		t.Errorf("manifest GET: %+v", res.ManifestGET)
	}
	if u := res.CPU["push_monolithic"]; u.Runs != 2 || u.ServerSeconds != 0 {
		t.Errorf("CPU of the pushes: %+v, want 2 runs and no server figure for an in-process server", u)
	}
	if res.ManifestGETAnonymous != nil || res.TokenIssue != nil {
		t.Errorf("a registry without authentication got anonymous or token figures: %+v, %+v", res.ManifestGETAnonymous, res.TokenIssue)
	}
}

// The bench's clients add the admin's credentials to the node's requests
// that have none, and to no other host's.
func TestBenchBasicAuthTransport(t *testing.T) {
	var mu sync.Mutex
	var got []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		got = append(got, r.Header.Get("Authorization"))
		mu.Unlock()
		if r.URL.Path == "/redirect" {
			http.Redirect(w, r, r.URL.Query().Get("to"), http.StatusTemporaryRedirect)
		}
	}))
	defer srv.Close()
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		got = append(got, "other:"+r.Header.Get("Authorization"))
		mu.Unlock()
	}))
	defer other.Close()

	a := newBenchAuth(&meridianNode{base: srv.URL, password: "0123456789abcdef"})
	c := &http.Client{Transport: a.wrap(http.DefaultTransport)}
	get := func(url, authorization string) {
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		if authorization != "" {
			req.Header.Set("Authorization", authorization)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	get(srv.URL+"/v2/", "")
	get(srv.URL+"/v2/", "Bearer x")
	get(srv.URL+"/redirect?to="+other.URL+"/blob", "")
	want := []string{a.basic, "Bearer x", a.basic, "other:"}
	if !slices.Equal(got, want) {
		t.Errorf("Authorization sent: %q, want %q", got, want)
	}
	if a.basic != "Basic YWRtaW46MDEyMzQ1Njc4OWFiY2RlZg==" {
		t.Errorf("Basic credentials %q", a.basic)
	}
}

// A registry that fails after the first target is dropped, and its error
// reported, while the first one is measured to the end.
func TestWorkloadDropsAFailingSecondRegistry(t *testing.T) {
	good := newFakeRegistry(t)
	broken := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "out of order", http.StatusInternalServerError)
	}))
	defer broken.Close()
	opts := testBenchOptions(t)
	opts.size, opts.runs, opts.duration = 1<<20, 1, 100*time.Millisecond
	first := newBenchTarget("first", good.srv.URL, nil, opts.concurrency)
	second := newBenchTarget("second", broken.URL, nil, opts.concurrency)
	rep := &benchReport{}
	w := &workload{opts: opts, blobs: newBenchBlobs(opts.size, opts.runs), rep: rep, logf: t.Logf}
	if err := w.run(context.Background(), []*benchTarget{first, second}); err != nil {
		t.Fatal(err)
	}
	if first.res.ManifestGET.Requests == 0 {
		t.Error("the first registry was not measured to the end")
	}
	if !strings.Contains(rep.DistributionSkipped, "500") {
		t.Errorf("the second registry's failure is not reported: %q", rep.DistributionSkipped)
	}
}

func TestManifestLoadCountsErrors(t *testing.T) {
	body := []byte(`{"schemaVersion":2}`)
	var n int64
	var mu sync.Mutex
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		n++
		odd := n%2 == 1
		mu.Unlock()
		if odd {
			http.Error(w, "boom", http.StatusInternalServerError)
			return
		}
		w.Write(body)
	}))
	defer srv.Close()
	c := newBenchClient(2)
	var s loadSample
	for range 2 {
		s.merge(manifestLoad(context.Background(), c, srv.URL, "", len(body), 2, 100*time.Millisecond))
	}
	res := s.result(2)
	if res.Requests == 0 || res.Errors == 0 || !strings.Contains(res.FirstError, "500") || len(res.SlicesRPS) != 2 {
		t.Errorf("want successes and counted 500s over 2 slices, got %+v", res)
	}
	if res.P50Ms > res.P99Ms || res.P99Ms > res.MaxMs {
		t.Errorf("percentiles out of order: %+v", res)
	}

	rep := &benchReport{Meridian: &registryResult{Name: "meridian", ManifestGET: res}}
	rep.buildRows()
	if got := rep.Rows[len(rep.Rows)-1].Result; got != "ERR" {
		t.Errorf("a load with errors is judged %q, want ERR", got)
	}

	// Errors of the anonymous load or of the token endpoint mark their rows.
	clean := loadResult{Concurrency: 2, Requests: 100, RPS: 1000, SlicesRPS: []float64{900, 1100}}
	anon := clean
	anon.RPS, anon.SlicesRPS = 1000, []float64{1000, 1000}
	rep = &benchReport{Meridian: &registryResult{Name: "meridian", ManifestGET: clean, ManifestGETAnonymous: &anon, TokenIssue: &res}}
	rep.buildRows()
	byFigure := map[string]benchRow{}
	for _, row := range rep.Rows {
		byFigure[row.Figure] = row
	}
	vs := byFigure["meridian manifest GET by tag, bearer token vs anonymous"]
	// The ratio is the median of the per-slice ratios, 0.9 and 1.1.
	if vs.Result != verdictMet || math.Abs(vs.Ratio-1.1) > 1e-9 || vs.LimitValue != 1000 {
		t.Errorf("bearer vs anonymous row: %+v", vs)
	}
	if tk := byFigure["meridian token issuance"]; tk.Result != "ERR" || tk.Unit != "tokens/s" || tk.Target != "" {
		t.Errorf("token issuance row with errors: %+v", tk)
	}
	anon.Errors, anon.FirstError = 3, "boom"
	rep.buildRows()
	for _, row := range rep.Rows {
		if row.Figure == vs.Figure && row.Result != "ERR" {
			t.Errorf("bearer vs anonymous with anonymous errors judged %q, want ERR", row.Result)
		}
	}
}

func TestPairedRatio(t *testing.T) {
	for _, tc := range []struct {
		values, limits []float64
		want           float64
	}{
		{[]float64{100, 50, 90}, []float64{100, 100, 100}, 0.9},
		// Paired: the second run's limit was as slow as its figure.
		{[]float64{100, 50, 90}, []float64{100, 50, 100}, 1},
		// Unpaired: ratio of the medians.
		{[]float64{100, 50}, []float64{100, 50, 200}, 1},
		{nil, []float64{1}, 0},
	} {
		if got := pairedRatio(tc.values, tc.limits); math.Abs(got-tc.want) > 1e-9 {
			t.Errorf("pairedRatio(%v, %v) = %v, want %v", tc.values, tc.limits, got, tc.want)
		}
	}
}

func TestParseBenchFlags(t *testing.T) {
	opts, err := parseBenchFlags(nil)
	if err != nil {
		t.Fatal(err)
	}
	if opts.size != 256<<20 || opts.chunk != 16<<20 || opts.concurrency != 32 || opts.duration != 10*time.Second || opts.runs != 3 || opts.dir != "." ||
		!opts.cluster || opts.scale || opts.tags != 1_000_000 {
		t.Errorf("defaults: %+v", opts)
	}
	for _, args := range [][]string{
		{"--size", "0"}, {"--size", "lots"}, {"--concurrency", "0"}, {"--duration", "-1s"}, {"--runs", "0"}, {"extra"}, {"--scale", "--tags", "0"},
	} {
		if _, err := parseBenchFlags(args); err == nil {
			t.Errorf("%q: accepted", args)
		}
	}
	opts, err = parseBenchFlags([]string{"--size", "4MiB", "--duration", "1s", "--concurrency", "8", "--json", "x.json", "--keep"})
	if err != nil || opts.size != 4<<20 || opts.concurrency != 8 || opts.jsonFile != "x.json" || !opts.keep {
		t.Errorf("parsed %+v, %v", opts, err)
	}
	opts, err = parseBenchFlags([]string{"--scale", "--tags", "5000", "--cluster=false", "--versitygw", "none"})
	if err != nil || !opts.scale || opts.tags != 5000 || opts.cluster || opts.versitygw != "none" {
		t.Errorf("parsed %+v, %v", opts, err)
	}
}
