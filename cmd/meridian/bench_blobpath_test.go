package main

// Benchmarks of the gateway's blob read path from file:// regions (reached
// through a node of the region over gRPC): one 256 MiB GET through the
// gateway next to the same GET from the node it fronts, and a pull storm of
// 64 clients GETting one 64 MiB blob at once through the gateway. Run with
// -benchtime 1x: each is one measured run, whatever b.N.

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"
)

const (
	blobpathSize      = 256 << 20
	blobpathStormSize = 64 << 20
	blobpathStormN    = 64
)

// blobpathRounds is how many GETs each target gets, alternating;
// BENCH_BLOBPATH_ROUNDS raises it (to attach a profiler).
func blobpathRounds() int {
	if n, err := strconv.Atoi(os.Getenv("BENCH_BLOBPATH_ROUNDS")); err == nil && n > 0 {
		return n
	}
	return 3
}

// BenchmarkGatewayBlobPath reports, with cluster TLS off and on, the MB/s of
// a 256 MiB blob GET from the node the gateway prefers and through: the
// default gateway (blob cached; cold: the first GET of fresh blobs), a
// gateway without cache (every byte through a node over gRPC), and one that
// shares its region's directory; then the aggregate MB/s of 64 clients
// GETting one 64 MiB blob at once through the gateway and from the node.
func BenchmarkGatewayBlobPath(b *testing.B) {
	for _, mtls := range []bool{false, true} {
		b.Run(fmt.Sprintf("mtls=%v", mtls), func(b *testing.B) { benchGatewayBlobPath(b, mtls) })
	}
}

func benchGatewayBlobPath(b *testing.B, mtls bool) {
	c := gwe2eStartClusterTLS(b, mtls)
	nodeProc := c.preferred()
	b.Logf("gateway pid %d; preferred node %s pid %d", c.gw.cmd.Process.Pid, nodeProc.ready.NodeID, nodeProc.cmd.Process.Pid)
	client := gwe2eClient()
	defer client.CloseIdleConnections()
	rounds := blobpathRounds()

	const repo = "bench/blobpath"
	digest := gwe2eBlobDigest(b, 71, blobpathSize)
	// Fresh blobs, each read once through the cached gateway: its cold path.
	var coldDigests []string
	for i := range rounds {
		d := gwe2eBlobDigest(b, uint64(80+i), blobpathSize)
		if err := gwe2ePushBlob(context.Background(), client, c.gw.url(""), repo, d, uint64(80+i), blobpathSize); err != nil {
			b.Fatal(err)
		}
		coldDigests = append(coldDigests, d)
	}
	stormDigest := gwe2eBlobDigest(b, 72, blobpathStormSize)
	ctx, cancel := context.WithTimeout(context.Background(), gwe2eTransferTimeout(blobpathSize*int64(8+5*rounds)))
	defer cancel()
	if err := gwe2ePushBlob(ctx, client, c.gw.url(""), repo, digest, 71, blobpathSize); err != nil {
		b.Fatal(err)
	}
	if err := gwe2ePushBlob(ctx, client, c.gw.url(""), repo, stormDigest, 72, blobpathStormSize); err != nil {
		b.Fatal(err)
	}
	c.waitReplicated(gwe2eTransferTimeout(blobpathSize))

	b.ResetTimer()
	getBlob := func(base, digest string) float64 {
		start := time.Now()
		if err := gwe2eGetBlob(ctx, client, base, repo, digest, blobpathSize, false); err != nil {
			b.Fatal(err)
		}
		return blobpathSize / 1e6 / time.Since(start).Seconds()
	}
	get := func(base string) float64 { return getBlob(base, digest) }
	// Two more gateways: one that mounts its region's directory as the
	// region's nodes do (--share-region-directory), and one reading through
	// a node with no cache; neither caches.
	shared := blobpathGateway(b, c, mtls, "gateway-shared", "--share-region-directory", "--blob-cache", "0")
	direct := blobpathGateway(b, c, mtls, "gateway-direct", "--blob-cache", "0")

	var gw, node, sharedGW, directGW, cold []float64
	get(c.gw.url("")) // fills the cache with it
	if dir := os.Getenv("BENCH_BLOBPATH_PERF_DIR"); dir != "" {
		// Profile the gateway and its node (perf) and count the gateway's
		// syscalls (strace -c) over three GETs through the gateway, of the
		// cached blob or, with BENCH_BLOBPATH_PERF_COLD set, of fresh ones
		// (which the cold figure then reads from the cache).
		tag := fmt.Sprintf("mtls=%v", mtls)
		gwPid, nodePid := strconv.Itoa(c.gw.cmd.Process.Pid), strconv.Itoa(nodeProc.cmd.Process.Pid)
		tools := []*exec.Cmd{
			exec.Command("perf", "record", "-F", "999", "-g", "-o", filepath.Join(dir, "gw-"+tag+".data"), "-p", gwPid),
			exec.Command("perf", "record", "-F", "999", "-g", "-o", filepath.Join(dir, "node-"+tag+".data"), "-p", nodePid),
			exec.Command("strace", "-c", "-f", "-o", filepath.Join(dir, "strace-gw-"+tag+".txt"), "-p", gwPid),
		}
		for _, t := range tools {
			if err := t.Start(); err != nil {
				b.Fatal(err)
			}
		}
		time.Sleep(time.Second)
		for i := range 3 {
			d := digest
			if os.Getenv("BENCH_BLOBPATH_PERF_COLD") != "" {
				d = coldDigests[i%len(coldDigests)]
			}
			b.Logf("profiled GET through the gateway: %.0f MB/s", getBlob(c.gw.url(""), d))
		}
		for _, t := range tools {
			t.Process.Signal(os.Interrupt)
			t.Wait()
		}
	}
	for range rounds {
		node = append(node, get(nodeProc.url("")))
		gw = append(gw, get(c.gw.url("")))
		sharedGW = append(sharedGW, get(shared.url("")))
		directGW = append(directGW, get(direct.url("")))
	}
	for _, d := range coldDigests {
		cold = append(cold, getBlob(c.gw.url(""), d))
	}

	storm := func(base string) float64 {
		var wg sync.WaitGroup
		errs := make(chan error, blobpathStormN)
		start := time.Now()
		for range blobpathStormN {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs <- gwe2eGetBlob(ctx, client, base, repo, stormDigest, blobpathStormSize, false)
			}()
		}
		wg.Wait()
		took := time.Since(start)
		close(errs)
		for err := range errs {
			if err != nil {
				b.Fatal(err)
			}
		}
		return blobpathStormN * blobpathStormSize / 1e6 / took.Seconds()
	}
	stormGW := storm(c.gw.url(""))
	stormNode := storm(nodeProc.url(""))
	b.StopTimer()

	b.ReportMetric(gwbenchMedian(cold), "gw-cold-MB/s")
	b.ReportMetric(gwbenchMedian(directGW), "gw-nocache-MB/s")
	b.ReportMetric(gwbenchMedian(gw), "gw-MB/s")
	b.ReportMetric(gwbenchMedian(node), "node-MB/s")
	b.ReportMetric(gwbenchMedian(gw)/gwbenchMedian(node), "gw/node")
	b.ReportMetric(gwbenchMedian(sharedGW), "gw-shared-dir-MB/s")
	b.ReportMetric(stormGW, "storm-gw-MB/s")
	b.ReportMetric(stormNode, "storm-node-MB/s")
	b.ReportMetric(0, "ns/op")
}

// blobpathGateway starts another gateway with the cluster's settings and
// extra flags; id must extend "gateway" (its certificate's id) by "-...".
func blobpathGateway(b *testing.B, c *gwe2eCluster, mtls bool, id string, extra ...string) *e2eProc {
	args := slices.Concat([]string{"gateway", "--gateway-id", id, "--region", gwe2eRegions[0],
		"--http-addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0", "--join", c.nodes[0].ready.GossipAddr,
		"--cluster-id", "gwe2e", "--gossip-profile", "local"}, extra, c.regions)
	if mtls {
		pkiDir := filepath.Join(c.dir, "pki")
		args = append(args, "--gossip-key-file", filepath.Join(pkiDir, "gossip.key"), "--tls-ca", filepath.Join(pkiDir, "ca.crt"),
			"--tls-cert", filepath.Join(pkiDir, "gateway.crt"), "--tls-key", filepath.Join(pkiDir, "gateway.key"))
	}
	p := gwe2eStart(b, id, c.dir, args...)
	p.waitWritten()
	p.waitReady()
	return p
}
