package gateway

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meridian-registry/meridian/replication"
)

// BlobCacheConfig bounds the gateway's cache of hot blobs, kept on disk so
// that a cached blob is served with sendfile.
type BlobCacheConfig struct {
	// MaxBytes bounds the bytes of all cached and filling blobs; 0 turns
	// the cache (and the sharing of one upstream stream among concurrent
	// readers) off.
	MaxBytes int64
	// Dir holds the cached blobs; empty means a fresh temporary directory.
	// Either way its contents are removed at start and at close: the cache
	// never serves bytes it did not fetch and verify itself.
	Dir string
	// FillOnFirstRead caches a blob from its first read. By default a
	// blob is cached from its second read, or when a second reader asks
	// while the first streams it: filling costs a one-off pull about
	// 40% of its rate (the page-cache write and the digest check), and
	// one-off pulls are common (CI jobs), while a blob many clients want
	// is asked for twice soon enough.
	FillOnFirstRead bool
}

// maxSeenOnce bounds the digests remembered as read once; past it the
// memory starts over, so a blob read once long ago is read uncached once
// more before it is cached.
const maxSeenOnce = 1 << 16

// blobCache shares one upstream read of a blob among every reader that asks
// for it while it is fetched (single flight with fan-out: a pull storm costs
// the region one stream, not one per client), and keeps the fetched blob on
// disk, within a byte bound, for the readers that come later.
//
// An entry is filled by one goroutine from one region's driver into a file
// while its sha256 is computed. Readers follow the file as it grows, but the
// last byte of the blob is released only once the whole blob matched its
// digest, so no reader can complete a response with bytes that failed the
// check; a failed fill (broken stream, wrong digest) fails its readers,
// which the gateway then resumes from its next source as for any broken
// stream. A complete entry is served as the *os.File itself.
//
// Eviction is least recently used among complete entries. An entry being
// filled is never evicted. An evicted file is unlinked: readers that have it
// open keep reading it, and its disk space is freed when they finish.
type blobCache struct {
	cfg     BlobCacheConfig
	dir     string
	temp    bool // dir was made by the cache and is removed at close
	logger  *slog.Logger
	metrics *blobCacheMetrics
	ctx     context.Context // ends the fills at close
	stop    context.CancelFunc
	wg      sync.WaitGroup

	mu      sync.Mutex
	used    int64 // bytes of every entry, filling or complete
	entries map[digest.Digest]*cacheEntry
	lru     *list.List // complete entries, most recently used first
	seq     int
	// seenOnce holds blobs read once and not cached (see
	// BlobCacheConfig.FillOnFirstRead).
	seenOnce map[digest.Digest]struct{}
}

// cacheEntry is one blob in the cache.
type cacheEntry struct {
	d    digest.Digest
	size int64
	path string
	elem *list.Element // in lru once complete

	mu      sync.Mutex
	written int64
	done    bool
	err     error         // why the fill failed, once done
	changed chan struct{} // closed (and replaced) whenever the above change
}

type blobCacheMetrics struct {
	requests  *prometheus.CounterVec
	bytes     prometheus.Gauge
	evictions prometheus.Counter
	failures  *prometheus.CounterVec
}

func newBlobCacheMetrics(reg prometheus.Registerer) (*blobCacheMetrics, error) {
	m := &blobCacheMetrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "meridian", Subsystem: "gateway", Name: "blob_cache_requests_total",
			Help: "Blob reads by how the cache answered: hit (a complete, verified copy), join (a fill under way), fill (started one), first (a blob's first read, streamed uncached), bypass (not cached: too large, a range, or no room).",
		}, []string{"result"}),
		bytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "meridian", Subsystem: "gateway", Name: "blob_cache_bytes",
			Help: "Bytes held by the blob cache, complete and filling.",
		}),
		evictions: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "meridian", Subsystem: "gateway", Name: "blob_cache_evictions_total",
			Help: "Complete blobs evicted to make room.",
		}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "meridian", Subsystem: "gateway", Name: "blob_cache_fill_failures_total",
			Help: "Cache fills that failed: the upstream read broke, or the bytes did not match the digest.",
		}, []string{"reason"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.requests, m.bytes, m.evictions, m.failures} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}

// newBlobCache prepares cfg.Dir (emptying it) or a temporary directory.
func newBlobCache(cfg BlobCacheConfig, logger *slog.Logger, reg prometheus.Registerer) (*blobCache, error) {
	if cfg.MaxBytes <= 0 {
		return nil, errors.New("gateway: blob cache needs a positive size")
	}
	m, err := newBlobCacheMetrics(reg)
	if err != nil {
		return nil, err
	}
	c := &blobCache{cfg: cfg, dir: cfg.Dir, logger: logger, metrics: m,
		entries: map[digest.Digest]*cacheEntry{}, lru: list.New(), seenOnce: map[digest.Digest]struct{}{}}
	if c.dir == "" {
		if c.dir, err = os.MkdirTemp("", "meridian-blob-cache-"); err != nil {
			return nil, fmt.Errorf("gateway: blob cache: %w: %w", errNoTempDir, err)
		}
		c.temp = true
	} else {
		// Files left by an earlier run were verified by that run, not this
		// one: start empty.
		if err := os.RemoveAll(c.dir); err != nil {
			return nil, fmt.Errorf("gateway: blob cache: %w", err)
		}
		if err := os.MkdirAll(c.dir, 0o700); err != nil {
			return nil, fmt.Errorf("gateway: blob cache: %w", err)
		}
	}
	c.ctx, c.stop = context.WithCancel(context.Background())
	return c, nil
}

// close ends the fills and removes the cached files.
func (c *blobCache) close() error {
	c.stop()
	c.wg.Wait()
	if c.temp {
		return os.RemoveAll(c.dir)
	}
	entries, err := os.ReadDir(c.dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		errs = append(errs, os.Remove(filepath.Join(c.dir, e.Name())))
	}
	return errors.Join(errs...)
}

// errNoTempDir means the cache was to make a temporary directory and could
// not.
var errNoTempDir = errors.New("no temporary directory for the blob cache")

// cacheable reports whether the cache serves d's reads: not those of
// drivers with optional interfaces (S3 presigns URLs and hints chunk
// sizes), which the wrapper would hide, nor of a directory read directly.
func cacheable(d replication.Driver) bool {
	switch d.(type) {
	case replication.Presigner, replication.ChunkHinter, *replication.Filesystem:
		return false
	}
	return true
}

// wrap returns d with its blob reads served through the cache, when
// cacheable.
func (c *blobCache) wrap(region string, d replication.Driver) replication.Driver {
	if !cacheable(d) {
		return d
	}
	return &cachedDriver{Driver: d, region: region, cache: c}
}

// cachedDriver is a region's driver whose Open goes through the cache.
type cachedDriver struct {
	replication.Driver
	region string
	cache  *blobCache
}

// Open implements replication.Driver. A read from the start of a blob that
// fits the cache joins or starts a fill; a read from a later offset is
// served from a complete or filling entry if there is one (a response
// resuming after a broken source), else straight from the driver.
func (cd *cachedDriver) Open(ctx context.Context, d digest.Digest, offset int64) (io.ReadCloser, error) {
	c := cd.cache
	if rc, ok, err := c.openExisting(ctx, d, offset); ok {
		return rc, err
	}
	if offset != 0 || d.Validate() != nil {
		c.metrics.requests.WithLabelValues("bypass").Inc()
		return cd.Driver.Open(ctx, d, offset)
	}
	if !c.admit(d) {
		c.metrics.requests.WithLabelValues("first").Inc()
		return cd.Driver.Open(ctx, d, offset)
	}
	size, err := cd.Driver.Stat(ctx, d)
	if err != nil {
		return nil, err
	}
	e, joined := c.reserve(d, size)
	if e == nil {
		c.metrics.requests.WithLabelValues("bypass").Inc()
		return cd.Driver.Open(ctx, d, offset)
	}
	if joined {
		c.metrics.requests.WithLabelValues("join").Inc()
		return e.follow(ctx, offset)
	}
	// The fill opens the driver here, so that a blob the store does not
	// hold fails this Open as it would uncached; on the cache's context,
	// since the stream must outlive this reader for the others.
	body, err := cd.Driver.Open(c.ctx, d, 0)
	if err != nil {
		c.finish(e, err, "open")
		return nil, err
	}
	c.metrics.requests.WithLabelValues("fill").Inc()
	rc, err := e.follow(ctx, 0)
	if err != nil {
		body.Close()
		c.finish(e, err, "open")
		return nil, err
	}
	c.wg.Add(1)
	go c.fill(e, body)
	return rc, nil
}

// Delete implements replication.Driver, dropping any cached copy first.
func (cd *cachedDriver) Delete(ctx context.Context, d digest.Digest) error {
	cd.cache.forget(d)
	return cd.Driver.Delete(ctx, d)
}

// forget evicts d's complete entry; a filling one finishes, since its
// readers asked for the blob before it was deleted.
func (c *blobCache) forget(d digest.Digest) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e := c.entries[d]; e != nil && e.elem != nil {
		c.evictLocked(e)
	}
}

// openExisting serves d from an entry when there is one: the *os.File of a
// complete entry, a follower of a filling one. ok is false without an entry.
func (c *blobCache) openExisting(ctx context.Context, d digest.Digest, offset int64) (io.ReadCloser, bool, error) {
	c.mu.Lock()
	e := c.entries[d]
	if e == nil {
		c.mu.Unlock()
		return nil, false, nil
	}
	if e.elem != nil {
		c.lru.MoveToFront(e.elem)
	}
	c.mu.Unlock()
	if offset < 0 || offset > e.size {
		return nil, false, nil // the driver words the error
	}
	e.mu.Lock()
	complete := e.done && e.err == nil
	e.mu.Unlock()
	if !complete {
		c.metrics.requests.WithLabelValues("join").Inc()
		rc, err := e.follow(ctx, offset)
		return rc, err == nil, err
	}
	f, err := os.Open(e.path)
	if err != nil {
		// Removed under us (evicted, or the cache closing): go upstream.
		return nil, false, nil
	}
	if _, err := f.Seek(offset, io.SeekStart); err != nil {
		f.Close()
		return nil, false, nil
	}
	c.metrics.requests.WithLabelValues("hit").Inc()
	return f, true, nil
}

// admit reports whether a read of d, which has no entry, is to fill one:
// always with FillOnFirstRead, else only if d was read before. A blob asked
// for by many clients at once is read once uncached, and the second
// reader's fill serves the rest.
func (c *blobCache) admit(d digest.Digest) bool {
	if c.cfg.FillOnFirstRead {
		return true
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.seenOnce[d]; ok {
		// Forgotten only once an entry exists (reserve): readers that
		// arrive while this one asks the store for the size are admitted
		// too, and join its fill.
		return true
	}
	if len(c.seenOnce) >= maxSeenOnce {
		clear(c.seenOnce)
	}
	c.seenOnce[d] = struct{}{}
	return false
}

// reserve finds d's entry or makes room for a new one of size bytes,
// evicting complete entries least recently used first. joined says the
// entry already existed; nil means d is not to be cached.
func (c *blobCache) reserve(d digest.Digest, size int64) (e *cacheEntry, joined bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e := c.entries[d]; e != nil {
		return e, true
	}
	// One blob may take at most half the cache, so that a hot set of
	// several blobs fits and one huge pull does not flush it.
	if size > c.cfg.MaxBytes/2 {
		return nil, false
	}
	for c.used+size > c.cfg.MaxBytes {
		back := c.lru.Back()
		if back == nil {
			return nil, false // the rest is being filled
		}
		c.evictLocked(back.Value.(*cacheEntry))
		c.metrics.evictions.Inc()
	}
	c.seq++
	e = &cacheEntry{d: d, size: size, changed: make(chan struct{}),
		path: filepath.Join(c.dir, fmt.Sprintf("%s-%s-%d", d.Algorithm(), d.Encoded(), c.seq))}
	f, err := os.OpenFile(e.path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		c.logger.Warn("blob cache cannot create a file; serving uncached", "digest", d, "err", err)
		return nil, false
	}
	f.Close()
	c.entries[d] = e
	delete(c.seenOnce, d)
	c.used += size
	c.metrics.bytes.Set(float64(c.used))
	return e, false
}

// evictLocked drops e from the index and unlinks its file; c.mu is held.
func (c *blobCache) evictLocked(e *cacheEntry) {
	if c.entries[e.d] == e {
		delete(c.entries, e.d)
	}
	if e.elem != nil {
		c.lru.Remove(e.elem)
		e.elem = nil
	}
	c.used -= e.size
	c.metrics.bytes.Set(float64(c.used))
	if err := os.Remove(e.path); err != nil && !errors.Is(err, os.ErrNotExist) {
		c.logger.Warn("blob cache cannot remove a file", "path", e.path, "err", err)
	}
}

// fillStallTimeout is how long a fill may wait for the store's next bytes.
const fillStallTimeout = 30 * time.Second

// fill copies body into e's file, hashing as it goes.
func (c *blobCache) fill(e *cacheEntry, body io.ReadCloser) {
	defer c.wg.Done()
	defer body.Close()
	// The fill outlives the request that started it (other readers follow
	// it), and ends only with the cache.
	stop := context.AfterFunc(c.ctx, func() { body.Close() })
	defer stop()
	// A store that stops sending would hold every follower: a fill that
	// makes no progress for fillStallTimeout fails, and they fail over.
	stalled := time.AfterFunc(fillStallTimeout, func() { body.Close() })
	defer stalled.Stop()
	f, err := os.OpenFile(e.path, os.O_WRONLY, 0)
	if err != nil {
		c.finish(e, err, "write")
		return
	}
	defer f.Close()
	// The hash runs beside the copy (pipelinedHash), so that readers
	// following the file do not wait for it; only the last byte does.
	h := e.d.Algorithm().Hash()
	src := newPipelinedHash(body, h)
	defer src.Wait()
	buf := make([]byte, 1<<20)
	var written int64
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			if written+int64(n) > e.size {
				c.finish(e, fmt.Errorf("gateway: blob cache: %s: the store sent more than its %d bytes", e.d, e.size), "digest")
				return
			}
			if _, err := f.Write(buf[:n]); err != nil {
				c.finish(e, fmt.Errorf("gateway: blob cache: %w", err), "write")
				return
			}
			written += int64(n)
			e.advance(written)
			stalled.Reset(fillStallTimeout)
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			c.finish(e, rerr, "read")
			return
		}
	}
	src.Wait()
	if got := digest.NewDigest(e.d.Algorithm(), h); written != e.size || got != e.d {
		c.finish(e, fmt.Errorf("gateway: blob cache: the store's %d bytes for %s hash to %s", written, e.d, got), "digest")
		return
	}
	c.finish(e, nil, "")
}

// finish ends a fill: a verified entry joins the LRU list, a failed one is
// dropped (its readers get err before their last byte).
func (c *blobCache) finish(e *cacheEntry, err error, reason string) {
	if err != nil {
		c.metrics.failures.WithLabelValues(reason).Inc()
		c.logger.Warn("blob cache fill failed", "digest", e.d, "err", err)
		err = fmt.Errorf("gateway: blob cache fill of %s: %w", e.d, err)
	}
	c.mu.Lock()
	if err != nil {
		c.evictLocked(e)
	} else if c.entries[e.d] == e {
		e.elem = c.lru.PushFront(e)
	}
	c.mu.Unlock()
	e.mu.Lock()
	e.done, e.err = true, err
	close(e.changed)
	e.changed = make(chan struct{})
	e.mu.Unlock()
}

func (e *cacheEntry) advance(written int64) {
	e.mu.Lock()
	e.written = written
	close(e.changed)
	e.changed = make(chan struct{})
	e.mu.Unlock()
}

// readable returns how far a reader may go now: everything written, but
// the last byte only once the blob is verified. done with a nil err means
// the entry is complete; a non-nil err means it failed.
func (e *cacheEntry) readable() (limit int64, done bool, err error, changed <-chan struct{}) {
	e.mu.Lock()
	defer e.mu.Unlock()
	limit = e.written
	if !(e.done && e.err == nil) {
		limit = min(limit, e.size-1)
	}
	return limit, e.done, e.err, e.changed
}

// follow opens a reader of e from offset that waits for the fill.
func (e *cacheEntry) follow(ctx context.Context, offset int64) (io.ReadCloser, error) {
	f, err := os.Open(e.path)
	if err != nil {
		return nil, err
	}
	if _, err := f.Seek(offset, io.SeekStart); err != nil {
		f.Close()
		return nil, err
	}
	return &cacheFollower{e: e, f: f, pos: offset, ctx: ctx, closed: make(chan struct{})}, nil
}

// cacheFollower reads an entry while it is filled. Its file's offset is
// always pos, so copyN can hand the file to sendfile.
type cacheFollower struct {
	e         *cacheEntry
	f         *os.File
	pos       int64
	ctx       context.Context // the reader's: a client gone stops waiting
	closeOnce sync.Once
	closed    chan struct{}
}

var errFollowerClosed = errors.New("gateway: read from a closed blob cache reader")

// wait blocks until bytes past pos are readable, and returns the limit; it
// returns io.EOF at the end of a verified blob.
func (r *cacheFollower) wait() (int64, error) {
	for {
		limit, done, err, changed := r.e.readable()
		switch {
		case r.pos < limit:
			return limit, nil
		case err != nil:
			return 0, err
		case done && r.pos >= r.e.size:
			return 0, io.EOF
		}
		select {
		case <-changed:
		case <-r.closed:
			return 0, errFollowerClosed
		case <-r.ctx.Done():
			return 0, r.ctx.Err()
		}
	}
}

func (r *cacheFollower) Read(p []byte) (int, error) {
	limit, err := r.wait()
	if err != nil {
		return 0, err
	}
	n, err := r.f.Read(p[:min(int64(len(p)), limit-r.pos)])
	r.pos += int64(n)
	if err == io.EOF {
		err = nil // the fill has written past here; the file is not short
	}
	return n, err
}

// copyN copies n bytes to w as the fill goes, each available stretch as a
// sendfile when w is an http.ResponseWriter. It ends early with the error
// of a failed fill.
func (r *cacheFollower) copyN(w io.Writer, n int64) (int64, error) {
	end := r.pos + n
	var total int64
	for r.pos < end {
		limit, err := r.wait()
		if err != nil {
			return total, err
		}
		m, err := io.Copy(w, io.LimitReader(r.f, min(limit, end)-r.pos))
		r.pos += m
		total += m
		if err != nil {
			return total, err
		}
		if m == 0 {
			return total, io.ErrUnexpectedEOF
		}
	}
	return total, nil
}

// Close ends a blocked read and closes the file. Idempotent.
func (r *cacheFollower) Close() error {
	var err error
	r.closeOnce.Do(func() {
		close(r.closed)
		err = r.f.Close()
	})
	return err
}
