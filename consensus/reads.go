package consensus

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// appliedWaiter lets readers wait until the FSM has applied an index.
type appliedWaiter struct {
	mu      sync.Mutex
	applied uint64
	changed chan struct{} // closed and replaced on every advance
	// last mirrors applied for readers that only compare (every local
	// read checks it), so they take no lock.
	last atomic.Uint64
}

func newAppliedWaiter(start uint64) *appliedWaiter {
	w := &appliedWaiter{applied: start, changed: make(chan struct{})}
	w.last.Store(start)
	return w
}

// advance records that index has been applied.
func (w *appliedWaiter) advance(index uint64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if index <= w.applied {
		return
	}
	w.applied = index
	w.last.Store(index)
	close(w.changed)
	w.changed = make(chan struct{})
}

func (w *appliedWaiter) current() (uint64, <-chan struct{}) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.applied, w.changed
}

// WaitApplied blocks until this node's state store reflects every entry up
// to index.
//
// The store's applied index moves only with commands. Raft's own entries
// (a new term's no-op, barriers, configuration changes) never reach the
// FSM, so a read index that lands on one of them is reached once Raft has
// processed it and no command lies between the store's index and it.
func (n *Node) WaitApplied(ctx context.Context, index uint64) error {
	poll := time.NewTicker(2 * time.Millisecond)
	defer poll.Stop()
	for {
		applied, changed := n.applied.current()
		if applied >= index || n.onlyRaftEntriesBetween(applied, index) {
			return nil
		}
		select {
		case <-changed:
		case <-poll.C:
		case <-ctx.Done():
			return fmt.Errorf("%w: waiting to apply index %d (at %d): %v", pb.ErrUnavailable, index, applied, ctx.Err())
		}
	}
}

// onlyRaftEntriesBetween reports whether Raft has processed index and every
// entry in (applied, index] is one the FSM never sees or one a snapshot
// already brought into the store.
func (n *Node) onlyRaftEntriesBetween(applied, index uint64) bool {
	if n.raft.AppliedIndex() < index {
		return false
	}
	var l raft.Log
	read := 0
	for i := applied + 1; i <= index; i++ {
		if read++; read > 1024 {
			return false
		}
		err := n.logs.GetLog(i, &l)
		switch {
		case errors.Is(err, raft.ErrLogNotFound):
			// Compacted behind a snapshot, or never received because this
			// node installed a snapshot: either way the store reflects every
			// entry the snapshot covers (one taken here was taken after the
			// FSM applied up to its index; an installed one is restored
			// before Raft records it). Without this, a node whose snapshot
			// ends in Raft's own entries waited for the next command.
			snap := n.lastSnapshotIndex()
			if i > snap {
				return false
			}
			i = snap
		case err != nil || l.Type == raft.LogCommand:
			return false
		}
	}
	return true
}

// lastSnapshotIndex is the index of the last snapshot Raft took or
// installed, 0 if none.
func (n *Node) lastSnapshotIndex() uint64 {
	i, _ := strconv.ParseUint(n.raft.Stats()["last_snapshot_index"], 10, 64)
	return i
}

// AppliedIndex is the last index this node's state store reflects.
func (n *Node) AppliedIndex() uint64 {
	return n.applied.last.Load()
}

// ReadIndex returns an index that a linearizable read must have applied
// before reading: the leader's commit index, taken after the leader has
// confirmed with a quorum that it still leads. Only the leader can answer;
// elsewhere it returns ErrNotLeader.
func (n *Node) ReadIndex(ctx context.Context) (uint64, error) {
	if !n.IsLeader() {
		return 0, pb.ErrNotLeader
	}
	// A new leader's commit index is only current once an entry of its own
	// term has committed; onLeader's barrier marks that.
	if !n.leaderReady.Load() {
		return 0, fmt.Errorf("%w: new leader has not committed its first entry yet", pb.ErrUnavailable)
	}
	index := n.raft.CommitIndex()
	// VerifyLeader has no timeout of its own: bound it by ctx.
	f := n.raft.VerifyLeader()
	done := make(chan error, 1)
	go func() { done <- f.Error() }()
	select {
	case err := <-done:
		if err != nil {
			return 0, fmt.Errorf("%w: %v", pb.ErrNotLeader, err)
		}
	case <-ctx.Done():
		return 0, fmt.Errorf("%w: confirming leadership: %v", pb.ErrUnavailable, ctx.Err())
	}
	n.readIndexes.Add(1)
	return index, nil
}

// ReadIndexBatcher shares one read-index round trip among every read that
// is waiting when the round starts. A read never joins a round that started
// before it arrived, so each read still observes every write acknowledged
// before it began.
type ReadIndexBatcher struct {
	fetch func(ctx context.Context) (uint64, error)
	// timeout bounds one round, independent of any single caller.
	timeout time.Duration

	mu      sync.Mutex
	pending []chan readIndexResult
	running bool
}

type readIndexResult struct {
	index uint64
	err   error
}

// NewReadIndexBatcher batches calls to fetch.
func NewReadIndexBatcher(fetch func(ctx context.Context) (uint64, error), timeout time.Duration) *ReadIndexBatcher {
	return &ReadIndexBatcher{fetch: fetch, timeout: timeout}
}

// ReadIndex returns a read index fetched after this call began.
func (b *ReadIndexBatcher) ReadIndex(ctx context.Context) (uint64, error) {
	ch := make(chan readIndexResult, 1)
	b.mu.Lock()
	b.pending = append(b.pending, ch)
	if !b.running {
		b.running = true
		go b.run()
	}
	b.mu.Unlock()
	select {
	case r := <-ch:
		return r.index, r.err
	case <-ctx.Done():
		return 0, fmt.Errorf("%w: %v", pb.ErrUnavailable, ctx.Err())
	}
}

func (b *ReadIndexBatcher) run() {
	for {
		b.mu.Lock()
		batch := b.pending
		b.pending = nil
		if len(batch) == 0 {
			b.running = false
			b.mu.Unlock()
			return
		}
		b.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), b.timeout)
		index, err := b.fetch(ctx)
		cancel()
		for _, ch := range batch {
			ch <- readIndexResult{index, err}
		}
	}
}

// Changed returns a channel that is closed when the next entry is applied
// (or a snapshot restored), for waiters on a condition of the state.
func (n *Node) Changed() <-chan struct{} {
	_, ch := n.applied.current()
	return ch
}
