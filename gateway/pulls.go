package gateway

import (
	"context"
	"log/slog"
	"sync"
	"time"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// PullObserver learns of every manifest served by a GET. It is the seam for
// what must know about pulls (retention keeps what was pulled recently).
type PullObserver interface {
	Pulled(repo, digest string)
}

// PullLog gathers, coarsely, when manifests were last pulled through one
// member and hands them to the cluster in batches, so retention can keep
// what is in use without a Raft write per pull: a manifest pulled a
// thousand times an hour costs one entry an hour.
type PullLog struct {
	granularity time.Duration
	commit      func(context.Context, *pb.Command) error
	logger      *slog.Logger
	now         func() time.Time

	mu      sync.Mutex
	pending map[pullKey]int64
	sent    map[pullKey]int64
}

type pullKey struct{ repo, digest string }

// maxPulls bounds the pull log's memory; past it, new pulls wait for the
// next flush (a flush empties pending) and old sent marks are forgotten
// (which only costs a repeated write).
const maxPulls = 100_000

// NewPullLog returns a log whose times are truncated to granularity and
// committed through commit (a RecordPulls intent).
func NewPullLog(granularity time.Duration, commit func(context.Context, *pb.Command) error, logger *slog.Logger) *PullLog {
	if logger == nil {
		logger = slog.Default()
	}
	return &PullLog{granularity: max(granularity, time.Second), commit: commit, logger: logger, now: time.Now,
		pending: map[pullKey]int64{}, sent: map[pullKey]int64{}}
}

// Pulled records a pull of repo's manifest digest now.
func (p *PullLog) Pulled(repo, digest string) {
	t := p.now().Truncate(p.granularity).UnixNano()
	k := pullKey{repo, digest}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.sent[k] >= t || p.pending[k] >= t || len(p.pending) >= maxPulls {
		return
	}
	p.pending[k] = t
}

// Run flushes the log every interval until ctx ends. Pulls not yet sent
// when the member stops are dropped: at worst a manifest looks as if last
// pulled one period earlier.
func (p *PullLog) Run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			p.Flush(ctx)
		}
	}
}

// Flush commits the pending pulls, a thousand to an entry. Pulls that fail
// to commit go back to pending for the next flush.
func (p *PullLog) Flush(ctx context.Context) error {
	p.mu.Lock()
	batch := p.pending
	p.pending = map[pullKey]int64{}
	p.mu.Unlock()
	var pulls []*pb.Pull
	var err error
	send := func() {
		if len(pulls) == 0 || err != nil {
			return
		}
		err = p.commit(ctx, &pb.Command{Intent: &pb.Command_RecordPulls{RecordPulls: &pb.RecordPulls{Pulls: pulls}}})
		if err == nil {
			p.mu.Lock()
			if len(p.sent) > maxPulls {
				p.sent = map[pullKey]int64{}
			}
			for _, x := range pulls {
				p.sent[pullKey{x.Repository, x.Digest}] = x.UnixNano
			}
			p.mu.Unlock()
		}
		pulls = pulls[:0]
	}
	for k, t := range batch {
		pulls = append(pulls, &pb.Pull{Repository: k.repo, Digest: k.digest, UnixNano: t})
		if len(pulls) == 1000 {
			send()
		}
	}
	send()
	if err != nil {
		p.mu.Lock()
		for k, t := range batch {
			if p.sent[k] < t && p.pending[k] < t && len(p.pending) < maxPulls {
				p.pending[k] = t
			}
		}
		p.mu.Unlock()
		p.logger.Warn("record pulls", "err", err)
	}
	return err
}
