package consensus

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// Config configures a consensus Node.
type Config struct {
	// NodeID is the node's stable Raft server id.
	NodeID string
	// DataDir holds raft/, state/ and snapshots/.
	DataDir string
	// RaftListener carries Raft traffic. The caller opens it, so tests can
	// hand in 127.0.0.1:0 listeners without port races.
	RaftListener net.Listener
	// AdvertiseRaft is the address other nodes dial; empty means the
	// listener's address.
	AdvertiseRaft string
	// Bootstrap makes a node with no Raft state start a new single-voter
	// cluster. A node that has state never bootstraps again.
	Bootstrap bool
	// ApplyTimeout bounds how long a proposal waits for a leader and commit
	// when the caller's context has no deadline.
	ApplyTimeout time.Duration
	// SnapshotThreshold and SnapshotInterval control log compaction;
	// TrailingLogs is how many entries stay behind a snapshot for
	// followers that lag a little.
	SnapshotThreshold uint64
	SnapshotInterval  time.Duration
	TrailingLogs      uint64
	// LogVersionOf reports the newest log format server id applies, as it
	// advertises, and whether it is alive to say so (the node answers from
	// gossip). The leader proposes an entry of a format above 1 only when
	// every server of the configuration applies it. nil: none is known to.
	LogVersionOf func(id string) (version uint32, alive bool)
	// Dial opens Raft connections to peers; nil means net.DialTimeout. Tests
	// use it to cut nodes off from each other.
	Dial func(addr string, timeout time.Duration) (net.Conn, error)
	// Raft timings; zero values take hashicorp/raft's defaults.
	HeartbeatTimeout time.Duration
	ElectionTimeout  time.Duration
	Logger           *slog.Logger
}

// DefaultConfig returns the settings a single node runs with.
func DefaultConfig() Config {
	return Config{
		ApplyTimeout:      10 * time.Second,
		SnapshotThreshold: 8192,
		SnapshotInterval:  2 * time.Minute,
		TrailingLogs:      10240,
		Logger:            slog.Default(),
	}
}

// Node is one member of the Raft group: the log, the FSM and the store.
type Node struct {
	cfg       Config
	logger    *slog.Logger
	store     *Store
	logs      *LogStore
	snapshots *raft.FileSnapshotStore
	transport *raft.NetworkTransport
	raft      *raft.Raft
	stop      chan struct{}
	done      chan struct{}

	// applied lets reads wait for an index; leaderReady is set once this
	// node, as leader, has committed an entry of its own term.
	applied     *appliedWaiter
	leaderReady atomic.Bool
	// readIndexes counts the read indexes served as leader (RaftStats).
	readIndexes atomic.Uint64
}

// NewNode returns a Node; Open starts it.
func NewNode(cfg Config) *Node {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Node{cfg: cfg, logger: cfg.Logger.With("component", "consensus")}
}

// Open opens the stores, starts Raft and bootstraps a new cluster when asked
// to and no state exists.
func (n *Node) Open(ctx context.Context) (err error) {
	defer func() {
		if err != nil {
			n.Close()
		}
	}()
	if n.cfg.NodeID == "" {
		return errors.New("consensus: node id is required")
	}
	if n.cfg.RaftListener == nil {
		return errors.New("consensus: a Raft listener is required")
	}
	if n.store, err = OpenStore(filepath.Join(n.cfg.DataDir, "state"), n.logger); err != nil {
		return err
	}
	if n.logs, err = OpenLogStore(filepath.Join(n.cfg.DataDir, "raft"), n.logger); err != nil {
		return err
	}
	hlog := newHCLogger(n.logger)
	// raft would create snapshots/ open to every user (0755): snapshots
	// hold the whole state, upload key included.
	if err := os.MkdirAll(filepath.Join(n.cfg.DataDir, "snapshots"), 0o700); err != nil {
		return fmt.Errorf("open snapshot store: %w", err)
	}
	if n.snapshots, err = raft.NewFileSnapshotStoreWithLogger(n.cfg.DataDir, 2, hlog); err != nil {
		return fmt.Errorf("open snapshot store: %w", err)
	}
	advertise := n.cfg.RaftListener.Addr()
	if n.cfg.AdvertiseRaft != "" {
		if advertise, err = advertiseAddr(n.cfg.AdvertiseRaft); err != nil {
			return err
		}
	}
	n.transport = raft.NewNetworkTransportWithLogger(
		&streamLayer{Listener: n.cfg.RaftListener, advertise: advertise, dial: n.cfg.Dial}, 3, 10*time.Second, hlog)

	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(n.cfg.NodeID)
	rc.Logger = hlog
	rc.NoSnapshotRestoreOnStart = true // the Pebble store is itself durable
	rc.NoLegacyTelemetry = true
	// An idle leader tells followers of a new commit index after
	// CommitTimeout (up to twice it, randomised); Raft's default is 50 ms.
	// Local reads after a write through a follower, misses confirmed with
	// the leader and strong reads on followers all wait for that. At 10 ms
	// a push then a tags list through a follower takes 17 ms instead of
	// 84, for one empty AppendEntries per follower every 10-20 ms while
	// idle (an idle three-node cluster: 4.3% of a core instead of 3.0%;
	// 5 ms would cost 6.3%).
	rc.CommitTimeout = 10 * time.Millisecond
	rc.SnapshotThreshold = n.cfg.SnapshotThreshold
	rc.SnapshotInterval = n.cfg.SnapshotInterval
	rc.TrailingLogs = n.cfg.TrailingLogs
	if n.cfg.HeartbeatTimeout > 0 {
		rc.HeartbeatTimeout = n.cfg.HeartbeatTimeout
		rc.LeaderLeaseTimeout = n.cfg.HeartbeatTimeout
	}
	if n.cfg.ElectionTimeout > 0 {
		rc.ElectionTimeout = n.cfg.ElectionTimeout
	}
	if err := raft.ValidateConfig(rc); err != nil {
		return fmt.Errorf("raft config: %w", err)
	}

	hasState, err := raft.HasExistingState(n.logs, n.logs, n.snapshots)
	if err != nil {
		return err
	}
	applied, _, err := n.store.AppliedIndex()
	if err != nil {
		return err
	}
	n.applied = newAppliedWaiter(applied)
	f := &fsm{store: n.store, logger: n.logger, onApplied: n.applied.advance}
	if n.raft, err = raft.NewRaft(rc, f, n.logs, n.logs, n.snapshots, n.transport); err != nil {
		return fmt.Errorf("start raft: %w", err)
	}
	if !hasState && n.cfg.Bootstrap {
		n.logger.Info("bootstrapping a new cluster", "node_id", n.cfg.NodeID, "raft_addr", advertise.String())
		boot := raft.Configuration{Servers: []raft.Server{{
			ID: rc.LocalID, Address: raft.ServerAddress(advertise.String()), Suffrage: raft.Voter,
		}}}
		if err := n.raft.BootstrapCluster(boot).Error(); err != nil {
			return fmt.Errorf("bootstrap: %w", err)
		}
	}
	n.stop, n.done = make(chan struct{}), make(chan struct{})
	go n.leaderDuties()
	return nil
}

// Store returns the local state store for reads.
func (n *Node) Store() *Store { return n.store }

// Raft exposes the underlying raft for cluster administration.
func (n *Node) Raft() *raft.Raft { return n.raft }

// Addr is the Raft address other nodes reach this one at.
func (n *Node) Addr() string { return string(n.transport.LocalAddr()) }

// IsLeader reports whether this node is the current leader.
func (n *Node) IsLeader() bool { return n.raft != nil && n.raft.State() == raft.Leader }

// WaitLeader blocks until the cluster has a leader or ctx ends.
func (n *Node) WaitLeader(ctx context.Context) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		if addr, _ := n.raft.LeaderWithID(); addr != "" {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: no leader elected", pb.ErrUnavailable)
		case <-t.C:
		}
	}
}

// Propose commits e through Raft and returns the apply result: nil, or a
// business error (*meridianpb.Error) such as a failed tag precondition.
// Proposals must be made on the leader; elsewhere ErrNotLeader comes back.
func (n *Node) Propose(ctx context.Context, e *pb.LogEntry) error {
	_, err := n.propose(ctx, e)
	return err
}

// propose is Propose, also returning the entry's log index once applied
// (0 when it was not).
func (n *Node) propose(ctx context.Context, e *pb.LogEntry) (uint64, error) {
	// An entry is stamped with the format its command needs, never less,
	// and enters the log only once every server can apply that format.
	if need := entryVersion(e); e.Version < need {
		e.Version = need
	}
	if err := n.checkLogFormat(e); err != nil && !degrade(e) {
		return 0, err
	}
	if e.TimeUnixNano == 0 {
		e.TimeUnixNano = time.Now().UnixNano()
	}
	data, err := proto.Marshal(e)
	if err != nil {
		return 0, err
	}
	if err := ctx.Err(); err != nil {
		// The caller already gave up: proposing now would write on its behalf.
		return 0, fmt.Errorf("%w: %v", pb.ErrUnavailable, err)
	}
	if _, ok := ctx.Deadline(); !ok {
		// ApplyTimeout bounds the whole wait, not only raft's enqueue: a
		// future can go unanswered (one queued for the FSM at shutdown).
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, n.cfg.ApplyTimeout)
		defer cancel()
	}
	deadline, _ := ctx.Deadline()
	timeout := time.Until(deadline)
	if timeout <= 0 {
		return 0, fmt.Errorf("%w: %v", pb.ErrUnavailable, context.DeadlineExceeded)
	}
	f := n.raft.Apply(data, timeout)
	done := make(chan error, 1)
	go func() { done <- f.Error() }()
	select {
	case err = <-done:
	case <-ctx.Done():
		// The entry may still commit; the caller only stops waiting.
		return 0, fmt.Errorf("%w: %v", pb.ErrUnavailable, ctx.Err())
	}
	switch {
	case err == nil:
	case errors.Is(err, raft.ErrNotLeader), errors.Is(err, raft.ErrLeadershipTransferInProgress):
		// Refused before it entered the log: safe to send to the leader.
		return 0, fmt.Errorf("%w: %v", pb.ErrNotLeader, err)
	default:
		// Including ErrLeadershipLost: the entry may still commit, so the
		// caller must not blindly retry it elsewhere.
		return 0, fmt.Errorf("%w: %v", pb.ErrUnavailable, err)
	}
	if resp, ok := f.Response().(error); ok && resp != nil {
		return f.Index(), resp
	}
	return f.Index(), nil
}

// leaderDuties runs what only the leader does: installing the upload key once
// and keeping its own address current in the configuration.
func (n *Node) leaderDuties() {
	defer close(n.done)
	for {
		select {
		case <-n.stop:
			return
		case isLeader := <-n.raft.LeaderCh():
			n.leaderReady.Store(false)
			if isLeader {
				n.onLeader()
			}
		}
	}
}

func (n *Node) onLeader() {
	ctx, cancel := context.WithTimeout(context.Background(), n.cfg.ApplyTimeout)
	defer cancel()
	// Once an entry of this term commits, the commit index is current and
	// read-index reads may be served.
	if err := n.raft.Barrier(n.cfg.ApplyTimeout).Error(); err != nil {
		n.logger.Warn("leader barrier", "err", err)
		return
	}
	n.leaderReady.Store(n.IsLeader())
	if err := n.updateOwnAddress(); err != nil {
		n.logger.Warn("update own raft address", "err", err)
	}
	if k, err := n.store.UploadKey(ctx); err == nil && k == nil {
		if err := n.RotateUploadKey(ctx, 0, 0); err != nil {
			n.logger.Warn("install upload key", "err", err)
		}
	}
}

// RotateUploadKey adds a fresh upload-token key to the ring when the
// newest is older than every (at once when there is none), and retires
// keys replaced more than retain ago (the upload TTL: no token they sealed
// is still valid). The leader calls it; elsewhere it answers ErrNotLeader.
func (n *Node) RotateUploadKey(ctx context.Context, every, retain time.Duration) error {
	keys, err := n.store.UploadKeys(ctx)
	if err != nil {
		return err
	}
	now := time.Now()
	if len(keys) > 0 && (every <= 0 || now.Sub(time.Unix(0, keys[len(keys)-1].CreatedUnixNano)) < every) {
		return nil
	}
	key := make([]byte, 32)
	rand.Read(key)
	c := &pb.RotateUploadKey{Key: key}
	if retain > 0 {
		c.RetireBeforeUnixNano = now.Add(-retain).UnixNano()
	}
	err = n.Propose(ctx, &pb.LogEntry{TimeUnixNano: now.UnixNano(), Command: &pb.LogEntry_RotateUploadKey{RotateUploadKey: c}})
	if err == nil && len(keys) > 0 {
		n.logger.Info("rotated the upload-token key", "keys_before", len(keys))
	}
	return err
}

// updateOwnAddress re-adds this node under its current address when it was
// restarted on another one (e.g. a :0 port in tests).
func (n *Node) updateOwnAddress() error {
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return err
	}
	for _, s := range f.Configuration().Servers {
		if s.ID == raft.ServerID(n.cfg.NodeID) && s.Address != n.transport.LocalAddr() {
			n.logger.Info("raft address changed", "from", s.Address, "to", n.transport.LocalAddr())
			if s.Suffrage == raft.Voter {
				return n.raft.AddVoter(s.ID, n.transport.LocalAddr(), 0, 0).Error()
			}
			return n.raft.AddNonvoter(s.ID, n.transport.LocalAddr(), 0, 0).Error()
		}
	}
	return nil
}

// Close stops Raft and closes the stores. It is safe to call more than once.
func (n *Node) Close() error {
	var errs []error
	if n.stop != nil {
		close(n.stop)
		<-n.done
		n.stop = nil
	}
	if n.raft != nil {
		// n.raft stays set: Shutdown is idempotent, and a Propose that races
		// Close then gets raft.ErrRaftShutdown instead of a nil dereference.
		errs = append(errs, n.raft.Shutdown().Error())
	}
	if n.transport != nil {
		errs = append(errs, n.transport.Close())
		n.transport = nil
	}
	if n.logs != nil {
		errs = append(errs, n.logs.Close())
		n.logs = nil
	}
	if n.store != nil {
		errs = append(errs, n.store.Close())
	}
	return errors.Join(errs...)
}

// hostAddr is an advertised Raft address kept as written. A host name
// stays a name in the Raft configuration and is resolved at every dial, so
// servers that all come back on new IPs at once (the pods of a restarted
// StatefulSet, reached by stable DNS names) still find each other; with
// resolved IPs they would keep dialing the old ones and never elect a
// leader, and only a leader updates addresses.
type hostAddr string

func (a hostAddr) Network() string { return "tcp" }
func (a hostAddr) String() string  { return string(a) }

// advertiseAddr checks an advertised host:port without resolving it: the
// name of a pod that was just created may not resolve yet.
func advertiseAddr(s string) (net.Addr, error) {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return nil, fmt.Errorf("advertise raft address %q: %w", s, err)
	}
	if _, err := net.LookupPort("tcp", port); err != nil || port == "0" {
		return nil, fmt.Errorf("advertise raft address %q: want a fixed port", s)
	}
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		return nil, fmt.Errorf("advertise raft address %q: want a host other nodes can dial", s)
	}
	return hostAddr(s), nil
}

// streamLayer is hashicorp/raft's TCP stream layer over a caller-provided
// listener; TLS can wrap it later without touching Raft.
type streamLayer struct {
	net.Listener
	advertise net.Addr
	dial      func(addr string, timeout time.Duration) (net.Conn, error)
}

func (s *streamLayer) Addr() net.Addr { return s.advertise }

func (s *streamLayer) Dial(addr raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	if s.dial != nil {
		return s.dial(string(addr), timeout)
	}
	return net.DialTimeout("tcp", string(addr), timeout)
}
