package main

// End-to-end tests of `meridian gateway`: three `meridian serve` processes,
// one per region, and a gateway process in front of them, all on
// 127.0.0.1:0 ports read from their ready files. The binary is the one
// e2e_test.go builds; the harness here takes a testing.TB so that the
// benchmarks in bench_gateway_test.go run the same processes. Identifiers
// start with gwe2e.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"github.com/meridian-registry/meridian/node/clustertest/admin"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/meridian-registry/meridian/node"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// gwe2eRegions are the cluster's regions, one node each (node i runs in
// region i); the gateway runs in the first.
var gwe2eRegions = []string{"us-east", "eu-west", "ap-south"}

// gwe2eMaxRSS bounds the gateway's peak resident memory while it streams a
// blob of any size: a gateway holding a blob would exceed it at once.
const gwe2eMaxRSS = 100 << 20

// gwe2eNeedBinary is e2eNeedBinary for tests and benchmarks alike: the same
// build, done once.
func gwe2eNeedBinary(tb testing.TB) {
	tb.Helper()
	if testing.Short() {
		tb.Skip("end-to-end test of the binary: skipped with -short")
	}
	e2eBuildOnce.Do(func() {
		if e2eDir, e2eBuildErr = os.MkdirTemp("", "meridian-e2e-"); e2eBuildErr != nil {
			return
		}
		e2eBinary, e2eBuildErr = e2eBuild(filepath.Join(e2eDir, "meridian"))
	})
	if e2eBuildErr != nil {
		tb.Fatalf("building meridian: %v", e2eBuildErr)
	}
}

// gwe2eStart runs the binary with args and a ready file named after the
// process in dir; see e2eStart.
func gwe2eStart(tb testing.TB, name, dir string, args ...string) *e2eProc {
	tb.Helper()
	ready := filepath.Join(dir, name+".ready.json")
	p := e2eStart(tb, ready, e2eEnv(), append(args, "--ready-file", ready)...)
	p.name = name
	return p
}

// peakRSS is the process's peak resident set size so far (VmHWM).
func (p *e2eProc) peakRSS() int64 {
	p.t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		p.t.Fatalf("%s: %v", p.name, err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				p.t.Fatalf("%s: VmHWM %q: %v", p.name, v, err)
			}
			return kb << 10
		}
	}
	p.t.Fatalf("%s: no VmHWM in /proc/%d/status", p.name, p.cmd.Process.Pid)
	return 0
}

// gwe2eCluster is three nodes, one per region, and a gateway in the first
// region, all sharing one region list.
type gwe2eCluster struct {
	tb       testing.TB
	dir      string
	adminEnv []string // MERIDIAN_TLS_* of the admin certificate, with TLS on
	regions  []string // --region-store flags, the same for every process
	nodes    []*e2eProc
	gw       *e2eProc
}

// gwe2eStartCluster starts the nodes (the first bootstraps, the others join
// its gossip address), then the gateway, and waits until the gateway has
// measured every node.
func gwe2eStartCluster(tb testing.TB) *gwe2eCluster {
	tb.Helper()
	return gwe2eStartClusterTLS(tb, false)
}

// gwe2eStartClusterTLS is gwe2eStartCluster, with mtls the members running
// mutual TLS and encrypted gossip under a CA made by meridian ca.
func gwe2eStartClusterTLS(tb testing.TB, mtls bool) *gwe2eCluster {
	tb.Helper()
	gwe2eNeedBinary(tb)
	c := &gwe2eCluster{tb: tb, dir: tb.TempDir()}
	for _, r := range gwe2eRegions {
		c.regions = append(c.regions, "--region-store", r+"=file://"+filepath.Join(c.dir, "blobs", r))
	}
	common := slices.Concat(c.regions, []string{"--cluster-id", "gwe2e", "--gossip-profile", "local"})
	tlsFor := func(string) []string { return nil }
	if mtls {
		pkiDir := filepath.Join(c.dir, "pki")
		e2eMeridian(tb, "ca", "init", "--dir", pkiDir, "--cluster-id", "gwe2e")
		for id, role := range map[string]string{"n0": "node", "n1": "node", "n2": "node", "gateway": "gateway", "ops": "admin"} {
			e2eMeridian(tb, "ca", "issue", "--dir", pkiDir, "--role", role, "--id", id)
		}
		common = append(common, "--gossip-key-file", filepath.Join(pkiDir, "gossip.key"))
		tlsFor = func(id string) []string {
			return []string{"--tls-ca", filepath.Join(pkiDir, "ca.crt"), "--tls-cert", filepath.Join(pkiDir, id+".crt"), "--tls-key", filepath.Join(pkiDir, id+".key")}
		}
		c.adminEnv = []string{"MERIDIAN_TLS_CA=" + filepath.Join(pkiDir, "ca.crt"),
			"MERIDIAN_TLS_CERT=" + filepath.Join(pkiDir, "ops.crt"), "MERIDIAN_TLS_KEY=" + filepath.Join(pkiDir, "ops.key")}
	}
	for i, region := range gwe2eRegions {
		id := fmt.Sprintf("n%d", i)
		args := slices.Concat([]string{"serve", "--node-id", id, "--region", region,
			"--data-dir", filepath.Join(c.dir, id)}, e2eLoopback, common, tlsFor(id))
		if i > 0 {
			args = append(args, "--join", c.nodes[0].ready.GossipAddr)
		}
		p := gwe2eStart(tb, id, c.dir, args...)
		if i == 0 {
			p.waitWritten() // the others need its gossip address
		}
		c.nodes = append(c.nodes, p)
	}
	for _, p := range c.nodes {
		p.waitWritten()
		p.waitReady()
	}
	c.gw = gwe2eStart(tb, "gateway", c.dir, slices.Concat([]string{"gateway", "--gateway-id", "gateway", "--region", gwe2eRegions[0],
		"--http-addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0", "--join", c.nodes[0].ready.GossipAddr}, common, tlsFor("gateway"))...)
	c.gw.waitWritten()
	c.gw.waitReady()
	c.gw.poll("every node measured", time.Minute, func() error {
		st, err := c.gatewayStatus()
		if err != nil {
			return err
		}
		return everyNodeMeasured(st, len(c.nodes))
	})
	return c
}

// gatewayStatus is the gateway's view of the nodes (its GET /status).
func (c *gwe2eCluster) gatewayStatus() (*pb.GatewayStatus, error) {
	return fetchGatewayStatus(context.Background(), c.gw.url(""))
}

// preferred is the node the gateway sends metadata reads to now.
func (c *gwe2eCluster) preferred() *e2eProc {
	c.tb.Helper()
	st, err := c.gatewayStatus()
	if err != nil {
		c.tb.Fatal(err)
	}
	for _, p := range c.nodes {
		if p.ready.NodeID == st.PreferredNode {
			return p
		}
	}
	c.tb.Fatalf("the gateway prefers %q, which is none of the nodes", st.PreferredNode)
	return nil
}

// meridian runs a short-lived meridian command (cluster status, …) and
// returns its stdout and stderr.
func (c *gwe2eCluster) meridian(args ...string) (stdout, stderr string, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, e2eBinary, args...)
	cmd.Env = e2eEnv(c.adminEnv...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err = cmd.Run()
	return out.String(), errOut.String(), err
}

// waitReplicated waits until no region misses a blob, so that background
// copies do not compete with what a benchmark measures.
func (c *gwe2eCluster) waitReplicated(d time.Duration) {
	c.tb.Helper()
	c.nodes[0].poll("every region holds every blob", d, func() error {
		out, stderr, err := c.meridian("cluster", "status", "--json", "--addr", c.nodes[0].ready.GRPCAddr)
		if err != nil {
			return fmt.Errorf("cluster status: %v: %s", err, stderr)
		}
		st := &pb.ClusterStatusResponse{}
		if err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal([]byte(out), st); err != nil {
			return err
		}
		for _, r := range st.Regions {
			if r.MissingBlobs > 0 {
				return fmt.Errorf("region %s misses %d blobs", r.Region, r.MissingBlobs)
			}
		}
		return nil
	})
}

// gwe2eClient is an HTTP client of its own, so that its connections are
// its own to close.
func gwe2eClient() *http.Client {
	return &http.Client{Transport: admin.Transport(&http.Transport{Proxy: nil, MaxIdleConnsPerHost: 128, DisableCompression: true})}
}

// gwe2eBlobDigest hashes the size bytes of the stream seed, without holding
// them.
func gwe2eBlobDigest(tb testing.TB, seed uint64, size int64) string {
	tb.Helper()
	h := sha256.New()
	if _, err := io.CopyN(h, e2eStream(seed), size); err != nil {
		tb.Fatal(err)
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil))
}

// gwe2ePushBlob pushes the size bytes of the stream seed to repo on base in
// one POST ?digest= (a monolithic upload), read from the generator as the
// request goes.
func gwe2ePushBlob(ctx context.Context, client *http.Client, base, repo, digest string, seed uint64, size int64) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v2/"+repo+"/blobs/uploads/?digest="+digest,
		io.LimitReader(e2eStream(seed), size))
	if err != nil {
		return err
	}
	req.ContentLength = size
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("push %s to %s: %w", digest, base, err)
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<10))
	if resp.StatusCode != http.StatusCreated {
		return fmt.Errorf("push %s to %s: %s: %s", digest, base, resp.Status, msg)
	}
	return nil
}

// gwe2eGetBlob GETs a blob from base and checks its length; with verify it
// also hashes the bytes against digest (the caller's CPU is then part of
// the measurement).
func gwe2eGetBlob(ctx context.Context, client *http.Client, base, repo, digest string, size int64, verify bool) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/v2/"+repo+"/blobs/"+digest, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("GET %s from %s: %w", digest, base, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<10))
		return fmt.Errorf("GET %s from %s: %s: %s", digest, base, resp.Status, msg)
	}
	var w io.Writer = io.Discard
	h := sha256.New()
	if verify {
		w = h
	}
	n, err := io.Copy(w, resp.Body)
	if err != nil {
		return fmt.Errorf("GET %s from %s: after %d bytes: %w", digest, base, n, err)
	}
	if n != size {
		return fmt.Errorf("GET %s from %s: %d bytes, want %d", digest, base, n, size)
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); verify && got != digest {
		return fmt.Errorf("GET %s from %s: the bytes hash to %s", digest, base, got)
	}
	return nil
}

// gwe2eTransferTimeout bounds moving size bytes once: generous for a slow
// or race-instrumented build, finite for a hung one.
func gwe2eTransferTimeout(size int64) time.Duration {
	return 2*time.Minute + time.Duration(size/(5<<20))*time.Second
}

// gwe2eRaceBuild reports whether this test binary, and so the server it
// built, runs with the race detector, which multiplies memory use.
func gwe2eRaceBuild() bool {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range bi.Settings {
		if s.Key == "-race" && s.Value == "true" {
			return true
		}
	}
	return false
}

// The gateway process serves pushes and pulls in front of a three-region
// cluster, shows up in `meridian cluster status` with the node it prefers,
// refuses bad command lines with a message, and stops cleanly on SIGTERM.
func TestGatewayBinary(t *testing.T) {
	gwe2eNeedBinary(t)
	t.Run("bad command line", func(t *testing.T) {
		dir := t.TempDir()
		store := []string{"--region-store", "us-east=file://" + dir}
		loopback := []string{"--http-addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0"}
		gateway := func(extra ...string) []string {
			return slices.Concat([]string{"gateway"}, loopback, extra)
		}
		cases := []struct {
			name string
			args []string
			want []string // all must appear on stderr
		}{
			{"unknown flag", gateway("--no-such-flag"), []string{"flag provided but not defined", "-no-such-flag"}},
			{"missing join", gateway(slices.Concat(store, []string{"--region", "us-east"})...), []string{"invalid gateway configuration", "join", "gossip address"}},
			{"missing regions", gateway("--join", "127.0.0.1:1"), []string{"regions", "stores"}},
			{"region not configured", gateway(slices.Concat(store, []string{"--join", "127.0.0.1:1", "--region", "mars"})...), []string{`region "mars"`}},
			{"bad gossip profile", gateway(slices.Concat(store, []string{"--join", "127.0.0.1:1", "--gossip-profile", "fast"})...), []string{`gossip_profile "fast"`}},
			{"stray argument", gateway("extra"), []string{"unexpected arguments: extra"}},
		}
		for _, c := range cases {
			t.Run(c.name, func(t *testing.T) {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				cmd := exec.CommandContext(ctx, e2eBinary, c.args...)
				cmd.Env = e2eEnv()
				var stderr bytes.Buffer
				cmd.Stderr = &stderr
				err := cmd.Run()
				var exit *exec.ExitError
				if !errors.As(err, &exit) || exit.ExitCode() <= 0 {
					t.Fatalf("meridian %s: %v, want a non-zero exit status\n%s", strings.Join(c.args, " "), err, stderr.String())
				}
				msg := stderr.String()
				for _, w := range c.want {
					if !strings.Contains(msg, w) {
						t.Errorf("stderr does not mention %q:\n%s", w, msg)
					}
				}
				if strings.Contains(msg, "goroutine ") || strings.Contains(msg, "panic:") {
					t.Errorf("stderr shows a crash:\n%s", msg)
				}
			})
		}
	})

	c := gwe2eStartCluster(t)
	img, err := random.Image(256<<10, 3)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(c.gw.ref("gw/app:v1"), img); err != nil {
		t.Fatalf("push through the gateway: %v", err)
	}
	e2eCheckImage(t, c.gw.ref("gw/app:v1"), img)
	for _, p := range c.nodes {
		e2eCheckImage(t, p.ref("gw/app:v1"), img)
	}

	// Gossip carries the gateway to the nodes within a few rounds; the node
	// asks the gateway for its view when asked for the status.
	gwID := c.gw.ready.GatewayID
	prefers := regexp.MustCompile(`(?m)^gateway ` + regexp.QuoteMeta(gwID) + ` \(region us-east\) prefers (n[0-9]):$`)
	member := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(gwID) + `\s+us-east\s+gateway\s`)
	var status string
	c.gw.poll("cluster status lists the gateway", 30*time.Second, func() error {
		out, stderr, err := c.meridian("cluster", "status", "--addr", c.nodes[0].ready.GRPCAddr)
		if err != nil {
			return fmt.Errorf("%v: %s", err, stderr)
		}
		status = out
		if !member.MatchString(out) || !prefers.MatchString(out) {
			return fmt.Errorf("no gateway %s with its preferred node in:\n%s", gwID, out)
		}
		return nil
	})
	t.Logf("meridian cluster status:\n%s", status)
	// Below that line, the gateway lists every node it routes to.
	section, _, _ := strings.Cut(status[prefers.FindStringIndex(status)[1]:], "\n\n")
	for _, p := range c.nodes {
		row := regexp.MustCompile(`(?m)^\s+` + p.ready.NodeID + `\s+` + p.ready.Region + `\s+\S+\s+true$`)
		if !row.MatchString(section) {
			t.Errorf("the gateway's view does not list node %s as healthy:\n%s", p.ready.NodeID, section)
		}
	}

	c.gw.stop()
	// The nodes serve on without it.
	e2eCheckImage(t, c.nodes[1].ref("gw/app:v1"), img)
}

// The gateway streams a blob through without holding it: pushed in one
// request from a generator and read back whole, its peak RSS stays under
// 100 MiB. MERIDIAN_GATEWAY_MEM_BLOB sets the blob's size (default 256MiB).
func TestGatewayStreamMemory(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("reads the gateway's peak RSS from /proc")
	}
	size := gwe2eMemBlobSize(t, 256<<20)
	c := gwe2eStartCluster(t)
	peak, push, pull := gwe2eStream(t, c, size, false)
	t.Logf("%d MiB through the gateway: push %.0f MB/s, GET %.0f MB/s, gateway peak RSS %d MiB",
		size>>20, push, pull, peak>>20)
	switch {
	case gwe2eRaceBuild():
		t.Logf("race build: the %d MiB bound is not checked", gwe2eMaxRSS>>20)
	case peak >= gwe2eMaxRSS:
		t.Errorf("gateway peak RSS %d MiB after streaming %d MiB, want under %d MiB", peak>>20, size>>20, gwe2eMaxRSS>>20)
	}
	c.gw.stop()
}

// gwe2eMemBlobSize is MERIDIAN_GATEWAY_MEM_BLOB (a byte count such as
// 256MiB or 2GiB), or def.
func gwe2eMemBlobSize(tb testing.TB, def int64) int64 {
	tb.Helper()
	v := os.Getenv("MERIDIAN_GATEWAY_MEM_BLOB")
	if v == "" {
		return def
	}
	n, err := node.ParseByteSize(v)
	if err != nil || n <= 0 {
		tb.Fatalf("MERIDIAN_GATEWAY_MEM_BLOB=%q: want a positive byte count such as 256MiB (%v)", v, err)
	}
	return int64(n)
}

// gwe2eStream pushes a blob of size bytes through the gateway in one
// request, then GETs it back through the gateway and checks its bytes; it
// returns the gateway's peak RSS after both and the MB/s of each. With
// settle it waits for the other regions' copies before the GET.
func gwe2eStream(tb testing.TB, c *gwe2eCluster, size int64, settle bool) (peak int64, pushMBps, pullMBps float64) {
	tb.Helper()
	const repo, seed = "gw/big", 42
	digest := gwe2eBlobDigest(tb, seed, size)
	tb.Logf("gateway RSS before the transfers: peak %d MiB", c.gw.peakRSS()>>20)
	client := gwe2eClient()
	defer client.CloseIdleConnections()

	ctx, cancel := context.WithTimeout(context.Background(), gwe2eTransferTimeout(size))
	defer cancel()
	start := time.Now()
	if err := gwe2ePushBlob(ctx, client, c.gw.url(""), repo, digest, seed, size); err != nil {
		tb.Fatal(err)
	}
	pushMBps = float64(size) / 1e6 / time.Since(start).Seconds()
	if settle {
		c.waitReplicated(gwe2eTransferTimeout(size))
	}

	ctx, cancel = context.WithTimeout(context.Background(), gwe2eTransferTimeout(size))
	defer cancel()
	start = time.Now()
	if err := gwe2eGetBlob(ctx, client, c.gw.url(""), repo, digest, size, true); err != nil {
		tb.Fatal(err)
	}
	pullMBps = float64(size) / 1e6 / time.Since(start).Seconds()
	return c.gw.peakRSS(), pushMBps, pullMBps
}
