package main

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"slices"
	"sync"
	"time"
)

// genBlockSize is the period of the generator and the block size of the
// disk test (dd bs=1M).
const genBlockSize = 1 << 20

// blobSpec is a deterministic pseudo-random blob that is never held in
// memory: a 1 MiB block drawn from a PCG seeded with seed, repeated, with each
// block's first 8 bytes mixed with its index so that no two blocks are equal.
// Generating it costs a memcpy, so the load generator is never the limit.
type blobSpec struct {
	seed   uint64
	size   int64
	block  []byte // read-only
	digest string // sha256, computed in a first pass over the generator
}

func newBlobSpec(seed uint64, size int64) blobSpec {
	b := blobSpec{seed: seed, size: size, block: make([]byte, genBlockSize)}
	rng := rand.New(rand.NewPCG(seed, seed^0x6d6572696469616e))
	for i := 0; i < len(b.block); i += 8 {
		binary.LittleEndian.PutUint64(b.block[i:], rng.Uint64())
	}
	h := sha256.New()
	io.CopyBuffer(h, b.reader(), make([]byte, genBlockSize))
	b.digest = "sha256:" + hex.EncodeToString(h.Sum(nil))
	return b
}

// reader streams the blob's bytes.
func (b blobSpec) reader() *genReader { return &genReader{b: b} }

// stamp returns the first 8 bytes of block i.
func (b blobSpec) stamp(i int64) [8]byte {
	var s [8]byte
	binary.LittleEndian.PutUint64(s[:], binary.LittleEndian.Uint64(b.block)^uint64(i+1)*0x9e3779b97f4a7c15)
	return s
}

type genReader struct {
	b   blobSpec
	off int64
	// done is when the last byte was read: for a push, when the whole body
	// was handed to the socket.
	done time.Time
}

func (g *genReader) Read(p []byte) (int, error) {
	if g.off >= g.b.size {
		if g.done.IsZero() {
			g.done = time.Now()
		}
		return 0, io.EOF
	}
	in := g.off % genBlockSize
	n := min(int64(len(p)), g.b.size-g.off, genBlockSize-in)
	copy(p[:n], g.b.block[in:in+n])
	if in < 8 {
		s := g.b.stamp(g.off / genBlockSize)
		copy(p[:n], s[in:])
	}
	g.off += n
	if g.off == g.b.size {
		g.done = time.Now()
	}
	return int(n), nil
}

// throughput is bytes moved in a time.
type throughput struct {
	Bytes   int64   `json:"bytes"`
	Seconds float64 `json:"seconds"`
	MBps    float64 `json:"mb_per_s"` // 10^6 bytes per second
}

func newThroughput(n int64, d time.Duration) throughput {
	return throughput{Bytes: n, Seconds: d.Seconds(), MBps: float64(n) / d.Seconds() / 1e6}
}

// measureSHA256 hashes size bytes of a 1 MiB buffer on one goroutine.
func measureSHA256(ctx context.Context, size int64) (throughput, error) {
	buf := newBlobSpec(0, genBlockSize).block
	h := sha256.New()
	start := time.Now()
	for left := size; left > 0; left -= genBlockSize {
		if left%(64<<20) == 0 && ctx.Err() != nil {
			return throughput{}, ctx.Err()
		}
		h.Write(buf[:min(left, genBlockSize)])
	}
	h.Sum(nil)
	return newThroughput(size, time.Since(start)), nil
}

// diskResult is the disk test: the median run, and the part of it spent in
// the final fsync.
type diskResult struct {
	throughput
	FsyncSeconds float64   `json:"fsync_seconds"`
	RunsMBps     []float64 `json:"runs_mb_per_s"`
	runs         []diskResult
}

func (d *diskResult) add(r diskResult) {
	d.runs = append(d.runs, r)
	d.RunsMBps = append(d.RunsMBps, r.MBps)
	m := medianBy(d.runs, func(r diskResult) float64 { return r.Seconds })
	d.throughput, d.FsyncSeconds = m.throughput, m.FsyncSeconds
}

// medianBy returns the element with the median key (the upper one of an
// even count).
func medianBy[T any](xs []T, key func(T) float64) T {
	s := slices.Clone(xs)
	slices.SortFunc(s, func(a, b T) int { return cmp.Compare(key(a), key(b)) })
	return s[len(s)/2]
}

// measureFsyncWrite writes b to path in 1 MiB blocks and fsyncs it, like
// `dd bs=1M conv=fsync`. The file is then what the static server serves.
func measureFsyncWrite(ctx context.Context, path string, b blobSpec) (diskResult, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return diskResult{}, err
	}
	defer f.Close()
	buf := bytes.Clone(b.block) // only the stamp changes from block to block
	start := time.Now()
	for i := int64(0); i*genBlockSize < b.size; i++ {
		if err := ctx.Err(); err != nil {
			return diskResult{}, err
		}
		s := b.stamp(i)
		copy(buf, s[:])
		if _, err := f.Write(buf[:min(genBlockSize, b.size-i*genBlockSize)]); err != nil {
			return diskResult{}, fmt.Errorf("disk test: %w", err)
		}
	}
	written := time.Now()
	if err := f.Sync(); err != nil {
		return diskResult{}, fmt.Errorf("disk test: %w", err)
	}
	res := diskResult{throughput: newThroughput(b.size, time.Since(start)), FsyncSeconds: time.Since(written).Seconds()}
	return res, f.Close()
}

// pullResult is repeated GETs of one blob; the figures are the median run's.
type pullResult struct {
	throughput
	RunsMBps []float64 `json:"runs_mb_per_s"`
	runs     []throughput
}

func (p *pullResult) add(size int64, d time.Duration) {
	t := newThroughput(size, d)
	p.runs = append(p.runs, t)
	p.RunsMBps = append(p.RunsMBps, t.MBps)
	p.throughput = medianBy(p.runs, func(t throughput) float64 { return t.Seconds })
}

// pullOnce GETs url, hashing the body on the fly, and fails if it is not b.
func pullOnce(ctx context.Context, c *http.Client, url string, b blobSpec) (time.Duration, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	resp, err := c.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, statusError("pull", resp)
	}
	h := sha256.New()
	n, err := io.CopyBuffer(h, resp.Body, make([]byte, genBlockSize))
	d := time.Since(start)
	if err != nil {
		return 0, fmt.Errorf("pull: after %d bytes: %w", n, err)
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); n != b.size || got != b.digest {
		return 0, fmt.Errorf("pull: got %d bytes with digest %s, want %d bytes with %s", n, got, b.size, b.digest)
	}
	return d, nil
}

// registryResult is the workload's figures for one registry.
type registryResult struct {
	Name           string     `json:"name"`
	Version        string     `json:"version,omitempty"`
	URL            string     `json:"url"`
	PushMonolithic pushResult `json:"push_monolithic"`
	PushChunked    pushResult `json:"push_chunked"`
	Pull           pullResult `json:"pull"`
	// ManifestGET is with the registry's credentials: for Meridian, a
	// Bearer token; Distribution runs without authentication.
	ManifestGET loadResult `json:"manifest_get_by_tag"`
	// ManifestGETAnonymous is Meridian's same load without credentials,
	// anonymous pull being granted on the repository.
	ManifestGETAnonymous *loadResult `json:"manifest_get_by_tag_anonymous,omitempty"`
	// TokenIssue is Meridian's token endpoint: GET /auth/token with Basic
	// credentials and one scope.
	TokenIssue *loadResult `json:"token_issue,omitempty"`
	// CPU is what each phase (push_monolithic, push_chunked, pull,
	// manifest_get, manifest_get_anonymous, token_issue) cost the server
	// and the load generator.
	CPU map[string]cpuUse `json:"cpu,omitempty"`
}

// cpuUse is the CPU time the server and this process (the load
// generator) used during a phase, in total over its runs (for the manifest
// load, its slices), next to the wall time they took. A side whose CPU time
// is close to the wall time was the bottleneck.
type cpuUse struct {
	Runs          int     `json:"runs"`
	WallSeconds   float64 `json:"wall_seconds"`
	ServerSeconds float64 `json:"server_seconds,omitempty"`
	ClientSeconds float64 `json:"client_seconds"`
}

func (u *cpuUse) add(server, client, wall time.Duration, serverKnown bool) {
	u.Runs++
	u.WallSeconds += wall.Seconds()
	u.ClientSeconds += client.Seconds()
	if serverKnown {
		u.ServerSeconds += server.Seconds()
	}
}

// pushResult is repeated pushes of distinct blobs; the figures are those of
// the median run. CommitSeconds is the time from the end of the data (the
// last body byte handed to the socket; for chunked pushes, the last PATCH
// answered) to the 201: the server's fsync, rename and metadata commit, plus,
// for a monolithic push, the bytes still in socket buffers.
type pushResult struct {
	throughput
	Method        string    `json:"method"`
	CommitSeconds float64   `json:"commit_seconds"`
	RunsMBps      []float64 `json:"runs_mb_per_s"`
	runs          []pushResult
}

func (p *pushResult) add(size int64, total, commit time.Duration) {
	r := pushResult{throughput: newThroughput(size, total), CommitSeconds: commit.Seconds()}
	p.runs = append(p.runs, r)
	p.RunsMBps = append(p.RunsMBps, r.MBps)
	m := medianBy(p.runs, func(r pushResult) float64 { return r.Seconds })
	p.throughput, p.CommitSeconds = m.throughput, m.CommitSeconds
}

// loadResult is a closed-loop load: every client sends its next request as
// soon as the previous one is answered.
type loadResult struct {
	Concurrency int       `json:"concurrency"`
	Seconds     float64   `json:"seconds"`
	Requests    int64     `json:"requests"`
	Errors      int64     `json:"errors"`
	FirstError  string    `json:"first_error,omitempty"`
	RPS         float64   `json:"requests_per_s"`
	SlicesRPS   []float64 `json:"slices_requests_per_s"`
	P50Ms       float64   `json:"p50_ms"`
	P99Ms       float64   `json:"p99_ms"`
	MaxMs       float64   `json:"max_ms"`
}

// loadSample is the raw outcome of one or more load windows.
type loadSample struct {
	lat      []time.Duration // of the successful requests
	errors   int64
	firstErr string
	elapsed  time.Duration
	rps      []float64 // per window
}

func (s *loadSample) merge(o loadSample) {
	s.lat = append(s.lat, o.lat...)
	s.errors += o.errors
	if s.firstErr == "" {
		s.firstErr = o.firstErr
	}
	s.elapsed += o.elapsed
	s.rps = append(s.rps, o.rps...)
}

func (s loadSample) result(concurrency int) loadResult {
	res := loadResult{Concurrency: concurrency, Seconds: s.elapsed.Seconds(), Requests: int64(len(s.lat)),
		Errors: s.errors, FirstError: s.firstErr, SlicesRPS: s.rps}
	if len(s.lat) == 0 {
		return res
	}
	lat := slices.Clone(s.lat)
	slices.Sort(lat)
	ms := func(q float64) float64 { return float64(lat[int(q*float64(len(lat)-1))]) / 1e6 }
	res.RPS = float64(len(lat)) / s.elapsed.Seconds()
	res.P50Ms, res.P99Ms, res.MaxMs = ms(0.50), ms(0.99), ms(1)
	return res
}

// manifestLoad GETs url from concurrency clients for d, each request with
// the Authorization header authorization ("": none), and checks every answer
// is a 200 of wantLen bytes.
func manifestLoad(ctx context.Context, c *http.Client, url, authorization string, wantLen, concurrency int, d time.Duration) loadSample {
	return closedLoop(ctx, concurrency, d, func() func() error {
		buf := make([]byte, wantLen+1)
		return func() error { return getManifest(ctx, c, url, authorization, buf, wantLen) }
	})
}

// closedLoop runs concurrency clients for d after a short warm-up that opens
// the connections; newClient returns a client's request, which it repeats.
// Requests that fail are counted, not timed.
func closedLoop(ctx context.Context, concurrency int, d time.Duration, newClient func() func() error) loadSample {
	warm := min(d/10, time.Second)
	begin := time.Now()
	measureFrom, end := begin.Add(warm), begin.Add(warm+d)
	workers := make([]loadSample, concurrency)
	var wg sync.WaitGroup
	for i := range workers {
		w := &workers[i]
		w.lat = make([]time.Duration, 0, 1<<12)
		do := newClient()
		wg.Go(func() {
			for {
				t0 := time.Now()
				if !t0.Before(end) || ctx.Err() != nil {
					return
				}
				err := do()
				t1 := time.Now()
				switch {
				case err != nil && ctx.Err() != nil:
					return
				case err != nil:
					if t0.After(measureFrom) {
						w.errors++
					}
					if w.firstErr == "" {
						w.firstErr = err.Error()
					}
				case t0.After(measureFrom):
					w.lat = append(w.lat, t1.Sub(t0))
				}
			}
		})
	}
	wg.Wait()
	var s loadSample
	for _, w := range workers {
		s.merge(w)
	}
	s.elapsed = time.Since(measureFrom)
	s.rps = []float64{float64(len(s.lat)) / s.elapsed.Seconds()}
	return s
}
