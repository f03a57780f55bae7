package replication

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// Scrubbing: bytes in a store are trusted only after they were hashed. The
// scrubber re-reads blobs where their placement records say they are,
// hashes them, and repairs a copy that does not match its digest from
// another region's copy that does (the repair goes through a commit, which
// replaces wrong bytes under a digest). Nodes run it in the background on
// their own region at a bounded rate; `meridian scrub` runs a pass over
// every region on demand.

// ScrubSource lists the blob records to check.
type ScrubSource interface {
	Blobs(ctx context.Context, after string, limit int) ([]*pb.BlobRecord, error)
}

// ScrubConfig configures a Scrubber.
type ScrubConfig struct {
	Regions *Regions
	Source  ScrubSource
	// Owns says whether this process checks digest in region during
	// background passes (nodes split their region's blobs); nil: all.
	Owns       func(region, digest string) bool
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

// Scrubber checks and repairs stored blobs.
type Scrubber struct {
	cfg        ScrubConfig
	checked    *prometheus.CounterVec
	bytes      *prometheus.CounterVec
	mismatches *prometheus.CounterVec
	repaired   *prometheus.CounterVec

	mu   sync.Mutex
	last ScrubReport // of the last finished background pass
}

// ScrubMismatch is one copy whose bytes did not match its digest.
type ScrubMismatch struct {
	Digest, Region string
	Repaired       bool
	Detail         string
}

// ScrubReport sums up a pass.
type ScrubReport struct {
	Checked    int64
	Bytes      int64
	Mismatches []ScrubMismatch
	Errors     int64 // copies that could not be read (not counted as mismatches)
	Started    time.Time
	Took       time.Duration
}

// NewScrubber returns a scrubber; its metrics register with cfg.Registerer.
func NewScrubber(cfg ScrubConfig) (*Scrubber, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	s := &Scrubber{
		cfg:        cfg,
		checked:    prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meridian_scrub_checked_blobs_total", Help: "Blob copies re-hashed by the scrubber."}, []string{"region"}),
		bytes:      prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meridian_scrub_checked_bytes_total", Help: "Bytes re-hashed by the scrubber."}, []string{"region"}),
		mismatches: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meridian_scrub_mismatches_total", Help: "Blob copies whose bytes did not match their digest."}, []string{"region"}),
		repaired:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meridian_scrub_repaired_total", Help: "Mismatched copies replaced by a verified copy from another region."}, []string{"region"}),
	}
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{s.checked, s.bytes, s.mismatches, s.repaired} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return s, nil
}

// Last is the report of the last finished background pass.
func (s *Scrubber) Last() ScrubReport {
	if s == nil {
		return ScrubReport{} // not built yet: the node is starting
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.last
}

// Pass checks every placed copy of every blob in regions (all placed
// regions when empty), reading at most rate bytes a second (0: no limit),
// owned selects copies for background passes (nil: all). It repairs what it
// can and reports what it found; it stops early only when ctx ends.
func (s *Scrubber) Pass(ctx context.Context, regions []string, rate int64, owned bool) (ScrubReport, error) {
	rep := ScrubReport{Started: time.Now()}
	defer func() { rep.Took = time.Since(rep.Started) }()
	after := ""
	for {
		recs, err := s.cfg.Source.Blobs(ctx, after, 256)
		if err != nil {
			return rep, err
		}
		if len(recs) == 0 {
			return rep, nil
		}
		after = recs[len(recs)-1].Digest
		for _, rec := range recs {
			for _, region := range rec.Regions {
				if len(regions) > 0 && !slices.Contains(regions, region) {
					continue
				}
				if owned && s.cfg.Owns != nil && !s.cfg.Owns(region, rec.Digest) {
					continue
				}
				if err := ctx.Err(); err != nil {
					return rep, err
				}
				s.checkCopy(ctx, rec, region, &rep)
				if rate > 0 {
					wait := time.Duration(float64(rec.Size) / float64(rate) * float64(time.Second))
					select {
					case <-ctx.Done():
						return rep, ctx.Err()
					case <-time.After(wait):
					}
				}
			}
		}
	}
}

// Run runs background passes over this node's share of region, at rate
// bytes a second, until ctx ends; a pass every interval at most.
func (s *Scrubber) Run(ctx context.Context, region string, rate int64, interval time.Duration) {
	for {
		rep, err := s.Pass(ctx, []string{region}, rate, true)
		if err != nil && ctx.Err() != nil {
			return
		}
		if err == nil {
			s.mu.Lock()
			s.last = rep
			s.mu.Unlock()
			s.cfg.Logger.Info("scrub pass done", "region", region, "checked", rep.Checked, "bytes", rep.Bytes,
				"mismatches", len(rep.Mismatches), "unreadable", rep.Errors, "took", rep.Took.Round(time.Millisecond))
		} else {
			s.cfg.Logger.Warn("scrub pass", "region", region, "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(max(interval-rep.Took, time.Minute)):
		}
	}
}

// checkCopy hashes region's copy of rec and repairs it when it is wrong.
func (s *Scrubber) checkCopy(ctx context.Context, rec *pb.BlobRecord, region string, rep *ScrubReport) {
	d, ok := s.cfg.Regions.Driver(region)
	if !ok {
		return // a region this process has no store for
	}
	dgst := digest.Digest(rec.Digest)
	n, err := hashCopy(ctx, d, dgst)
	rep.Checked++
	rep.Bytes += n
	s.checked.WithLabelValues(region).Inc()
	s.bytes.WithLabelValues(region).Add(float64(n))
	switch {
	case errors.Is(err, errWrongBytes):
	case err != nil:
		rep.Errors++
		s.cfg.Logger.Warn("scrub: cannot read a copy", "digest", dgst, "region", region, "err", err)
		return
	case n != rec.Size:
		err = fmt.Errorf("%w: %d bytes, the record says %d", errWrongBytes, n, rec.Size)
	default:
		return
	}
	s.mismatches.WithLabelValues(region).Inc()
	m := ScrubMismatch{Digest: rec.Digest, Region: region, Detail: err.Error()}
	if rerr := s.repair(ctx, rec, region, d); rerr != nil {
		m.Detail += "; not repaired: " + rerr.Error()
	} else {
		m.Repaired = true
		s.repaired.WithLabelValues(region).Inc()
	}
	s.cfg.Logger.Error("scrub: a stored copy does not match its digest", "digest", dgst, "region", region, "repaired", m.Repaired, "detail", m.Detail)
	rep.Mismatches = append(rep.Mismatches, m)
}

var errWrongBytes = errors.New("stored bytes do not match the digest")

// hashCopy reads d's copy of dgst through a hash.
func hashCopy(ctx context.Context, d Driver, dgst digest.Digest) (int64, error) {
	rc, err := d.Open(ctx, dgst, 0)
	if err != nil {
		return 0, err
	}
	defer rc.Close()
	v := dgst.Verifier()
	n, err := io.Copy(v, rc)
	if err != nil {
		return n, err
	}
	if !v.Verified() {
		return n, errWrongBytes
	}
	return n, nil
}

// repair copies rec from the nearest other region whose copy verifies into
// dst; the commit replaces the wrong bytes (drivers verify an existing
// object before keeping it).
func (s *Scrubber) repair(ctx context.Context, rec *pb.BlobRecord, region string, dst Driver) error {
	others := s.cfg.Regions.Nearest(slices.DeleteFunc(slices.Clone(rec.Regions), func(r string) bool { return r == region }))
	if len(others) == 0 {
		return errors.New("no other region holds the blob")
	}
	var last error
	for _, src := range others {
		from, ok := s.cfg.Regions.Driver(src)
		if !ok {
			continue
		}
		// Copy hashes what it reads and commits only a verified copy.
		if last = Copy(ctx, from, dst, digest.Digest(rec.Digest), rec.Size); last == nil {
			return nil
		}
	}
	return fmt.Errorf("from %v: %w", others, last)
}
