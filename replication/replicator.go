package replication

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// PlacementSource is what the replicator needs from the cluster: the
// replicated placement state and a way to commit new placements.
type PlacementSource interface {
	// Wanted lists blobs region lacks, by digest after after.
	Wanted(ctx context.Context, region, after string, limit int) ([]*pb.Wanted, error)
	// Blob returns a blob's record: its size and the regions holding it.
	Blob(ctx context.Context, digest string) (*pb.BlobRecord, error)
	// Changed returns a channel closed when the state next changes.
	Changed() <-chan struct{}
	// Place commits, through Raft, that region holds verified bytes.
	Place(ctx context.Context, digest string, size int64, region string) error
	// Owns reports whether this node copies digest into its region: one
	// node of the region does, chosen by consistent hashing on the digest
	// over the region's live nodes (see Owner).
	Owns(digest string) bool
	// Removals lists blobs garbage collection condemned that region still
	// holds, by digest after after.
	Removals(ctx context.Context, region, after string, limit int) ([]*pb.Wanted, error)
	// Removed commits, through Raft, that region no longer holds digest,
	// and returns once this node's state shows it.
	Removed(ctx context.Context, digest, region string) error
}

// ReplicatorConfig configures a Replicator.
type ReplicatorConfig struct {
	// Region is the region the replicator fills; Regions holds every
	// store it may copy from and its own.
	Region  string
	Regions *Regions
	Source  PlacementSource
	// Workers is how many blobs copy at once.
	Workers int
	// MinBackoff and MaxBackoff bound the retry delay of a failing blob.
	MinBackoff, MaxBackoff time.Duration
	// Rescan is how often the work list is read even when nothing changed
	// (membership changes move ownership without a state change).
	Rescan     time.Duration
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

// Replicator copies every blob its region should hold but does not from the
// nearest region that has it, verifies the digest, and commits the
// placement. It also deletes the region's copies of blobs garbage
// collection condemned, then commits the removal. Its work lists are the
// replicated state (the Wanted and removal tables), so a restarted
// replicator resumes where the cluster stands, and work that fails is
// retried with backoff.
type Replicator struct {
	cfg    ReplicatorConfig
	logger *slog.Logger

	mu      sync.Mutex
	running map[string]bool
	retry   map[string]retryState

	copies     *prometheus.CounterVec
	copyBytes  prometheus.Counter
	placeDelay prometheus.Observer
	removals   *prometheus.CounterVec
	freedBytes prometheus.Counter
}

type retryState struct {
	attempts int
	next     time.Time
}

// NewReplicator returns a replicator; Run starts it.
func NewReplicator(cfg ReplicatorConfig) (*Replicator, error) {
	if cfg.Workers <= 0 {
		cfg.Workers = 4
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = time.Second
	}
	if cfg.MaxBackoff < cfg.MinBackoff {
		cfg.MaxBackoff = max(time.Minute, cfg.MinBackoff)
	}
	if cfg.Rescan <= 0 {
		cfg.Rescan = 5 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if _, ok := cfg.Regions.Driver(cfg.Region); !ok {
		return nil, fmt.Errorf("replication: no store for region %q", cfg.Region)
	}
	r := &Replicator{
		cfg:     cfg,
		logger:  cfg.Logger.With("component", "replicator", "region", cfg.Region),
		running: map[string]bool{},
		retry:   map[string]retryState{},
		copies: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "meridian", Subsystem: "replication", Name: "copies_total",
			Help:        "Blob copies into this node's region by outcome.",
			ConstLabels: prometheus.Labels{"region": cfg.Region},
		}, []string{"result"}),
		copyBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "meridian", Subsystem: "replication", Name: "copied_bytes_total",
			Help:        "Bytes copied into this node's region.",
			ConstLabels: prometheus.Labels{"region": cfg.Region},
		}),
	}
	delay := prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: "meridian", Subsystem: "replication", Name: "placement_delay_seconds",
		Help:        "Time from a blob becoming wanted in this region to its placement by this node.",
		ConstLabels: prometheus.Labels{"region": cfg.Region},
		Buckets:     prometheus.ExponentialBuckets(0.01, 2, 16),
	})
	r.placeDelay = delay
	r.removals = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "meridian", Subsystem: "gc", Name: "removals_total",
		Help:        "Condemned blob copies this node deleted from its region, by outcome.",
		ConstLabels: prometheus.Labels{"region": cfg.Region},
	}, []string{"result"})
	r.freedBytes = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "meridian", Subsystem: "gc", Name: "freed_bytes_total",
		Help:        "Bytes of condemned blobs this node deleted from its region.",
		ConstLabels: prometheus.Labels{"region": cfg.Region},
	})
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{r.copies, r.copyBytes, delay, r.removals, r.freedBytes} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return r, nil
}

// Run copies until ctx ends.
func (r *Replicator) Run(ctx context.Context) {
	sem := make(chan struct{}, r.cfg.Workers)
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		changed := r.cfg.Source.Changed()
		wake := r.scan(ctx, sem, &wg)
		timer := time.NewTimer(min(wake, r.cfg.Rescan))
		select {
		case <-ctx.Done():
			timer.Stop()
			return
		case <-changed:
			// Let a burst of applies settle before reading the list again.
			select {
			case <-ctx.Done():
			case <-time.After(20 * time.Millisecond):
			}
		case <-timer.C:
		}
		timer.Stop()
	}
}

// scan starts a copy of every wanted blob, and a removal of every condemned
// one, that this node owns and that is neither running nor backing off; it
// returns when the next backoff ends.
func (r *Replicator) scan(ctx context.Context, sem chan struct{}, wg *sync.WaitGroup) time.Duration {
	seen := map[string]bool{}
	wake := r.scanList(ctx, sem, wg, seen, "copy", r.cfg.Source.Wanted, r.copy)
	wake = min(wake, r.scanList(ctx, sem, wg, seen, "remove", r.cfg.Source.Removals, r.remove))
	// Forget the backoff of work that is no longer listed.
	r.mu.Lock()
	for k := range r.retry {
		if !seen[k] {
			delete(r.retry, k)
		}
	}
	r.mu.Unlock()
	return max(wake, 10*time.Millisecond)
}

// scanList starts work on one list (copies or removals). Running and
// backoff state is kept per kind and digest, so a blob's copy and its
// removal never share it.
func (r *Replicator) scanList(ctx context.Context, sem chan struct{}, wg *sync.WaitGroup, seen map[string]bool, kind string,
	list func(ctx context.Context, region, after string, limit int) ([]*pb.Wanted, error),
	work func(ctx context.Context, w *pb.Wanted) error) time.Duration {
	wake := r.cfg.Rescan
	after := ""
	for {
		page, err := list(ctx, r.cfg.Region, after, 1000)
		if err != nil {
			if ctx.Err() == nil {
				r.logger.Warn("read replication work list", "kind", kind, "err", err)
			}
			return time.Second
		}
		for _, w := range page {
			k := kind + " " + w.Digest
			seen[k] = true
			if !r.cfg.Source.Owns(w.Digest) {
				continue
			}
			r.mu.Lock()
			busy := r.running[k]
			rs, backingOff := r.retry[k]
			if !busy && backingOff && time.Now().Before(rs.next) {
				wake = min(wake, time.Until(rs.next))
				busy = true
			}
			if !busy {
				r.running[k] = true
			}
			r.mu.Unlock()
			if busy {
				continue
			}
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				r.done(k, nil)
				return 0
			}
			wg.Add(1)
			go func(w *pb.Wanted) {
				defer wg.Done()
				defer func() { <-sem }()
				r.done(k, work(ctx, w))
			}(w)
		}
		if len(page) < 1000 {
			return wake
		}
		after = page[len(page)-1].Digest
	}
}

func (r *Replicator) done(k string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.running, k)
	if err == nil {
		delete(r.retry, k)
		return
	}
	rs := r.retry[k]
	rs.attempts++
	backoff := r.cfg.MinBackoff << min(rs.attempts-1, 16)
	backoff = min(backoff, r.cfg.MaxBackoff)
	backoff += rand.N(backoff/4 + 1) // spread retries of many blobs
	rs.next = time.Now().Add(backoff)
	r.retry[k] = rs
}

// remove deletes the region's copy of a condemned blob, then commits that
// the region no longer holds it. Deleting first keeps the order safe: once
// the removal is committed, no delete of these bytes is still under way,
// so a later push of the same digest cannot lose its new copy.
func (r *Replicator) remove(ctx context.Context, w *pb.Wanted) error {
	dgst := digest.Digest(w.Digest)
	// The work list may be a page read before this node applied a removal
	// it committed itself (Removed returns once it applied): deleting
	// again then could take the bytes of a new push of the digest.
	rec, err := r.cfg.Source.Blob(ctx, w.Digest)
	switch {
	case errors.Is(err, pb.ErrBlobUnknown):
		return nil
	case err != nil:
		r.removals.WithLabelValues("failed").Inc()
		return err
	case rec.CondemnedUnixNano == 0 || !slices.Contains(rec.Regions, r.cfg.Region):
		return nil
	}
	d, _ := r.cfg.Regions.Driver(r.cfg.Region)
	if err := d.Delete(ctx, dgst); err != nil && !errors.Is(err, ErrBlobNotFound) {
		r.removals.WithLabelValues("failed").Inc()
		r.logger.Warn("gc: delete condemned blob", "digest", dgst, "err", err)
		return err
	}
	if err := r.cfg.Source.Removed(ctx, w.Digest, r.cfg.Region); err != nil {
		r.removals.WithLabelValues("failed").Inc()
		r.logger.Warn("gc: commit removal", "digest", dgst, "err", err)
		return err
	}
	r.removals.WithLabelValues("removed").Inc()
	r.freedBytes.Add(float64(w.Size))
	r.logger.Debug("removed condemned blob", "digest", dgst, "size", w.Size)
	return nil
}

// copy brings one blob into the region and commits its placement.
func (r *Replicator) copy(ctx context.Context, w *pb.Wanted) error {
	dgst := digest.Digest(w.Digest)
	rec, err := r.cfg.Source.Blob(ctx, w.Digest)
	if err != nil {
		return r.fail(dgst, "read blob record", err)
	}
	if slices.Contains(rec.Regions, r.cfg.Region) {
		return nil // placed by someone else meanwhile
	}
	dst, _ := r.cfg.Regions.Driver(r.cfg.Region)
	sources := r.cfg.Regions.Nearest(slices.DeleteFunc(slices.Clone(rec.Regions), func(s string) bool { return s == r.cfg.Region }))
	if len(sources) == 0 {
		return r.fail(dgst, "find a source", fmt.Errorf("no reachable region holds it (placed in %v)", rec.Regions))
	}
	// A copy that committed before a crash, or one made by another node,
	// only needs verifying.
	err = r.verify(ctx, dst, dgst, rec.Size)
	if err != nil {
		var lastErr error
		for _, src := range sources {
			if lastErr = r.copyFrom(ctx, src, dst, dgst, rec.Size); lastErr == nil {
				break
			}
			r.logger.Info("copy failed; trying the next region", "digest", dgst, "from", src, "err", lastErr)
		}
		if lastErr != nil {
			return r.fail(dgst, "copy", lastErr)
		}
	}
	if err := r.cfg.Source.Place(ctx, w.Digest, rec.Size, r.cfg.Region); err != nil {
		if errors.Is(err, pb.ErrBlobUnknown) {
			return nil // the blob went away (garbage collection)
		}
		return r.fail(dgst, "commit placement", err)
	}
	r.copies.WithLabelValues("copied").Inc()
	if w.SinceUnixNano > 0 {
		r.placeDelay.Observe(time.Since(time.Unix(0, w.SinceUnixNano)).Seconds())
	}
	r.logger.Debug("placed", "digest", dgst, "size", rec.Size)
	return nil
}

func (r *Replicator) fail(dgst digest.Digest, what string, err error) error {
	r.copies.WithLabelValues("failed").Inc()
	r.logger.Warn("replication: "+what, "digest", dgst, "err", err)
	return err
}

// copyFrom copies dgst from region src into dst: server-side when both are
// on one endpoint (then re-read to verify), else streamed through a hash.
func (r *Replicator) copyFrom(ctx context.Context, src string, dst Driver, dgst digest.Digest, size int64) error {
	from, ok := r.cfg.Regions.Driver(src)
	if !ok {
		return fmt.Errorf("no store for region %s", src)
	}
	if c, ok := dst.(ServerSideCopier); ok {
		err := c.CopyBlob(ctx, from, dgst)
		switch {
		case err == nil:
			if verr := r.verify(ctx, dst, dgst, size); verr != nil {
				// A bad copy must not stay under the digest.
				dst.Delete(context.WithoutCancel(ctx), dgst)
				return fmt.Errorf("server-side copy from %s: %w", src, verr)
			}
			r.copyBytes.Add(float64(size))
			return nil
		case !errors.Is(err, ErrNotSameBackend):
			return fmt.Errorf("server-side copy from %s: %w", src, err)
		}
	}
	began := time.Now()
	err := Copy(ctx, from, dst, dgst, size)
	if err != nil {
		r.cfg.Regions.Observe(src, time.Since(began), err)
		return fmt.Errorf("copy from %s: %w", src, err)
	}
	r.copyBytes.Add(float64(size))
	return nil
}

// Copy streams blob dgst of size bytes from src into dst through a hash,
// and commits it in dst only if the bytes match the digest and size.
func Copy(ctx context.Context, src, dst Driver, dgst digest.Digest, size int64) error {
	rc, err := src.Open(ctx, dgst, 0)
	if err != nil {
		return fmt.Errorf("open: %w", err)
	}
	defer rc.Close()
	id, err := dst.StartUpload(ctx)
	if err != nil {
		return fmt.Errorf("start upload: %w", err)
	}
	committed := false
	defer func() {
		if !committed {
			dst.CancelUpload(context.WithoutCancel(ctx), id)
		}
	}()
	v := dgst.Verifier()
	n, err := dst.WriteUpload(ctx, id, 0, io.TeeReader(io.LimitReader(rc, size+1), v))
	if err != nil {
		return err
	}
	if n != size || !v.Verified() {
		return fmt.Errorf("bytes read do not match %s (%d bytes of %d)", dgst, n, size)
	}
	if err := dst.CommitUpload(ctx, id, size, dgst); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	committed = true
	return nil
}

// verify re-reads dgst from d and checks its size and digest.
func (r *Replicator) verify(ctx context.Context, d Driver, dgst digest.Digest, size int64) error {
	got, err := d.Stat(ctx, dgst)
	if err != nil {
		return err
	}
	if got != size {
		return fmt.Errorf("store holds %d bytes of %s, not %d", got, dgst, size)
	}
	rc, err := d.Open(ctx, dgst, 0)
	if err != nil {
		return err
	}
	defer rc.Close()
	v := dgst.Verifier()
	if _, err := io.Copy(v, rc); err != nil {
		return err
	}
	if !v.Verified() {
		return fmt.Errorf("store holds bytes under %s that do not match it", dgst)
	}
	return nil
}

// Owner picks which of nodes copies a blob (rendezvous hashing): each blob
// goes to the node with the highest hash of (node, digest), so a node joining
// or leaving moves only its own share. nodes must be non-empty.
func Owner(dgst string, nodes []string) string {
	var best string
	var bestScore uint64
	for _, n := range nodes {
		sum := sha256.Sum256([]byte(n + "\x00" + dgst))
		if s := binary.BigEndian.Uint64(sum[:8]); best == "" || s > bestScore || (s == bestScore && n < best) {
			best, bestScore = n, s
		}
	}
	return best
}
