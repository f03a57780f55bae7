package gateway_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meridian-registry/meridian/gateway"
	"github.com/meridian-registry/meridian/node/clustertest"
)

// TestUpstreamSharedReadsStrong moves a tag while many clients GET it at
// once through a strong-consistency gateway, so that their reads share
// node round trips, and checks every answer against the writes: a GET
// must return the version acknowledged last before it began, or a newer
// one. The gateway's answers arrive 20ms late and the writes go to a node
// directly, so a write is often acknowledged while a read that started
// before it is still on its way back: a request that joined that read
// would return an older version and fail this.
func TestUpstreamSharedReadsStrong(t *testing.T) {
	c := clustertest.New(t, 3)
	ctx := within(t, 2*time.Minute)
	env := newUpstreamEnv(t, ctx, c, "", 100*time.Millisecond, func(cfg *gateway.UpstreamConfig) {
		cfg.ReadConsistency = "strong"
	})
	const (
		repo     = "shared/app"
		readers  = 16
		versions = 40
	)
	writer := c.Client()
	var acked atomic.Int64 // the newest version whose PUT was answered
	put := func(v int) {
		body := fmt.Appendf(nil, `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[],"annotations":{"v":"%d"}}`, v)
		req, _ := http.NewRequestWithContext(ctx, http.MethodPut, c.URL(0)+"/v2/"+repo+"/manifests/t", bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/vnd.oci.image.index.v1+json")
		resp, err := writer.Do(req)
		if err != nil {
			t.Fatalf("PUT version %d: %v", v, err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusCreated {
			t.Fatalf("PUT version %d: %s", v, resp.Status)
		}
		acked.Store(int64(v))
	}
	put(0)
	for _, n := range env.up.Nodes() {
		env.net.setDelay(n.Addr, 20*time.Millisecond)
	}

	var (
		stop  atomic.Bool
		wg    sync.WaitGroup
		reads atomic.Int64
	)
	for range readers {
		wg.Go(func() {
			for !stop.Load() {
				// Think time: shared rounds would otherwise keep every
				// client in step, and none would arrive mid-round.
				time.Sleep(time.Duration(rand.IntN(25)) * time.Millisecond)
				floor := acked.Load() // acknowledged before this GET began
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, env.srv.URL+"/v2/"+repo+"/manifests/t", nil)
				req.Header.Set("Accept", "application/vnd.oci.image.index.v1+json")
				resp, err := env.srv.Client().Do(req)
				if err != nil {
					t.Errorf("GET: %v", err)
					return
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					t.Errorf("GET: %s: %s", resp.Status, b)
					return
				}
				var doc struct {
					Annotations map[string]string `json:"annotations"`
				}
				if err := json.Unmarshal(b, &doc); err != nil {
					t.Errorf("GET: %v", err)
					return
				}
				got, _ := strconv.ParseInt(doc.Annotations["v"], 10, 64)
				if got < floor {
					t.Errorf("GET began after version %d was acknowledged, and returned version %d", floor, got)
				}
				reads.Add(1)
			}
		})
	}
	for v := 1; v <= versions && !t.Failed(); v++ {
		put(v)
		// Let reads that began after this write finish before the next,
		// so writes land at every point of the reads' round trips.
		n := reads.Load()
		waitFor(t, ctx, "reads after a write", func() bool { return reads.Load() >= n+readers/2 || t.Failed() })
	}
	stop.Store(true)
	wg.Wait()
	shared := env.counter(t, "meridian_gateway_upstream_shared_manifest_reads_total")
	t.Logf("%d GETs during %d tag moves; %.0f of them shared a node read", reads.Load(), versions, shared)
	if shared <= 0 {
		t.Errorf("no GET shared a node read with another: the test exercised nothing")
	}
}
