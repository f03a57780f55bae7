package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"github.com/meridian-registry/meridian/node"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// benchOptions are the settings of `meridian bench`.
type benchOptions struct {
	size         int64
	chunk        int64
	duration     time.Duration
	concurrency  int
	dir          string
	distribution string // path, "" to look on PATH, "none" to skip
	nginx        string // path, "" to look on PATH, "none" for Go's file server
	versitygw    string // path, "" to look on PATH, "none" to skip the S3 rows
	cluster      bool   // run the gateway, pull storm, tag commit and S3 rows
	scale        bool   // run the scale measurement instead
	tags         int    // of the scale measurement
	runs         int
	keep         bool
	jsonFile     string
	profiles     string // directory for CPU profiles of the cluster's loads

	// serveCmd starts a Meridian node: the binary and the arguments that
	// come before serve's flags. serveEnv is added to its environment.
	// Tests point them at the test binary.
	serveCmd []string
	serveEnv []string
	// meridianCmd is the meridian binary and the arguments that come
	// before a subcommand, for the cluster's `serve` and `gateway`.
	meridianCmd []string
	// progress receives one line per step.
	progress io.Writer
}

const (
	benchRepo = "bench/blob"
	benchTag  = "bench"
)

// benchBlobs are the blobs of one run: runs distinct blobs for each kind of
// push (pushing a blob again would measure deduplication), the first
// monolithic one also being the disk test's file and the pulled blob.
type benchBlobs struct {
	mono, chunked []blobSpec
}

func newBenchBlobs(size int64, runs int) benchBlobs {
	var b benchBlobs
	for i := range runs {
		b.mono = append(b.mono, newBlobSpec(uint64(1+i), size))
		b.chunked = append(b.chunked, newBlobSpec(uint64(1001+i), size))
	}
	return b
}

// bench runs `meridian bench`: it starts a real node from this binary and
// measures push, pull and manifest-GET rates next to the limits of the same
// machine (disk, sha256, a static file server) and CNCF Distribution, and
// what authentication costs: manifest GETs with a bearer token next to
// anonymous ones, and the token endpoint's rate.
func bench(args []string) error {
	opts, err := parseBenchFlags(args)
	if err != nil {
		return err
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("bench: finding the meridian binary: %w", err)
	}
	opts.serveCmd = []string{exe, "serve"}
	opts.meridianCmd = []string{exe}
	opts.progress = os.Stderr

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		stop() // a second Ctrl-C kills at once; children die with us (Pdeathsig)
	}()

	run := runBench
	if opts.scale {
		run = runScale
	}
	rep, err := run(ctx, opts)
	if rep != nil {
		if err != nil {
			rep.Error = err.Error()
		}
		rep.writeTable(os.Stdout)
		if opts.jsonFile != "" {
			if jerr := rep.writeJSON(opts.jsonFile); jerr != nil {
				err = errors.Join(err, jerr)
			}
		}
	}
	if ctx.Err() != nil {
		return errors.New("bench: interrupted")
	}
	return err
}

func parseBenchFlags(args []string) (benchOptions, error) {
	opts := benchOptions{chunk: 16 << 20}
	fs := flag.NewFlagSet("meridian bench", flag.ContinueOnError)
	size := fs.String("size", "256MiB", "size of the pushed and pulled blob (suffixes KiB, MiB, GiB)")
	fs.DurationVar(&opts.duration, "duration", 10*time.Second, "how long the manifest GET load runs on each registry (on meridian: with a bearer token, and as long anonymously)")
	fs.IntVar(&opts.concurrency, "concurrency", 32, "concurrent clients of the manifest GET load")
	fs.IntVar(&opts.runs, "runs", 3, "repetitions of each disk test, push and pull; the median is reported")
	fs.StringVar(&opts.dir, "dir", ".", "directory whose filesystem holds every data dir and the disk test (a temp dir is made inside)")
	fs.StringVar(&opts.distribution, "distribution", "", `CNCF Distribution "registry" binary (default: from PATH; "none" skips it)`)
	fs.StringVar(&opts.nginx, "nginx", "", `nginx binary for the static file server (default: from PATH; "none" uses Go's http.FileServer)`)
	fs.StringVar(&opts.versitygw, "versitygw", "", `versitygw binary for the S3 rows (default: from PATH; "none" skips them)`)
	fs.BoolVar(&opts.cluster, "cluster", true, "also start a 3-node cluster and a gateway: gateway, pull storm, tag commit and S3 rows")
	fs.BoolVar(&opts.scale, "scale", false, "instead, fill one repository of a 3-node cluster with --tags tags and measure what grows with them")
	fs.IntVar(&opts.tags, "tags", 1_000_000, "tags of the --scale run")
	fs.BoolVar(&opts.keep, "keep", false, "keep the temp dir (data dirs, configs, server logs)")
	fs.StringVar(&opts.jsonFile, "json", "", "also write the results as JSON to this file")
	fs.StringVar(&opts.profiles, "profiles", "", "write CPU profiles (go tool pprof) of the gateway and its node during the cluster's manifest GET load, and of the leader and the follower during the tag commits, into this directory")
	if err := fs.Parse(args); err != nil {
		return opts, err
	}
	if fs.NArg() > 0 {
		return opts, fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	sz, err := node.ParseByteSize(*size)
	if err != nil {
		return opts, fmt.Errorf("--size: %w", err)
	}
	opts.size = int64(sz)
	switch {
	case opts.size <= 0:
		return opts, errors.New("--size must be positive")
	case opts.duration <= 0:
		return opts, errors.New("--duration must be positive")
	case opts.concurrency <= 0:
		return opts, errors.New("--concurrency must be positive")
	case opts.runs <= 0:
		return opts, errors.New("--runs must be positive")
	case opts.tags <= 0:
		return opts, errors.New("--tags must be positive")
	}
	return opts, nil
}

// findBinary resolves a --nginx / --distribution value: an explicit path, ""
// to search PATH for name, or "none". It returns "" and why when there is no
// binary to use.
func findBinary(flagValue, name string) (path, reason string) {
	switch flagValue {
	case "none":
		return "", "disabled with --" + map[string]string{"nginx": "nginx", "registry": "distribution", "versitygw": "versitygw"}[name] + "=none"
	case "":
		p, err := exec.LookPath(name)
		if err != nil {
			return "", name + " not found on PATH"
		}
		return p, ""
	}
	return flagValue, ""
}

func nginxVersion(bin string) string {
	out, _ := exec.Command(bin, "-v").CombinedOutput() // "nginx version: nginx/1.22.1"
	if _, v, ok := strings.Cut(strings.TrimSpace(string(out)), "nginx/"); ok {
		return v
	}
	return "(unknown version)"
}

func distributionVersion(bin string) string {
	out, _ := exec.Command(bin, "--version").CombinedOutput()
	f := strings.Fields(string(out)) // "registry github.com/distribution/distribution/v3 v3.1.2"
	if len(f) >= 3 {
		return f[2]
	}
	return strings.TrimSpace(string(out))
}

func mib(n int64) string {
	if n%(1<<20) == 0 {
		return fmt.Sprintf("%d MiB", n>>20)
	}
	return fmt.Sprintf("%d bytes", n)
}

// newBenchClient returns a client tuned for load generation: no proxy, no
// compression, enough idle connections for every worker to keep its own,
// and large socket buffers for blob bodies.
func newBenchClient(concurrency int) *http.Client {
	return &http.Client{
		Transport: &http.Transport{
			Proxy:               nil,
			MaxIdleConns:        2 * concurrency,
			MaxIdleConnsPerHost: 2 * concurrency,
			IdleConnTimeout:     90 * time.Second,
			DisableCompression:  true,
			ForceAttemptHTTP2:   false,
			WriteBufferSize:     256 << 10,
			ReadBufferSize:      64 << 10,
		},
		// Registries answer with absolute or relative Locations that the
		// workload follows itself; a redirect on GET is followed as usual.
	}
}

// benchEnvironment describes the run, for the JSON report.
type benchEnvironment struct {
	MeridianVersion string `json:"meridian_version"`
	GoVersion       string `json:"go_version"`
	OS              string `json:"os"`
	Arch            string `json:"arch"`
	CPUs            int    `json:"cpus"`
	Dir             string `json:"dir"`
	// LoadAvgStart and LoadAvgEnd are /proc/loadavg around the run: other
	// work on the machine skews every figure, the CPU-bound ones most.
	LoadAvgStart string `json:"loadavg_start,omitempty"`
	LoadAvgEnd   string `json:"loadavg_end,omitempty"`
}

func currentEnvironment(dir string) benchEnvironment {
	return benchEnvironment{MeridianVersion: version, GoVersion: runtime.Version(), OS: runtime.GOOS,
		Arch: runtime.GOARCH, CPUs: runtime.NumCPU(), Dir: dir, LoadAvgStart: loadAvg()}
}

func loadAvg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	return strings.TrimSpace(string(b))
}

// busy reports whether a load average line says the machine had more
// runnable work than CPUs over the last minute.
func busy(loadavg string, cpus int) bool {
	f := strings.Fields(loadavg)
	if len(f) == 0 {
		return false
	}
	l, err := strconv.ParseFloat(f[0], 64)
	return err == nil && l > float64(cpus)
}
