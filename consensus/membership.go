package consensus

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/hashicorp/raft"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// ErrLastVoter refuses a change that would leave the cluster without a voter.
var ErrLastVoter = errors.New("consensus: refusing to remove the last voter")

// Server is one member of the Raft configuration.
type Server struct {
	ID      string
	Address string
	Voter   bool
}

// Servers returns the current Raft configuration.
func (n *Node) Servers() ([]Server, error) {
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, err
	}
	var out []Server
	for _, s := range f.Configuration().Servers {
		out = append(out, Server{ID: string(s.ID), Address: string(s.Address), Voter: s.Suffrage == raft.Voter})
	}
	return out, nil
}

// Leader returns the current leader's id and Raft address, empty when none
// is known.
func (n *Node) Leader() (id, addr string) {
	a, i := n.raft.LeaderWithID()
	return string(i), string(a)
}

// ID is this node's Raft server id.
func (n *Node) ID() string { return n.cfg.NodeID }

// AddServer adds id at addr as a voter or non-voter, or updates its
// address or suffrage. Leader only.
func (n *Node) AddServer(ctx context.Context, id, addr string, voter bool) error {
	timeout := timeoutOf(ctx, n.cfg.ApplyTimeout)
	var f raft.IndexFuture
	if voter {
		f = n.raft.AddVoter(raft.ServerID(id), raft.ServerAddress(addr), 0, timeout)
	} else {
		f = n.raft.AddNonvoter(raft.ServerID(id), raft.ServerAddress(addr), 0, timeout)
	}
	return raftError(f.Error())
}

// DemoteVoter turns a voter into a non-voter. Leader only.
func (n *Node) DemoteVoter(ctx context.Context, id string) error {
	if err := n.checkKeepsAVoter(id); err != nil {
		return err
	}
	return raftError(n.raft.DemoteVoter(raft.ServerID(id), 0, timeoutOf(ctx, n.cfg.ApplyTimeout)).Error())
}

// RemoveServer removes id from the configuration. Removing the last voter
// is refused. Leader only.
func (n *Node) RemoveServer(ctx context.Context, id string) error {
	servers, err := n.Servers()
	if err != nil {
		return err
	}
	found := false
	for _, s := range servers {
		found = found || s.ID == id
	}
	if !found {
		return fmt.Errorf("consensus: %q is not in the configuration", id)
	}
	if err := n.checkKeepsAVoter(id); err != nil {
		return err
	}
	return raftError(n.raft.RemoveServer(raft.ServerID(id), 0, timeoutOf(ctx, n.cfg.ApplyTimeout)).Error())
}

func (n *Node) checkKeepsAVoter(id string) error {
	servers, err := n.Servers()
	if err != nil {
		return err
	}
	others := 0
	for _, s := range servers {
		if s.Voter && s.ID != id {
			others++
		}
	}
	if others == 0 {
		return ErrLastVoter
	}
	return nil
}

// TransferLeadership hands leadership to id, or to the most up-to-date
// voter when id is empty, and waits until it has moved.
func (n *Node) TransferLeadership(ctx context.Context, id string) error {
	var f raft.Future
	if id == "" {
		f = n.raft.LeadershipTransfer()
	} else {
		addr := ""
		servers, err := n.Servers()
		if err != nil {
			return err
		}
		for _, s := range servers {
			if s.ID == id && s.Voter {
				addr = s.Address
			}
		}
		if addr == "" {
			return fmt.Errorf("consensus: %q is not a voter", id)
		}
		f = n.raft.LeadershipTransferToServer(raft.ServerID(id), raft.ServerAddress(addr))
	}
	done := make(chan error, 1)
	go func() { done <- f.Error() }()
	select {
	case err := <-done:
		return raftError(err)
	case <-ctx.Done():
		return fmt.Errorf("%w: %v", pb.ErrUnavailable, ctx.Err())
	}
}

// RaftStats is this node's view of Raft, for status reports. AppliedIndex
// counts every entry Raft has processed, its own entries included.
type RaftStats struct {
	State        string
	Term         uint64
	CommitIndex  uint64
	AppliedIndex uint64
	LastLogIndex uint64
	// ReadIndexes counts the read indexes this node has served as leader
	// since it opened: each is a round of reads that needed the leader.
	ReadIndexes uint64
}

// Stats reports this node's Raft progress.
func (n *Node) Stats() RaftStats {
	return RaftStats{
		State:        n.raft.State().String(),
		Term:         n.raft.CurrentTerm(),
		CommitIndex:  n.raft.CommitIndex(),
		AppliedIndex: n.raft.AppliedIndex(),
		LastLogIndex: n.raft.LastIndex(),
		ReadIndexes:  n.readIndexes.Load(),
	}
}

// raftError classifies a hashicorp/raft failure.
func raftError(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, raft.ErrNotLeader), errors.Is(err, raft.ErrLeadershipLost),
		errors.Is(err, raft.ErrLeadershipTransferInProgress):
		return fmt.Errorf("%w: %v", pb.ErrNotLeader, err)
	default:
		return fmt.Errorf("%w: %v", pb.ErrUnavailable, err)
	}
}

func timeoutOf(ctx context.Context, fallback time.Duration) time.Duration {
	if d, ok := ctx.Deadline(); ok {
		return max(time.Until(d), time.Millisecond)
	}
	return fallback
}

// Recover rewrites the Raft configuration of a stopped node to exactly
// servers, for disaster recovery after a quorum is lost for good. Run it on
// every surviving node with the same servers, then start them. See
// hashicorp/raft's RecoverCluster.
func Recover(cfg Config, servers []Server) error {
	if len(servers) == 0 {
		return errors.New("consensus: recover needs at least one server")
	}
	voters := 0
	conf := raft.Configuration{}
	for _, s := range servers {
		suffrage := raft.Nonvoter
		if s.Voter {
			suffrage = raft.Voter
			voters++
		}
		conf.Servers = append(conf.Servers, raft.Server{ID: raft.ServerID(s.ID), Address: raft.ServerAddress(s.Address), Suffrage: suffrage})
	}
	if voters == 0 {
		return errors.New("consensus: recover needs at least one voter")
	}
	if cfg.Logger == nil {
		cfg.Logger = DefaultConfig().Logger
	}
	store, err := OpenStore(filepath.Join(cfg.DataDir, "state"), cfg.Logger)
	if err != nil {
		return err
	}
	defer store.Close()
	logs, err := OpenLogStore(filepath.Join(cfg.DataDir, "raft"), cfg.Logger)
	if err != nil {
		return err
	}
	defer logs.Close()
	hlog := newHCLogger(cfg.Logger)
	snaps, err := raft.NewFileSnapshotStoreWithLogger(cfg.DataDir, 2, hlog)
	if err != nil {
		return err
	}
	has, err := raft.HasExistingState(logs, logs, snaps)
	if err != nil {
		return err
	}
	if !has {
		return fmt.Errorf("consensus: %s holds no Raft state to recover", cfg.DataDir)
	}
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.NodeID)
	rc.Logger = hlog
	rc.NoSnapshotRestoreOnStart = true
	_, trans := raft.NewInmemTransport("")
	f := &fsm{store: store, logger: cfg.Logger}
	return raft.RecoverCluster(rc, f, logs, logs, snaps, trans, conf)
}

// HasState reports whether dataDir already holds Raft state, i.e. whether a
// node there has been part of a cluster before.
func HasState(dataDir string) (bool, error) {
	raftDir := filepath.Join(dataDir, "raft")
	if _, err := os.Stat(raftDir); errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	logs, err := OpenLogStore(raftDir, nil)
	if err != nil {
		return false, err
	}
	defer logs.Close()
	last, err := logs.LastIndex()
	if err != nil {
		return false, err
	}
	if last > 0 {
		return true, nil
	}
	term, err := logs.GetUint64([]byte("CurrentTerm"))
	if err != nil && !errors.Is(err, ErrStableKeyNotFound) {
		return false, err
	}
	return term > 0, nil
}
