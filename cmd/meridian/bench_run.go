package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// runBench runs every measurement and returns the report, partial if a step
// failed (the error says which).
//
// Machines drift: other work comes and goes, and on some VMs a page-cache
// write costs ten times more when the kernel hands out memory the host has
// reclaimed than memory it used a moment ago. So each figure is measured in
// runs interleaved with its limit (disk test, then every push; static GET,
// then every registry GET; manifest load slices alternating between the
// registries), and each push and pull ratio is the median of per-run ratios.
//
// Meridian runs with authentication on, as it always does: the workload
// logs in as the node's first admin, and the manifest load runs with a
// Bearer token and, in the same slices, anonymously. Distribution runs
// without authentication.
func runBench(ctx context.Context, opts benchOptions) (*benchReport, error) {
	if opts.progress == nil {
		opts.progress = io.Discard
	}
	logf := func(format string, args ...any) { fmt.Fprintf(opts.progress, "bench: "+format+"\n", args...) }
	if err := os.MkdirAll(opts.dir, 0o755); err != nil {
		return nil, fmt.Errorf("bench: --dir: %w", err)
	}
	root, err := os.MkdirTemp(opts.dir, "meridian-bench-")
	if err != nil {
		return nil, fmt.Errorf("bench: temp dir: %w", err)
	}
	if root, err = filepath.Abs(root); err != nil {
		return nil, err
	}
	if opts.keep {
		defer logf("kept %s", root)
	} else {
		defer os.RemoveAll(root)
	}
	rep := newBenchReport(opts, root)
	defer func() {
		rep.Environment.LoadAvgEnd = loadAvg()
		rep.buildRows()
	}()

	logf("working in %s (blob %s, %d runs, manifest load %d clients for %s)", root, mib(opts.size), opts.runs, opts.concurrency, opts.duration)
	blobs := newBenchBlobs(opts.size, opts.runs)
	logf("limit: sha256 of %s on one core", mib(opts.size))
	sha, err := measureSHA256(ctx, opts.size)
	if err != nil {
		return rep, err
	}
	rep.Limits.SHA256 = &sha

	staticDir := filepath.Join(root, "static")
	if err := os.Mkdir(staticDir, 0o755); err != nil {
		return rep, err
	}
	static, err := startStatic(ctx, opts, filepath.Join(root, "nginx"), staticDir)
	if err != nil {
		return rep, err
	}
	defer static.stop()
	rep.Limits.Static = &staticResult{Server: static.label}

	logf("meridian: starting %s", strings.Join(opts.serveCmd, " "))
	n, err := startMeridian(ctx, opts.serveCmd, opts.serveEnv, filepath.Join(root, "meridian"))
	if err != nil {
		return rep, fmt.Errorf("bench: meridian: %w", err)
	}
	defer n.proc.stop()
	targets := []*benchTarget{newMeridianTarget(n, opts.concurrency)}
	rep.Meridian = targets[0].res

	if bin, reason := findBinary(opts.distribution, "registry"); bin == "" {
		rep.DistributionSkipped = reason
		logf("distribution: skipped (%s)", reason)
	} else {
		logf("distribution: starting %s", bin)
		p, base, err := startDistribution(ctx, bin, filepath.Join(root, "distribution"))
		if err != nil {
			rep.DistributionSkipped = err.Error()
			return rep, fmt.Errorf("bench: distribution: %w", err)
		}
		defer p.stop()
		t := newBenchTarget("distribution", base, p, opts.concurrency)
		t.res.Version = distributionVersion(bin)
		targets = append(targets, t)
		rep.Distribution = t.res
	}

	w := &workload{opts: opts, blobs: blobs, static: static, diskDir: staticDir, rep: rep, logf: logf}
	if err := w.run(ctx, targets); err != nil {
		return rep, err
	}
	// The single node and Distribution are done: stopped, they leave the
	// cores to the cluster.
	for _, t := range targets {
		if err := t.proc.stop(); err != nil {
			return rep, fmt.Errorf("bench: %w", err)
		}
	}
	if opts.cluster {
		// A failure here is recorded in its rows; the S3 part still runs.
		cw := &clusterWorkload{opts: opts, root: root, static: static, staticDir: staticDir, rep: rep, logf: logf}
		clusterErr := cw.runFileCluster(ctx)
		if ctx.Err() != nil {
			return rep, ctx.Err()
		}
		if err := errors.Join(clusterErr, cw.runS3(ctx)); err != nil {
			return rep, err
		}
	}
	return rep, static.stop()
}

// staticServer serves the disk test's files.
type staticServer struct {
	base  string // http://HOST:PORT of the docroot
	url   string // of the first disk test's file
	label string
	stop  func() error
}

// startStatic starts nginx (sendfile) on docroot or, without nginx, Go's
// http.FileServer.
func startStatic(ctx context.Context, opts benchOptions, prefix, docroot string) (*staticServer, error) {
	bin, reason := findBinary(opts.nginx, "nginx")
	if bin == "" {
		addr, stop, err := startGoFileServer(docroot)
		if err != nil {
			return nil, err
		}
		return &staticServer{"http://" + addr, "http://" + addr + "/blob", "Go http.FileServer, in-process (nginx: " + reason + ")", stop}, nil
	}
	p, addr, err := startNginx(ctx, bin, prefix, docroot)
	if err != nil {
		return nil, fmt.Errorf("bench: nginx: %w", err)
	}
	return &staticServer{"http://" + addr, "http://" + addr + "/blob", "nginx " + nginxVersion(bin) + " (sendfile on, worker_processes auto)", p.stop}, nil
}

// benchTarget is a registry under test and what was measured on it.
type benchTarget struct {
	name string
	base string
	proc *process // nil for a server in this process
	c    *http.Client
	mc   *http.Client // the manifest load's, with a connection per client
	res  *registryResult

	postDigest  bool // the registry stores a blob from POST ?digest=
	manifestLen int
	load        loadSample

	// auth is set for Meridian: the workload logs in, and the manifest load
	// also runs anonymously (anonLoad), and the token endpoint is measured.
	auth     *benchAuth
	anonLoad loadSample
}

func newBenchTarget(name, base string, proc *process, concurrency int) *benchTarget {
	return &benchTarget{name: name, base: base, proc: proc, c: newBenchClient(1), mc: newBenchClient(concurrency),
		res: &registryResult{Name: name, URL: base, CPU: map[string]cpuUse{}}}
}

// newMeridianTarget is a node the bench started, whose clients log in as
// its first admin. The manifest load's client sends its own Authorization
// (a token, or none), so it stays unwrapped.
func newMeridianTarget(n *meridianNode, concurrency int) *benchTarget {
	t := newBenchTarget("meridian", n.base, n.proc, concurrency)
	t.auth = newBenchAuth(n)
	t.c.Transport = t.auth.wrap(t.c.Transport)
	return t
}

// measure runs fn and charges the CPU the server and this process used
// meanwhile to phase.
func (t *benchTarget) measure(phase string, fn func() error) error {
	server0, client0 := t.cpu()
	start := time.Now()
	err := fn()
	server, client := t.cpu()
	u := t.res.CPU[phase]
	u.add(server-server0, client-client0, time.Since(start), t.proc != nil)
	t.res.CPU[phase] = u
	return err
}

func (t *benchTarget) cpu() (server, client time.Duration) {
	if t.proc != nil {
		server = t.proc.cpuTime()
	}
	return server, processCPU()
}

// workload drives the registries and the limits in interleaved runs.
type workload struct {
	opts    benchOptions
	blobs   benchBlobs
	static  *staticServer // nil: no static server runs
	diskDir string        // "": no disk test runs
	rep     *benchReport
	logf    func(string, ...any)
}

// run measures every target. An error of the first target (Meridian) ends
// the run; a later target that fails is dropped and the error recorded.
func (w *workload) run(ctx context.Context, targets []*benchTarget) error {
	live := targets
	each := func(what string, fn func(t *benchTarget) error) error {
		kept := live[:0:0]
		for _, t := range live {
			err := fn(t)
			if err == nil {
				kept = append(kept, t)
				continue
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if t.proc != nil {
				err = fmt.Errorf("%w%s", err, t.proc.logTail())
			}
			err = fmt.Errorf("bench: %s: %s: %w", t.name, what, err)
			if t == targets[0] {
				return err
			}
			w.logf("%v", err)
			w.rep.DistributionSkipped = err.Error()
		}
		live = kept
		return nil
	}
	for _, t := range live {
		defer t.c.CloseIdleConnections()
		defer t.mc.CloseIdleConnections()
	}
	config := []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}`)
	if err := each("push config blob", func(t *benchTarget) error { return t.setup(ctx, config, w.opts.chunk) }); err != nil {
		return err
	}

	for i := range w.opts.runs {
		w.logf("run %d/%d: disk test, then push %s to each registry, monolithic and chunked", i+1, w.opts.runs, mib(w.opts.size))
		if err := w.diskRun(ctx, i); err != nil {
			return err
		}
		if err := each("monolithic push", func(t *benchTarget) error { return t.pushMonolithic(ctx, w.blobs.mono[i]) }); err != nil {
			return err
		}
		if err := each("chunked push", func(t *benchTarget) error { return t.pushChunked(ctx, w.blobs.chunked[i], w.opts.chunk) }); err != nil {
			return err
		}
	}

	pulled := w.blobs.mono[0]
	for i := range w.opts.runs {
		w.logf("run %d/%d: GET %s from the static file server, then from each registry", i+1, w.opts.runs, mib(pulled.size))
		if err := w.staticRun(ctx, pulled); err != nil {
			return err
		}
		if err := each("pull", func(t *benchTarget) error { return t.pull(ctx, pulled) }); err != nil {
			return err
		}
	}

	manifest := imageManifest(sha256Digest(config), int64(len(config)), pulled)
	if err := each("push manifest", func(t *benchTarget) error { return t.putManifest(ctx, manifest) }); err != nil {
		return err
	}
	if err := each("prepare the manifest load", func(t *benchTarget) error { return t.prepareLoad(ctx) }); err != nil {
		return err
	}
	// The static file server serves the same manifest bytes as a file.
	var staticLoad loadSample
	staticManifest := ""
	if w.static != nil && w.diskDir != "" {
		if err := os.WriteFile(filepath.Join(w.diskDir, "manifest"), manifest, 0o644); err != nil {
			return err
		}
		staticManifest = w.static.base + "/manifest"
	}
	staticClient := newBenchClient(w.opts.concurrency)
	defer staticClient.CloseIdleConnections()
	// Slices of about 2 s, alternating between the registries (and on
	// Meridian between the token and anonymous loads), so that whatever
	// else the machine does hits them alike.
	slices := max(1, int(math.Round(w.opts.duration.Seconds()/2)))
	slice := w.opts.duration / time.Duration(slices)
	also := ""
	for _, t := range live {
		if t.auth != nil {
			also += fmt.Sprintf(" (%s: with a bearer token and as long anonymously)", t.name)
		}
	}
	w.logf("manifest GET by tag: %d clients, %s per registry%s, in %d slice(s)", w.opts.concurrency, w.opts.duration, also, slices)
	for i := range slices {
		err := each("manifest GET", func(t *benchTarget) error {
			return t.loadSlice(ctx, i, w.opts.concurrency, slice)
		})
		if err != nil {
			return err
		}
		if staticManifest != "" {
			s := manifestLoad(ctx, staticClient, staticManifest, "", len(manifest), w.opts.concurrency, slice)
			if err := ctx.Err(); err != nil {
				return err
			}
			staticLoad.merge(s)
			if len(s.lat) == 0 {
				return fmt.Errorf("bench: static file server: no manifest GET succeeded: %s", s.firstErr)
			}
		}
	}
	if staticManifest != "" {
		r := staticLoad.result(w.opts.concurrency)
		w.rep.Limits.Static.ManifestGET = &r
	}
	for _, t := range live {
		t.res.ManifestGET = t.load.result(w.opts.concurrency)
		if t.auth != nil {
			r := t.anonLoad.result(w.opts.concurrency)
			t.res.ManifestGETAnonymous = &r
		}
	}

	// Last, so that its logins and signatures do not weigh on the loads.
	tokenTime := max(slice, time.Second)
	for _, t := range live {
		if t.auth != nil {
			w.logf("%s token issuance: %d clients for %s", t.name, w.opts.concurrency, tokenTime)
		}
	}
	return each("token issuance", func(t *benchTarget) error { return t.tokenIssue(ctx, w.opts.concurrency, tokenTime) })
}

// diskRun writes a new file each run: rewriting one would reuse the pages
// the last run freed, which the pushes, each writing a new blob, do not get.
func (w *workload) diskRun(ctx context.Context, i int) error {
	if w.diskDir == "" {
		return nil
	}
	path := filepath.Join(w.diskDir, "blob")
	if i > 0 {
		path += "." + strconv.Itoa(i)
	}
	r, err := measureFsyncWrite(ctx, path, w.blobs.mono[0])
	if err != nil {
		return fmt.Errorf("bench: disk test: %w", err)
	}
	if w.rep.Limits.DiskWrite == nil {
		w.rep.Limits.DiskWrite = &diskResult{}
	}
	w.rep.Limits.DiskWrite.add(r)
	return nil
}

func (w *workload) staticRun(ctx context.Context, b blobSpec) error {
	if w.static == nil {
		return nil
	}
	c := newBenchClient(1)
	defer c.CloseIdleConnections()
	d, err := pullOnce(ctx, c, w.static.url, b)
	if err != nil {
		return fmt.Errorf("bench: static file server: %w", err)
	}
	w.rep.Limits.Static.Pull.add(b.size, d)
	return nil
}

// setup pushes the config blob, which doubles as a probe: does POST ?digest=
// store a blob here?
func (t *benchTarget) setup(ctx context.Context, config []byte, chunk int64) error {
	var err error
	t.postDigest, err = pushSmall(ctx, t.c, t.base, config, sha256Digest(config))
	t.res.PushMonolithic.Method = "POST ?digest= (one request)"
	if !t.postDigest {
		t.res.PushMonolithic.Method = "POST, then PUT ?digest= with the body (POST ?digest= not supported)"
	}
	t.res.PushChunked.Method = fmt.Sprintf("POST, PATCH %s chunks, PUT ?digest=", mib(chunk))
	return err
}

func (t *benchTarget) pushMonolithic(ctx context.Context, b blobSpec) error {
	return t.measure("push_monolithic", func() error {
		start := time.Now()
		dataDone, err := pushMonolithic(ctx, t.c, t.base, b, t.postDigest)
		if err == nil {
			t.res.PushMonolithic.add(b.size, time.Since(start), time.Since(dataDone))
		}
		return err
	})
}

func (t *benchTarget) pushChunked(ctx context.Context, b blobSpec, chunk int64) error {
	return t.measure("push_chunked", func() error {
		start := time.Now()
		dataDone, err := pushChunked(ctx, t.c, t.base, b, chunk)
		if err == nil {
			t.res.PushChunked.add(b.size, time.Since(start), time.Since(dataDone))
		}
		return err
	})
}

func (t *benchTarget) pull(ctx context.Context, b blobSpec) error {
	return t.measure("pull", func() error {
		d, err := pullOnce(ctx, t.c, t.base+"/v2/"+benchRepo+"/blobs/"+b.digest, b)
		if err == nil {
			t.res.Pull.add(b.size, d)
		}
		return err
	})
}

func (t *benchTarget) putManifest(ctx context.Context, m []byte) error {
	t.manifestLen = len(m)
	return putManifest(ctx, t.c, t.base, m)
}

// prepareLoad readies an authenticating registry for the manifest loads:
// a token, and anonymous pull granted and seen to work.
func (t *benchTarget) prepareLoad(ctx context.Context) error {
	if t.auth == nil {
		return nil
	}
	if _, err := t.auth.bearerFor(ctx, t.c, 0); err != nil {
		return err
	}
	if err := t.auth.grantAnonymousPull(ctx); err != nil {
		return err
	}
	err := getManifest(ctx, t.mc, t.manifestURL(), "", make([]byte, t.manifestLen+1), t.manifestLen)
	if err != nil {
		return fmt.Errorf("anonymous pull granted, but: %w", err)
	}
	return nil
}

func (t *benchTarget) manifestURL() string {
	return t.base + "/v2/" + benchRepo + "/manifests/" + benchTag
}

// loadSlice runs slice i of the manifest load: on an authenticating
// registry, with the token and anonymously, first one then the other in
// turn, so that neither always runs second.
func (t *benchTarget) loadSlice(ctx context.Context, i, concurrency int, d time.Duration) error {
	withToken := func() error {
		authorization := ""
		if t.auth != nil {
			var err error
			if authorization, err = t.auth.bearerFor(ctx, t.c, d); err != nil {
				return err
			}
		}
		return t.measure("manifest_get", func() error {
			return t.loadOnce(ctx, &t.load, "", authorization, concurrency, d)
		})
	}
	if t.auth == nil {
		return withToken()
	}
	anonymous := func() error {
		return t.measure("manifest_get_anonymous", func() error {
			return t.loadOnce(ctx, &t.anonLoad, "anonymous: ", "", concurrency, d)
		})
	}
	first, second := withToken, anonymous
	if i%2 == 1 {
		first, second = anonymous, withToken
	}
	if err := first(); err != nil {
		return err
	}
	return second()
}

func (t *benchTarget) loadOnce(ctx context.Context, into *loadSample, what, authorization string, concurrency int, d time.Duration) error {
	s := manifestLoad(ctx, t.mc, t.manifestURL(), authorization, t.manifestLen, concurrency, d)
	if err := ctx.Err(); err != nil {
		return err
	}
	into.merge(s)
	if len(s.lat) == 0 {
		return errors.New(what + "no manifest GET succeeded: " + s.firstErr)
	}
	return nil
}

// tokenIssue measures the token endpoint of an authenticating registry:
// GET /auth/token with the admin's Basic credentials and one scope.
func (t *benchTarget) tokenIssue(ctx context.Context, concurrency int, d time.Duration) error {
	if t.auth == nil {
		return nil
	}
	return t.measure("token_issue", func() error {
		s := tokenLoad(ctx, t.mc, t.auth.tokenURL(), t.auth.basic, concurrency, d)
		if err := ctx.Err(); err != nil {
			return err
		}
		r := s.result(concurrency)
		t.res.TokenIssue = &r
		if len(s.lat) == 0 {
			return errors.New("no token request succeeded: " + s.firstErr)
		}
		return nil
	})
}
