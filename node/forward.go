package node

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// commit validates cmd and commits it: on the leader directly, elsewhere
// by forwarding the command to the leader once (the leader validates it
// again and builds the log entry). While no leader is known it waits, with
// jitter, until ctx (or the apply timeout) runs out, then answers
// ErrUnavailable. An invalid command answers ErrInvalidArgument and
// commits nothing. A policy change returns once this node has applied it
// too, so the next push through the same node follows it; other writes
// do not wait (a follower learns of a commit with the leader's next
// append, up to a heartbeat later: tens of milliseconds on every write);
// instead the node's next local read waits for it (Node.acked), so only
// a read right after a write pays that wait.
//
// The actor in ctx (pb.WithActor) is recorded in the entry for the audit
// log.
func (n *Node) commit(ctx context.Context, cmd *pb.Command) error {
	_, err := n.commitIndexed(ctx, cmd)
	return err
}

// commitIndexed is commit that also returns the log index the entry was
// committed at (0 when none is known: nothing was sent, or the leader
// refused it before proposing).
func (n *Node) commitIndexed(ctx context.Context, cmd *pb.Command) (uint64, error) {
	if err := n.validateCommand(ctx, cmd); err != nil {
		return 0, err
	}
	var index uint64
	actor := pb.ActorFrom(ctx)
	err := n.onLeader(ctx, func(ctx context.Context, cc grpc.ClientConnInterface) error {
		resp, err := pb.NewMemberClient(cc).Forward(ctx, &pb.CommitRequest{Command: cmd, Actor: actor})
		if err != nil {
			return fromGRPC(err)
		}
		index = resp.Index
		return resp.Result.Err()
	}, func(ctx context.Context) (err error) {
		if err := n.mayWrite(ctx, cmd); err != nil {
			return err
		}
		index, err = n.consensus.Commit(ctx, cmd, actor)
		return err
	})
	noteAcked(&n.acked, index)
	if index > 0 && seenAtOnce(cmd) {
		wctx, cancel := context.WithTimeout(ctx, n.cfg.ApplyTimeout)
		defer cancel()
		if werr := n.consensus.WaitApplied(wctx, index); werr != nil {
			// The write is committed and stays acknowledged; only a read
			// through this node right away may not see it yet.
			n.logger.Warn("a write committed by the leader is not yet applied here", "index", index, "err", werr)
		}
	}
	return index, err
}

// seenAtOnce reports commands whose effect this node must see at once:
// pushes through it right after a policy change follow the new policy, the
// replicator must not read a removal it committed as still to do (it would
// delete again, perhaps a new push's bytes), and `meridian webhook list`
// right after `webhook add`, `delete` or a replay through the same node
// shows it.
func seenAtOnce(cmd *pb.Command) bool {
	switch cmd.GetIntent().(type) {
	case *pb.Command_SetPolicy, *pb.Command_DeletePolicy, *pb.Command_BlobRemoved,
		*pb.Command_PutWebhook, *pb.Command_DeleteWebhook, *pb.Command_ReplayDeadLetters:
		return true
	}
	return false
}

// onLeader runs local on this node when it leads, or remote against the
// leader's gRPC services. It retries while the answer is "not the leader"
// (nothing was done) or no leader is known, until the deadline.
func (n *Node) onLeader(ctx context.Context, remote func(context.Context, grpc.ClientConnInterface) error, local func(context.Context) error) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, n.cfg.ApplyTimeout)
		defer cancel()
	}
	var last error
	for attempt := 0; ; attempt++ {
		var err error
		leaderID, _ := n.consensus.Leader()
		switch {
		case n.consensus.IsLeader():
			err = local(ctx)
		case leaderID == "":
			// Nothing was sent: wait for an election.
			err = fmt.Errorf("%w: %w: no leader elected", pb.ErrUnavailable, errNotSent)
		default:
			err = n.callPeer(ctx, leaderID, remote)
		}
		if err == nil || !retryable(err) {
			return err
		}
		last = err
		// Short waits: an election takes about a heartbeat timeout, and a
		// long backoff would notice the new leader late.
		backoff := time.Duration(10+rand.IntN(40)) * time.Millisecond << min(attempt, 1)
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: %v (last: %v)", pb.ErrUnavailable, ctx.Err(), last)
		case <-time.After(backoff):
		}
	}
}

// retryable reports failures after which nothing was written: the node
// asked was not the leader, none was known or reachable to ask, or the call
// has no effect anyway.
func retryable(err error) bool {
	return errors.Is(err, pb.ErrNotLeader) || errors.Is(err, errNoLeaderAddress) ||
		(errors.Is(err, pb.ErrUnavailable) && (errors.Is(err, errNotSent) || errors.Is(err, errNoEffect)))
}

var (
	errNoLeaderAddress = errors.New("leader's gRPC address is not known yet")
	errNotSent         = errors.New("request not sent")
	errNoEffect        = errors.New("the call changes nothing")
)

// noEffect marks a failure of a call that changes nothing (a read index),
// so that onLeader asks again, of the same or a new leader, until its
// deadline: a leader that just died or has not committed its first entry
// yet is then waited out instead of failing the read.
func noEffect(err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%w: %w", errNoEffect, err)
}

// callPeer runs fn over the pooled connection to node id.
func (n *Node) callPeer(ctx context.Context, id string, fn func(context.Context, grpc.ClientConnInterface) error) error {
	addr := n.grpcAddrOf(id)
	if addr == "" {
		return fmt.Errorf("%w: %w (node %s)", pb.ErrUnavailable, errNoLeaderAddress, id)
	}
	c, err := n.peers.conn(addr)
	if err != nil {
		return fmt.Errorf("%w: %w: %v", pb.ErrUnavailable, errNotSent, err)
	}
	return fn(forwardContext(ctx), c)
}

// grpcAddrOf finds a node's gRPC address through gossip.
func (n *Node) grpcAddrOf(id string) string {
	if id == n.cfg.NodeID {
		return n.GRPCAddr()
	}
	if m, ok := n.membership.Member(id); ok {
		return m.GRPCAddr
	}
	return ""
}

// readIndex fetches a read index from the leader (or itself when leading).
func (n *Node) readIndex(ctx context.Context) (uint64, error) {
	var index uint64
	err := n.onLeader(ctx, func(ctx context.Context, cc grpc.ClientConnInterface) error {
		resp, err := pb.NewMemberClient(cc).ReadIndex(ctx, &pb.ReadIndexRequest{})
		if err != nil {
			return noEffect(fromGRPC(err))
		}
		index = resp.Index
		return nil
	}, func(ctx context.Context) (err error) {
		index, err = n.consensus.ReadIndex(ctx)
		return noEffect(err)
	})
	return index, err
}

// catchUp makes this replica at least as new as the leader was when the
// call began: every write acknowledged before it is then visible here.
func (n *Node) catchUp(ctx context.Context) error {
	if n.skipReadIndex.Load() {
		n.caughtUp.Store(true)
		return nil
	}
	if _, ok := ctx.Deadline(); !ok {
		// HTTP requests carry no deadline: bound the wait like a write's, so
		// a node that cannot catch up answers 503 instead of hanging.
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, n.cfg.ApplyTimeout)
		defer cancel()
	}
	index, err := n.readIndexes.ReadIndex(ctx)
	if err != nil {
		return err
	}
	if err := n.consensus.WaitApplied(ctx, index); err != nil {
		return err
	}
	n.caughtUp.Store(true)
	return nil
}

// noteAcked raises *acked to index.
func noteAcked(acked *atomic.Uint64, index uint64) {
	for {
		cur := acked.Load()
		if index <= cur || acked.CompareAndSwap(cur, index) {
			return
		}
	}
}
