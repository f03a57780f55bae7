package main

// A closed-loop manifest GET by tag through a real `meridian gateway` in
// front of three real `meridian serve` processes (the harness of
// gateway_e2e_test.go), next to the node the gateway prefers: the
// throughput each serves to mfbenchClients clients that each send their
// next request as soon as the last one is answered, on a keep-alive
// connection of their own. Run with -benchtime 1x.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

const (
	// mfbenchClients is how many clients GET at once.
	mfbenchClients = 32
	// mfbenchSlice is how long one target is loaded at a time; the targets
	// take turns mfbenchRounds times, so that drift on a shared machine
	// touches both alike.
	mfbenchSlice  = 5 * time.Second
	mfbenchRounds = 3
	mfbenchAccept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
)

// BenchmarkManifestClosedLoop reports the gateway's and the node's manifest
// GETs by tag per second with mfbenchClients closed-loop clients, each
// with a pull token, and their ratio; with cluster TLS off and on.
//
// MERIDIAN_BENCH_PERF_DIR, when set, records a CPU profile of the gateway
// and of the node with `perf record` during the first round of each, into
// that directory (read with `perf report -i FILE --no-children`).
func BenchmarkManifestClosedLoop(b *testing.B) {
	for _, mtls := range []bool{false, true} {
		b.Run(fmt.Sprintf("mtls=%v", mtls), func(b *testing.B) { benchManifestClosedLoop(b, mtls) })
	}
}

func benchManifestClosedLoop(b *testing.B, mtls bool) {
	c := gwe2eStartClusterTLS(b, mtls)
	img, err := random.Image(4<<10, 2)
	if err != nil {
		b.Fatal(err)
	}
	if err := remote.Write(c.gw.ref("bench/app:latest"), img); err != nil {
		b.Fatalf("push through the gateway: %v", err)
	}
	manifest, err := img.RawManifest()
	if err != nil {
		b.Fatal(err)
	}
	c.waitReplicated(time.Minute)
	nodeProc := c.preferred()
	b.Logf("the gateway prefers %s (region %s)", nodeProc.ready.NodeID, nodeProc.ready.Region)

	type target struct {
		name  string
		proc  *e2eProc
		url   string
		auth  string
		count int64
		secs  float64
	}
	targets := []*target{{name: "gateway", proc: c.gw}, {name: "node", proc: nodeProc}}
	for _, t := range targets {
		t.url = t.proc.url("/v2/bench/app/manifests/latest")
		tok, err := mfbenchToken(t.proc.url("/auth/token?scope=repository:bench/app:pull"))
		if err != nil {
			b.Fatalf("%s: %v", t.name, err)
		}
		t.auth = "Bearer " + tok
		// Warm-up: connections, caches, the token's verification.
		if _, err := mfbenchLoop(t.url, t.auth, len(manifest), time.Second); err != nil {
			b.Fatalf("%s: warm-up: %v", t.name, err)
		}
	}
	perfDir := os.Getenv("MERIDIAN_BENCH_PERF_DIR")
	b.ResetTimer()
	for round := range mfbenchRounds {
		for _, t := range targets {
			var stop func()
			if perfDir != "" && round == 0 {
				stop = mfbenchPerf(b, perfDir, fmt.Sprintf("%s-mtls=%v", t.name, mtls), t.proc, nodeProc, t.name == "gateway")
			}
			n, err := mfbenchLoop(t.url, t.auth, len(manifest), mfbenchSlice)
			if stop != nil {
				stop()
			}
			if err != nil {
				b.Fatalf("%s: %v", t.name, err)
			}
			t.count += n
			t.secs += mfbenchSlice.Seconds()
			b.Logf("round %d: %s %.0f/s (load %s)", round, t.name, float64(n)/mfbenchSlice.Seconds(), mfbenchLoadAvg())
		}
	}
	b.StopTimer()
	if shared, err := mfbenchMetric(c.gw.url("/metrics"), "meridian_gateway_upstream_shared_manifest_reads_total"); err == nil {
		b.Logf("gateway: %.0f manifest GETs (warm-up included) shared a node read; %d measured", shared, targets[0].count)
	}
	gw, nd := float64(targets[0].count)/targets[0].secs, float64(targets[1].count)/targets[1].secs
	b.ReportMetric(gw, "gw-req/s")
	b.ReportMetric(nd, "node-req/s")
	b.ReportMetric(gw/nd, "gw/node")
	b.ReportMetric(0, "ns/op")
}

// mfbenchLoop runs mfbenchClients closed-loop clients against url for d,
// each on its own keep-alive connection, and returns the 200s counted. Any
// other answer fails the run.
func mfbenchLoop(url, authorization string, wantLen int, d time.Duration) (int64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var (
		ok       atomic.Int64
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	for range mfbenchClients {
		tr := &http.Transport{Proxy: nil, MaxConnsPerHost: 1, MaxIdleConnsPerHost: 1, DisableCompression: true}
		client := &http.Client{Transport: tr}
		wg.Go(func() {
			defer tr.CloseIdleConnections()
			buf := make([]byte, wantLen+1)
			for ctx.Err() == nil {
				err := mfbenchGet(ctx, client, url, authorization, buf, wantLen)
				switch {
				case err == nil:
					ok.Add(1)
				case ctx.Err() == nil:
					errOnce.Do(func() { firstErr = err })
					cancel()
				}
			}
		})
	}
	wg.Wait()
	return ok.Load(), firstErr
}

func mfbenchGet(ctx context.Context, client *http.Client, url, authorization string, buf []byte, wantLen int) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", mfbenchAccept)
	req.Header.Set("Authorization", authorization)
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	n, err := io.ReadFull(resp.Body, buf)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s: %s", url, resp.Status, buf[:n])
	}
	if err != io.ErrUnexpectedEOF || n != wantLen {
		return fmt.Errorf("GET %s: %d bytes (%v), want %d", url, n, err, wantLen)
	}
	return nil
}

// mfbenchToken fetches a token from a member's token endpoint as the
// harness's admin (the default transport logs in).
func mfbenchToken(url string) (string, error) {
	resp, err := http.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var tok struct {
		Token string `json:"token"`
	}
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<10))
		return "", fmt.Errorf("GET %s: %s: %s", url, resp.Status, msg)
	}
	if err := json.NewDecoder(resp.Body).Decode(&tok); err != nil || tok.Token == "" {
		return "", fmt.Errorf("GET %s: no token (%v)", url, err)
	}
	return tok.Token, nil
}

// mfbenchPerf records the CPU of proc (and, when both, of node too) with
// perf until the returned function is called.
func mfbenchPerf(b *testing.B, dir, name string, proc, node *e2eProc, both bool) func() {
	procs := []*e2eProc{proc}
	if both && node != proc {
		procs = append(procs, node)
	}
	var cmds []*exec.Cmd
	for _, p := range procs {
		out := filepath.Join(dir, name+"-"+p.name+".perf.data")
		cmd := exec.Command("perf", "record", "-F", "999", "-g", "-o", out, "-p", strconv.Itoa(p.cmd.Process.Pid))
		cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
		if err := cmd.Start(); err != nil {
			b.Logf("perf: %v", err)
			continue
		}
		cmds = append(cmds, cmd)
	}
	return func() {
		for _, cmd := range cmds {
			cmd.Process.Signal(os.Interrupt)
			cmd.Wait()
		}
	}
}

// mfbenchMetric reads an unlabelled sample from a Prometheus text page.
func mfbenchMetric(url, name string) (float64, error) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			return strconv.ParseFloat(strings.TrimSpace(v), 64)
		}
	}
	return 0, fmt.Errorf("%s: no %s", url, name)
}

func mfbenchLoadAvg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	return string(b[:min(len(b), 14)])
}
