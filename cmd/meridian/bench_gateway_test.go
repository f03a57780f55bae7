package main

// Benchmarks of a real `meridian gateway` process in front of three real
// `meridian serve` processes (the harness of gateway_e2e_test.go): what the
// extra hop costs a manifest GET and a blob GET next to the node the gateway
// prefers, and a 2 GiB blob streamed through with the gateway's peak RSS.
// Run with -benchtime 1x: each is one measured run, whatever b.N.

import (
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

const (
	// gwbenchRate is each target's manifest GETs per second, sent on a
	// fixed schedule whatever the answers' latency (an open loop).
	gwbenchRate = 500
	// gwbenchDuration is how long each target is measured; a warm-up of
	// gwbenchWarmup comes first, not recorded.
	gwbenchDuration = 10 * time.Second
	gwbenchWarmup   = 2 * time.Second
	// gwbenchBlob is the blob GET through the gateway and the node.
	gwbenchBlob = 256 << 20
	// gwbenchBlobRounds alternates the blob GETs between the two targets;
	// each reports its median.
	gwbenchBlobRounds = 3
)

// BenchmarkGatewayManifestGet measures a manifest GET by tag at 500 req/s
// for 10 s through the gateway and, in the same run, directly from the node
// the gateway prefers (the node's embedded gateway): p50 and p99 of each and
// what the extra hop adds. Then a 256 MiB blob GET through each, in MB/s.
//
// It runs twice, with cluster TLS off and on (mutual TLS between the
// gateway and the nodes, and between nodes, and encrypted gossip).
func BenchmarkGatewayManifestGet(b *testing.B) {
	for _, mtls := range []bool{false, true} {
		b.Run(fmt.Sprintf("mtls=%v", mtls), func(b *testing.B) { benchGatewayManifestGet(b, mtls) })
	}
}

func benchGatewayManifestGet(b *testing.B, mtls bool) {
	c := gwe2eStartClusterTLS(b, mtls)
	img, err := random.Image(4<<10, 2)
	if err != nil {
		b.Fatal(err)
	}
	if err := remote.Write(c.gw.ref("bench/app:latest"), img); err != nil {
		b.Fatalf("push through the gateway: %v", err)
	}
	nodeProc := c.preferred()
	b.Logf("the gateway prefers %s (region %s)", nodeProc.ready.NodeID, nodeProc.ready.Region)
	targets := []string{c.gw.url("/v2/bench/app/manifests/latest"), nodeProc.url("/v2/bench/app/manifests/latest")}
	client := gwe2eClient()
	defer client.CloseIdleConnections()

	if _, err := gwbenchLoad(client, targets, gwbenchRate, gwbenchWarmup); err != nil {
		b.Fatalf("warm-up: %v", err)
	}
	b.ResetTimer()
	lat, err := gwbenchLoad(client, targets, gwbenchRate, gwbenchDuration)
	b.StopTimer()
	if err != nil {
		b.Fatal(err)
	}
	if after := c.preferred(); after != nodeProc {
		b.Logf("the gateway prefers %s after the run (%s before)", after.ready.NodeID, nodeProc.ready.NodeID)
	}
	gw50, gw99 := gwbenchPercentile(lat[0], 0.50), gwbenchPercentile(lat[0], 0.99)
	n50, n99 := gwbenchPercentile(lat[1], 0.50), gwbenchPercentile(lat[1], 0.99)
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	b.ReportMetric(ms(gw50), "gw-p50-ms")
	b.ReportMetric(ms(gw99), "gw-p99-ms")
	b.ReportMetric(ms(n50), "node-p50-ms")
	b.ReportMetric(ms(n99), "node-p99-ms")
	b.ReportMetric(ms(gw50-n50), "added-p50-ms")
	b.ReportMetric(ms(gw99-n99), "added-p99-ms")

	// The blob: pushed through the gateway and copied into every region
	// before the clock runs, so that no copy competes with the GETs.
	const repo, seed = "bench/blob", 43
	digest := gwe2eBlobDigest(b, seed, gwbenchBlob)
	ctx, cancel := context.WithTimeout(context.Background(), gwe2eTransferTimeout(gwbenchBlob*(1+2*gwbenchBlobRounds)))
	defer cancel()
	if err := gwe2ePushBlob(ctx, client, c.gw.url(""), repo, digest, seed, gwbenchBlob); err != nil {
		b.Fatal(err)
	}
	c.waitReplicated(gwe2eTransferTimeout(gwbenchBlob))
	bases := []string{c.gw.url(""), nodeProc.url("")}
	mbps := make([][]float64, len(bases))
	for range gwbenchBlobRounds {
		for i, base := range bases {
			start := time.Now()
			if err := gwe2eGetBlob(ctx, client, base, repo, digest, gwbenchBlob, false); err != nil {
				b.Fatal(err)
			}
			mbps[i] = append(mbps[i], gwbenchBlob/1e6/time.Since(start).Seconds())
		}
	}
	b.ReportMetric(gwbenchMedian(mbps[0]), "gw-blob-MB/s")
	b.ReportMetric(gwbenchMedian(mbps[1]), "node-blob-MB/s")
	// ns/op would only repeat the run's length, whatever b.N.
	b.ReportMetric(0, "ns/op")
}

// BenchmarkGatewayStream2GiB pushes a 2 GiB blob through the gateway in one
// request and GETs it back (its sha256 checked by the client), and reports
// the MB/s of each and the gateway's peak RSS, which must stay under 100
// MiB. MERIDIAN_GATEWAY_MEM_BLOB overrides the size.
func BenchmarkGatewayStream2GiB(b *testing.B) {
	size := gwe2eMemBlobSize(b, 2<<30)
	c := gwe2eStartCluster(b)
	b.ResetTimer()
	peak, push, pull := gwe2eStream(b, c, size, true)
	b.StopTimer()
	b.ReportMetric(float64(peak)/(1<<20), "peak-RSS-MiB")
	b.ReportMetric(push, "push-MB/s")
	b.ReportMetric(pull, "pull-MB/s")
	b.ReportMetric(0, "ns/op")
	if !gwe2eRaceBuild() && peak >= gwe2eMaxRSS {
		b.Errorf("gateway peak RSS %d MiB after streaming %d MiB, want under %d MiB", peak>>20, size>>20, gwe2eMaxRSS>>20)
	}
}

// gwbenchLoad GETs each of targets rate times a second for d, the targets'
// schedules interleaved evenly. Every request runs on its own goroutine at
// its scheduled time, so a slow answer delays no other request; its latency
// runs from sending to the last byte of the body. It returns the latencies
// per target, or the first failure.
func gwbenchLoad(client *http.Client, targets []string, rate int, d time.Duration) ([][]time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), d+30*time.Second)
	defer cancel()
	period := time.Second / time.Duration(rate*len(targets))
	n := int(d / period)
	lat := make([][]time.Duration, len(targets))
	for i := range lat {
		lat[i] = make([]time.Duration, 0, n/len(targets)+1)
	}
	var (
		mu       sync.Mutex
		firstErr error
		wg       sync.WaitGroup
	)
	start := time.Now()
	for k := range n {
		time.Sleep(time.Until(start.Add(time.Duration(k) * period)))
		if ctx.Err() != nil {
			break
		}
		i := k % len(targets)
		wg.Go(func() {
			took, err := gwbenchGet(ctx, client, targets[i])
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				if firstErr == nil {
					firstErr = err
				}
				return
			}
			lat[i] = append(lat[i], took)
		})
	}
	if late := time.Since(start) - d; late > 100*time.Millisecond {
		// The load generator could not keep the schedule: the rate was lower.
		return nil, fmt.Errorf("sending %d requests took %v longer than scheduled", n, late)
	}
	wg.Wait()
	return lat, firstErr
}

// gwbenchGet GETs a manifest and reads it whole.
func gwbenchGet(ctx context.Context, client *http.Client, url string) (time.Duration, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Accept", "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json")
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return 0, fmt.Errorf("GET %s: %w", url, err)
	}
	took := time.Since(start)
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return took, nil
}

// gwbenchPercentile is the nearest-rank p-quantile of xs.
func gwbenchPercentile(xs []time.Duration, p float64) time.Duration {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	i := int(math.Ceil(p*float64(len(s)))) - 1
	return s[min(max(i, 0), len(s)-1)]
}

func gwbenchMedian(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}
