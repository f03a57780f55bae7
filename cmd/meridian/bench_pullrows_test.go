package main

// Blob pulls from one node next to their references, each measured in the
// same run, alternating rounds so that load from elsewhere on the machine
// falls on every side alike:
//
//   - BenchmarkNodePullFile: a 256 MiB blob from a node with a file://
//     store, from CNCF Distribution (MERIDIAN_DISTRIBUTION) and from nginx
//     (on PATH), each body hashed as `meridian bench` does.
//   - BenchmarkNodePullS3: the same blob from a node whose region is an S3
//     store (MERIDIAN_VERSITYGW), next to a single GET of its data object
//     straight from the store with minio-go; both bodies discarded.
//
// Run with -benchtime 1x; PULLROWS_ROUNDS sets the rounds (default 5). The
// server processes' pids are logged, for strace or perf during a run.

import (
	"context"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/meridian-registry/meridian/replication/s3test"
)

const pullRowsSize = 256 << 20

func pullRowsRounds() int {
	if n, err := strconv.Atoi(os.Getenv("PULLROWS_ROUNDS")); err == nil && n > 0 {
		return n
	}
	return 5
}

// pullRowsNode starts a node from the test binary with env added, and
// returns it with a client logged in as its admin.
func pullRowsNode(b *testing.B, dir string, env ...string) (*meridianNode, *http.Client) {
	b.Helper()
	n, err := startMeridian(b.Context(), []string{os.Args[0], "-test.run=^TestBenchServeHelper$", "--"},
		append([]string{"BENCH_HELPER_SERVE=1"}, env...), dir)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { n.proc.stop() })
	b.Logf("meridian pid %d at %s", n.proc.cmd.Process.Pid, n.base)
	c := newBenchClient(1)
	c.Transport = newBenchAuth(n).wrap(c.Transport)
	return n, c
}

// pullRowsTarget is one side of a comparison: a name and one timed pull.
type pullRowsTarget struct {
	name string
	pull func(ctx context.Context) (time.Duration, error)
	proc *process // the server, whose CPU time per pull is reported; nil: none
	mbps []float64
	cpu  []float64 // server CPU seconds per GB pulled
}

// pullRowsRun alternates the targets' pulls for the rounds and reports
// each one's median MB/s and its ratio to the last target's.
func pullRowsRun(b *testing.B, targets []*pullRowsTarget) {
	b.Helper()
	ctx := b.Context()
	for _, t := range targets { // warm the page cache and the connections
		if _, err := t.pull(ctx); err != nil {
			b.Fatalf("%s: %v", t.name, err)
		}
	}
	load, _ := os.ReadFile("/proc/loadavg")
	for range pullRowsRounds() {
		for _, t := range targets {
			var cpu0 time.Duration
			if t.proc != nil {
				cpu0 = t.proc.cpuTime()
			}
			d, err := t.pull(ctx)
			if err != nil {
				b.Fatalf("%s: %v", t.name, err)
			}
			t.mbps = append(t.mbps, float64(pullRowsSize)/1e6/d.Seconds())
			if t.proc != nil {
				t.cpu = append(t.cpu, (t.proc.cpuTime()-cpu0).Seconds()/(float64(pullRowsSize)/1e9))
			}
		}
	}
	ref := gwbenchMedian(targets[len(targets)-1].mbps)
	for _, t := range targets {
		m := gwbenchMedian(t.mbps)
		b.ReportMetric(m, t.name+"-MB/s")
		b.Logf("%-14s median %6.0f MB/s (%.2f of %s), runs %v", t.name, m, m/ref, targets[len(targets)-1].name, roundAll(t.mbps))
		if len(t.cpu) > 0 {
			b.Logf("%-14s server CPU %.3f s/GB (median), runs %.3f", t.name, gwbenchMedian(t.cpu), t.cpu)
		}
	}
	b.Logf("load average before: %s", strings.TrimSpace(string(load)))
}

func roundAll(xs []float64) []int {
	out := make([]int, len(xs))
	for i, x := range xs {
		out[i] = int(x + 0.5)
	}
	return out
}

func BenchmarkNodePullFile(b *testing.B) {
	dir := b.TempDir()
	ctx := b.Context()
	blob := newBlobSpec(1, pullRowsSize)
	n, c := pullRowsNode(b, filepath.Join(dir, "meridian"))
	if _, err := pushMonolithic(ctx, c, n.base, blob, true); err != nil {
		b.Fatal(err)
	}
	url := n.base + "/v2/" + benchRepo + "/blobs/" + blob.digest
	targets := []*pullRowsTarget{{name: "meridian", proc: n.proc, pull: func(ctx context.Context) (time.Duration, error) {
		return pullOnce(ctx, c, url, blob)
	}}}

	if bin, err := exec.LookPath("nginx"); err == nil {
		docroot := filepath.Join(dir, "www")
		os.MkdirAll(docroot, 0o755)
		f, err := os.Create(filepath.Join(docroot, "blob"))
		if err != nil {
			b.Fatal(err)
		}
		if _, err := io.Copy(f, blob.reader()); err != nil {
			b.Fatal(err)
		}
		f.Close()
		p, addr, err := startNginx(ctx, bin, filepath.Join(dir, "nginx"), docroot)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { p.stop() })
		nc := newBenchClient(1)
		targets = append(targets, &pullRowsTarget{name: "nginx", proc: p, pull: func(ctx context.Context) (time.Duration, error) {
			return pullOnce(ctx, nc, "http://"+addr+"/blob", blob)
		}})
	}
	if bin := os.Getenv("MERIDIAN_DISTRIBUTION"); bin != "" {
		p, base, err := startDistribution(ctx, bin, filepath.Join(dir, "distribution"))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { p.stop() })
		b.Logf("distribution pid %d", p.cmd.Process.Pid)
		dc := newBenchClient(1)
		if _, err := pushMonolithic(ctx, dc, base, blob, false); err != nil {
			b.Fatal(err)
		}
		targets = append(targets, &pullRowsTarget{name: "distribution", proc: p, pull: func(ctx context.Context) (time.Duration, error) {
			return pullOnce(ctx, dc, base+"/v2/"+benchRepo+"/blobs/"+blob.digest, blob)
		}})
	}
	pullRowsRun(b, targets)
}

func BenchmarkNodePullS3(b *testing.B) {
	if os.Getenv("MERIDIAN_VERSITYGW") == "" {
		b.Skip("MERIDIAN_VERSITYGW is not set")
	}
	ctx := b.Context()
	srv := s3test.Start(b)
	srv.CreateBucket(b, "pull")
	blob := newBlobSpec(2, pullRowsSize)
	n, c := pullRowsNode(b, filepath.Join(b.TempDir(), "meridian"), "MERIDIAN_REGION_STORE=local="+srv.URL("pull")+"&path_style=true")
	if _, err := pushMonolithic(ctx, c, n.base, blob, true); err != nil {
		b.Fatal(err)
	}
	mc := srv.Client(b)
	var data []string
	for o := range mc.ListObjects(ctx, "pull", minio.ListObjectsOptions{Prefix: "data/", Recursive: true}) {
		if o.Err != nil {
			b.Fatal(o.Err)
		}
		if o.Size == pullRowsSize {
			data = append(data, o.Key)
		}
	}
	if len(data) != 1 {
		b.Fatalf("want one data object of the blob's size, found %v", data)
	}
	url := n.base + "/v2/" + benchRepo + "/blobs/" + blob.digest
	discard := func(ctx context.Context, get func() (io.ReadCloser, error)) (time.Duration, error) {
		start := time.Now()
		body, err := get()
		if err != nil {
			return 0, err
		}
		defer body.Close()
		n, err := io.Copy(io.Discard, body)
		if err == nil && n != pullRowsSize {
			err = io.ErrUnexpectedEOF
		}
		return time.Since(start), err
	}
	b.Logf("versitygw at %s", srv.Endpoint())
	pullRowsRun(b, []*pullRowsTarget{
		{name: "meridian", proc: n.proc, pull: func(ctx context.Context) (time.Duration, error) {
			return discard(ctx, func() (io.ReadCloser, error) {
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
				resp, err := c.Do(req)
				if err != nil {
					return nil, err
				}
				if resp.StatusCode != http.StatusOK {
					resp.Body.Close()
					return nil, statusError("pull", resp)
				}
				return resp.Body, nil
			})
		}},
		{name: "s3-get", pull: func(ctx context.Context) (time.Duration, error) {
			return discard(ctx, func() (io.ReadCloser, error) {
				return mc.GetObject(ctx, "pull", data[0], minio.GetObjectOptions{})
			})
		}},
	})
}
