package gateway

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/meridian-registry/meridian/replication"
)

// gatedStore counts blob opens. Its readers block before their first byte
// until gate (when set) is closed, and after their first read until pause
// (when set) is closed; with corrupt set they flip the first byte of every
// blob.
type gatedStore struct {
	replication.Driver
	opens       atomic.Int32
	mu          sync.Mutex
	gate, pause chan struct{}
	corrupt     bool
	statDelay   time.Duration // Stat answers after it
}

func (s *gatedStore) Stat(ctx context.Context, d digest.Digest) (int64, error) {
	s.mu.Lock()
	delay := s.statDelay
	s.mu.Unlock()
	time.Sleep(delay)
	return s.Driver.Stat(ctx, d)
}

func (s *gatedStore) Open(ctx context.Context, d digest.Digest, off int64) (io.ReadCloser, error) {
	rc, err := s.Driver.Open(ctx, d, off)
	if err != nil {
		return nil, err
	}
	s.opens.Add(1)
	s.mu.Lock()
	gate, pause, corrupt := s.gate, s.pause, s.corrupt
	s.mu.Unlock()
	return &gatedReader{ctx: ctx, rc: rc, gate: gate, pause: pause, flip: corrupt && off == 0}, nil
}

// gatedReader fails once its context ends, as a stream from a node does.
type gatedReader struct {
	ctx         context.Context
	rc          io.ReadCloser
	gate, pause chan struct{}
	reads       int
	flip        bool
}

func (r *gatedReader) Read(p []byte) (int, error) {
	if r.gate != nil {
		<-r.gate
		r.gate = nil
	}
	if r.reads++; r.reads == 2 && r.pause != nil {
		<-r.pause
	}
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	n, err := r.rc.Read(p)
	if r.flip && n > 0 {
		p[0] ^= 0xff
		r.flip = false
	}
	return n, err
}

func (r *gatedReader) Close() error { return r.rc.Close() }

// cachedRegions is a gateway whose regions are read through a blob cache of
// max bytes that fills on a blob's first read.
func cachedRegions(t *testing.T, max int64, local, far replication.Driver) (*harness, *blobCache) {
	t.Helper()
	return cachedRegionsWith(t, BlobCacheConfig{MaxBytes: max, Dir: t.TempDir(), FillOnFirstRead: true}, local, far)
}

func cachedRegionsWith(t *testing.T, cfg BlobCacheConfig, local, far replication.Driver) (*harness, *blobCache) {
	t.Helper()
	c, err := newBlobCache(cfg, slog.New(slog.DiscardHandler), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.close(); err != nil {
			t.Error(err)
		}
	})
	h := twoRegions(t, c.wrap("local", local), c.wrap("far", far))
	return h, c
}

// metricValue reads a counter or gauge.
func metricValue(m prometheus.Metric) float64 {
	var out dto.Metric
	if err := m.Write(&out); err != nil {
		panic(err)
	}
	if g := out.GetGauge(); g != nil {
		return g.GetValue()
	}
	return out.GetCounter().GetValue()
}

func cacheCount(c *blobCache, result string) int {
	return int(metricValue(c.metrics.requests.WithLabelValues(result)))
}

// waitCacheCount waits up to 10 s until the cache has answered n reads
// with result.
func waitCacheCount(t *testing.T, c *blobCache, result string, n int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); cacheCount(c, result) < n; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("readers did not all reach the cache: %d %s, want %d", cacheCount(c, result), result, n)
		}
	}
}

// committedInCache commits content to store and returns a cache (filling
// on first reads, closed at the test's end) wrapping it, the wrapped
// driver, and the blob's digest.
func committedInCache(t *testing.T, store replication.Driver, content []byte) (*blobCache, replication.Driver, digest.Digest) {
	t.Helper()
	c, err := newBlobCache(BlobCacheConfig{MaxBytes: 64 << 20, Dir: t.TempDir(), FillOnFirstRead: true}, slog.New(slog.DiscardHandler), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.close() })
	cd := c.wrap("local", store)
	d := digest.FromBytes(content)
	ctx := context.Background()
	id, err := cd.StartUpload(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cd.WriteUpload(ctx, id, 0, bytes.NewReader(content)); err != nil {
		t.Fatal(err)
	}
	if err := cd.CommitUpload(ctx, id, int64(len(content)), d); err != nil {
		t.Fatal(err)
	}
	return c, cd, d
}

// getBlobBody GETs a blob with the client's own context and returns the body.
func getBlobBody(ctx context.Context, h *harness, d digest.Digest, header ...string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, "GET", h.srv.URL+"/v2/app/blobs/"+d.String(), nil)
	if err != nil {
		return nil, err
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := h.srv.Client().Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	return io.ReadAll(resp.Body)
}

// Many concurrent readers of one blob share one read of the store and all
// get the same, whole bytes, even when one of them hangs up mid-way; later
// readers are served from the cache without the store; ranges work from a
// fill and from the cached copy.
func TestBlobCacheFanOut(t *testing.T) {
	store := &gatedStore{Driver: newFS(t)}
	h, c := cachedRegions(t, 64<<20, store, newFS(t))
	content := randomBytes(8 << 20)
	d := h.pushBlob(t, "app", content)

	store.mu.Lock()
	gate, pause := make(chan struct{}), make(chan struct{})
	store.gate, store.pause = gate, pause
	store.mu.Unlock()
	var openGate, openPause sync.Once
	release := func() { openGate.Do(func() { close(gate) }) }
	resume := func() { openPause.Do(func() { close(pause) }) }
	t.Cleanup(func() { release(); resume() }) // a failed test must not hang its server
	const readers = 16
	bodies := make([][]byte, readers)
	errs := make([]error, readers)
	var wg sync.WaitGroup
	waitCount := func(result string, n int) { t.Helper(); waitCacheCount(t, c, result, n) }
	// The reader that starts the fill hangs up after its first bytes: the
	// fill goes on for the others.
	quitter, quit := context.WithCancel(context.Background())
	quitDone := make(chan struct{})
	go func() {
		defer close(quitDone)
		req, _ := http.NewRequestWithContext(quitter, "GET", h.srv.URL+"/v2/app/blobs/"+d.String(), nil)
		resp, err := h.srv.Client().Do(req)
		if err != nil {
			t.Errorf("quitter: %v", err)
			return
		}
		defer resp.Body.Close()
		io.ReadFull(resp.Body, make([]byte, 4096))
		quit()
	}()
	waitCount("fill", 1)
	for i := range readers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			bodies[i], errs[i] = getBlobBody(context.Background(), h, d)
		}()
	}
	// A range from the middle joins the fill too.
	var ranged []byte
	var rangeErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		ranged, rangeErr = getBlobBody(context.Background(), h, d, "Range", "bytes=1000000-1999999")
	}()
	waitCount("join", readers+1)
	store.mu.Lock()
	store.gate = nil
	store.mu.Unlock()
	release()
	<-quitDone // the fill is paused after its first read until then
	resume()
	wg.Wait()
	for i := range readers {
		if errs[i] != nil || !bytes.Equal(bodies[i], content) {
			t.Fatalf("reader %d: %d bytes, err %v; want the blob's %d bytes", i, len(bodies[i]), errs[i], len(content))
		}
	}
	if rangeErr != nil || !bytes.Equal(ranged, content[1000000:2000000]) {
		t.Fatalf("range during the fill: %d bytes, err %v", len(ranged), rangeErr)
	}
	if n := store.opens.Load(); n != 1 {
		t.Fatalf("the store was opened %d times for %d concurrent readers, want once", n, readers+2)
	}
	if got := cacheCount(c, "fill"); got != 1 {
		t.Fatalf("%d fills, want 1", got)
	}

	// Later readers: the cached copy, the store untouched.
	hits := cacheCount(c, "hit")
	h.wantBlob(t, "app", content)
	r := h.do(t, "GET", "/v2/app/blobs/"+d.String(), nil, "Range", "bytes=-10")
	r.wantStatus(t, http.StatusPartialContent)
	if !bytes.Equal(r.body, content[len(content)-10:]) {
		t.Fatalf("range from the cache: %x, want %x", r.body, content[len(content)-10:])
	}
	if n := store.opens.Load(); n != 1 || cacheCount(c, "hit") != hits+2 {
		t.Fatalf("after two more GETs: %d store opens, %d hits; want 1 and 2", n, cacheCount(c, "hit")-hits)
	}
}

// By default a blob's first read streams from the store uncached; its
// second read fills the cache, and the reads after that are hits. A second
// reader that arrives while the first still streams starts the fill, and a
// third joins it: a pull storm costs the store two streams, not one per
// client.
func TestBlobCacheFillsFromTheSecondRead(t *testing.T) {
	store := &gatedStore{Driver: newFS(t)}
	h, c := cachedRegionsWith(t, BlobCacheConfig{MaxBytes: 64 << 20, Dir: t.TempDir()}, store, newFS(t))
	content := randomBytes(2 << 20)
	h.pushBlob(t, "app", content)

	h.wantBlob(t, "app", content)
	if cacheCount(c, "first") != 1 || cacheCount(c, "fill") != 0 || store.opens.Load() != 1 {
		t.Fatalf("first read: %d first, %d fills, %d store opens; want 1, 0, 1", cacheCount(c, "first"), cacheCount(c, "fill"), store.opens.Load())
	}
	h.wantBlob(t, "app", content)
	if cacheCount(c, "fill") != 1 || store.opens.Load() != 2 {
		t.Fatalf("second read: %d fills, %d store opens; want 1 and 2", cacheCount(c, "fill"), store.opens.Load())
	}
	for range 3 {
		h.wantBlob(t, "app", content)
	}
	if cacheCount(c, "hit") != 3 || store.opens.Load() != 2 {
		t.Fatalf("three more reads: %d hits, %d store opens; want 3 and 2", cacheCount(c, "hit"), store.opens.Load())
	}

	// Concurrent readers of a new blob.
	other := randomBytes(2 << 20)
	d2 := h.pushBlob(t, "app", other)
	store.mu.Lock()
	gate := make(chan struct{})
	store.gate = gate
	store.mu.Unlock()
	var release sync.Once
	t.Cleanup(func() { release.Do(func() { close(gate) }) })
	const readers = 6
	bodies := make([][]byte, readers)
	errs := make([]error, readers)
	var wg sync.WaitGroup
	start := func(i int) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			bodies[i], errs[i] = getBlobBody(context.Background(), h, d2)
		}()
	}
	waitCount := func(result string, n int) { t.Helper(); waitCacheCount(t, c, result, n) }
	start(0)
	waitCount("first", 2)
	start(1)
	waitCount("fill", 2)
	for i := 2; i < readers; i++ {
		start(i)
	}
	waitCount("join", readers-2)
	store.mu.Lock()
	store.gate = nil
	store.mu.Unlock()
	release.Do(func() { close(gate) })
	wg.Wait()
	for i := range readers {
		if errs[i] != nil || !bytes.Equal(bodies[i], other) {
			t.Fatalf("reader %d: %d bytes, %v; want the blob's %d bytes", i, len(bodies[i]), errs[i], len(other))
		}
	}
	if n := store.opens.Load(); n != 4 {
		t.Fatalf("the store was opened %d times in all, want 4: two per blob", n)
	}

	// Readers that arrive while the second one still asks the store for
	// the blob's size are admitted too, and join its fill.
	third := randomBytes(2 << 20)
	d3 := h.pushBlob(t, "app", third)
	store.mu.Lock()
	store.statDelay = 200 * time.Millisecond
	store.mu.Unlock()
	opens := store.opens.Load()
	h.wantBlob(t, "app", third) // the first read
	var late sync.WaitGroup
	lateErrs := make([]error, 8)
	for i := range lateErrs {
		late.Add(1)
		go func() {
			defer late.Done()
			body, err := getBlobBody(context.Background(), h, d3)
			if err == nil && !bytes.Equal(body, third) {
				err = fmt.Errorf("%d bytes, not the blob's", len(body))
			}
			lateErrs[i] = err
		}()
		time.Sleep(10 * time.Millisecond)
	}
	late.Wait()
	for i, err := range lateErrs {
		if err != nil {
			t.Fatalf("late reader %d: %v", i, err)
		}
	}
	if n := store.opens.Load() - opens; n != 2 {
		t.Fatalf("a first read and 8 readers arriving during the next one's size lookup opened the store %d times, want 2", n)
	}
}

// A fill whose bytes do not match the digest is dropped, and its readers
// never get the blob's last byte; the next read fetches again.
func TestBlobCacheVerifiesDigest(t *testing.T) {
	store := &gatedStore{Driver: newFS(t)}
	content := randomBytes(3 << 20)
	c, cd, d := committedInCache(t, store, content)
	ctx := context.Background()

	store.corrupt = true
	rc, err := cd.Open(ctx, d, 0)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err == nil || len(got) >= len(content) {
		t.Fatalf("read of a corrupt fill: %d bytes, err %v; want an error before the last byte", len(got), err)
	}
	if n := metricValue(c.metrics.failures.WithLabelValues("digest")); n != 1 {
		t.Fatalf("%v digest failures counted, want 1", n)
	}
	if files, _ := os.ReadDir(c.dir); len(files) != 0 || c.used != 0 {
		t.Fatalf("a failed fill left %d files, %d bytes", len(files), c.used)
	}

	store.corrupt = false
	for range 2 {
		rc, err := cd.Open(ctx, d, 0)
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(rc)
		rc.Close()
		if err != nil || !bytes.Equal(got, content) {
			t.Fatalf("read after the store healed: %d bytes, err %v", len(got), err)
		}
	}
	if n := store.opens.Load(); n != 2 {
		t.Fatalf("store opened %d times, want 2 (the corrupt fill, then one good fill)", n)
	}
}

// A store that breaks mid-stream fails its fill, and the response resumes
// from the next region as it does uncached.
func TestBlobCacheFillFailsOver(t *testing.T) {
	localFS, far := newFS(t), newFS(t)
	h, c := cachedRegions(t, 64<<20, breakingStore{Driver: localFS, limit: 100_000}, far)
	content := randomBytes(1 << 20)
	d := h.pushBlob(t, "app", content)
	rc, _ := localFS.Open(context.Background(), d, 0)
	id, _ := far.StartUpload(context.Background())
	far.WriteUpload(context.Background(), id, 0, rc)
	rc.Close()
	if err := far.CommitUpload(context.Background(), id, int64(len(content)), d); err != nil {
		t.Fatal(err)
	}
	h.meta.place(d.String(), "far")
	h.wantBlob(t, "app", content)
	if n := metricValue(c.metrics.failures.WithLabelValues("read")); n != 1 {
		t.Fatalf("%v read failures counted, want 1", n)
	}
	r := h.do(t, "GET", "/v2/app/blobs/"+d.String(), nil, "Range", "bytes=50000-")
	r.wantStatus(t, http.StatusPartialContent)
	if !bytes.Equal(r.body, content[50000:]) {
		t.Fatalf("range after a broken source: %d bytes, want the last %d of the blob", len(r.body), len(content)-50000)
	}
}

// The cache holds at most its bound, evicting the least recently used
// blob; a blob over half the bound is never cached.
func TestBlobCacheBound(t *testing.T) {
	store := &gatedStore{Driver: newFS(t)}
	h, c := cachedRegions(t, 3<<20, store, newFS(t))
	var blobs [][]byte
	for range 4 {
		b := randomBytes(1 << 20)
		blobs = append(blobs, b)
		h.pushBlob(t, "app", b)
	}
	for i := range 3 {
		h.wantBlob(t, "app", blobs[i])
	}
	h.wantBlob(t, "app", blobs[0]) // blob 1 is now the least recently used
	h.wantBlob(t, "app", blobs[3]) // evicts blob 1
	if n := metricValue(c.metrics.evictions); n != 1 {
		t.Fatalf("%v evictions, want 1", n)
	}
	if files, _ := os.ReadDir(c.dir); len(files) != 3 || c.used > 3<<20 {
		t.Fatalf("cache holds %d files, %d bytes; want 3 within %d", len(files), c.used, 3<<20)
	}
	before := store.opens.Load()
	for _, i := range []int{0, 2, 3} {
		h.wantBlob(t, "app", blobs[i])
	}
	if n := store.opens.Load(); n != before {
		t.Fatalf("cached blobs went to the store %d times", n-before)
	}
	h.wantBlob(t, "app", blobs[1])
	if n := store.opens.Load(); n != before+1 {
		t.Fatalf("the evicted blob was not fetched again")
	}

	big := randomBytes(2 << 20)
	h.pushBlob(t, "app", big)
	bypass := cacheCount(c, "bypass")
	h.wantBlob(t, "app", big)
	if cacheCount(c, "bypass") != bypass+1 || c.used > 3<<20 {
		t.Fatalf("a blob over half the bound: bypass %d→%d, %d bytes cached", bypass, cacheCount(c, "bypass"), c.used)
	}
}

// A reader waiting on a fill that makes no progress returns once its own
// context ends, without ending the fill for the others.
func TestBlobCacheReaderLeavesStalledFill(t *testing.T) {
	store := &gatedStore{Driver: newFS(t)}
	content := randomBytes(1 << 20)
	_, cd, d := committedInCache(t, store, content)
	bg := context.Background()
	gate := make(chan struct{})
	store.gate = gate
	ctx, cancel := context.WithCancel(bg)
	leaving, err := cd.Open(ctx, d, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer leaving.Close()
	staying, err := cd.Open(bg, d, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer staying.Close()
	done := make(chan error, 1)
	go func() { _, err := io.ReadAll(leaving); done <- err }()
	cancel()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("a reader whose context ended read to the end of a stalled fill")
		}
	case <-time.After(5 * time.Second):
		close(gate)
		t.Fatal("a reader whose context ended still waits on a stalled fill")
	}
	close(gate)
	got, err := io.ReadAll(staying)
	if err != nil || !bytes.Equal(got, content) {
		t.Fatalf("the other reader: %d bytes, err %v", len(got), err)
	}
}

// TestStandaloneBlobCacheOpens checks when a standalone gateway puts the
// blob cache in front of its regions: only for regions reached through
// nodes, never failing a start for want of a temporary directory (an image
// FROM scratch has no /tmp), but failing it for a directory the operator
// named and the cache cannot use.
func TestStandaloneBlobCacheOpens(t *testing.T) {
	dirStore, err := replication.OpenStore(context.Background(), replication.StoreConfig{Region: "local", URL: "file://" + t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	standalone := func(cache BlobCacheConfig, remote bool) *Standalone {
		regions := replication.NewRegions("local")
		regions.Add("local", dirStore)
		if remote {
			regions.Add("far", replication.NewRemote("far", nil))
		}
		return &Standalone{cfg: StandaloneConfig{BlobCache: cache}, logger: slog.New(slog.DiscardHandler),
			registry: prometheus.NewRegistry(), regions: regions}
	}
	cached := func(s *Standalone, region string) bool {
		d, _ := s.regions.Driver(region)
		_, ok := d.(*cachedDriver)
		return ok
	}

	s := standalone(BlobCacheConfig{MaxBytes: 1 << 20}, true)
	if err := s.openBlobCache(); err != nil {
		t.Fatal(err)
	}
	if s.cache == nil || !cached(s, "far") || cached(s, "local") {
		t.Fatalf("cache %v, far cached %v, local cached %v: want the cache in front of the remote region only", s.cache, cached(s, "far"), cached(s, "local"))
	}
	if err := s.cache.close(); err != nil {
		t.Fatal(err)
	}

	s = standalone(BlobCacheConfig{MaxBytes: 1 << 20}, false)
	if err := s.openBlobCache(); err != nil || s.cache != nil {
		t.Fatalf("no region to cache: cache %v, err %v; want none and no error", s.cache, err)
	}

	t.Setenv("TMPDIR", "/nonexistent/meridian-test")
	s = standalone(BlobCacheConfig{MaxBytes: 1 << 20}, true)
	if err := s.openBlobCache(); err != nil || s.cache != nil || cached(s, "far") {
		t.Fatalf("without a temporary directory: cache %v, err %v; want the gateway to run uncached", s.cache, err)
	}

	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	s = standalone(BlobCacheConfig{MaxBytes: 1 << 20, Dir: filepath.Join(file, "cache")}, true)
	if err := s.openBlobCache(); err == nil {
		t.Fatal("a cache directory that cannot be made: want an error")
	}
}
