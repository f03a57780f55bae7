package clustertest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"github.com/meridian-registry/meridian/node/clustertest/admin"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meridian-registry/meridian/node"
)

const (
	// startTimeout bounds New: starting every node and waiting until the
	// Raft configuration holds them all and each is ready.
	startTimeout = 2 * time.Minute
	// stopTimeout bounds one node's Close.
	stopTimeout = 20 * time.Second
	// poll is how often the Wait helpers look again.
	poll = 20 * time.Millisecond
)

// Option adjusts how New builds the cluster.
type Option func(*settings)

type settings struct {
	configs  []func(i int, c *node.Config)
	voters   int
	logLevel slog.Level
}

// WithConfig lets fn adjust node i's configuration before its first start
// (Restart reuses the result). Several WithConfig options apply in order,
// after the harness's own settings, so fn can override any of them.
func WithConfig(fn func(i int, c *node.Config)) Option {
	return func(s *settings) { s.configs = append(s.configs, fn) }
}

// WithVoters sets node.Config.Voters on every node: how many voters the
// leader keeps; the other servers join as non-voters. The default is 3.
func WithVoters(n int) Option {
	return func(s *settings) { s.voters = n }
}

// WithLogLevel sets the level of the nodes' logs, which go to the test log
// (default slog.LevelWarn).
func WithLogLevel(l slog.Level) Option {
	return func(s *settings) { s.logLevel = l }
}

// Cluster is a set of nodes running in this process.
type Cluster struct {
	t         testing.TB
	set       settings
	clusterID string
	blobDir   string
	net       *network
	logs      *logSink
	transport *http.Transport
	// adminPasswordFile holds AdminPassword for node 0's bootstrap.
	adminPasswordFile string

	mu      sync.Mutex
	members []*member
	closed  bool
}

// member is one node slot: its configuration, with the addresses it got at
// first start, and the running node (nil while stopped).
type member struct {
	cfg node.Config
	n   *node.Node
}

// New starts size nodes and returns once every one of them is in the Raft
// configuration (voters up to the configured count) and ready. Node 0
// bootstraps; the others join node 0's gossip address. The cluster is
// closed when the test ends.
func New(t testing.TB, size int, opts ...Option) *Cluster {
	t.Helper()
	if size < 1 {
		t.Fatalf("clustertest: size %d: want at least one node", size)
	}
	set := settings{voters: 3, logLevel: slog.LevelWarn}
	for _, o := range opts {
		o(&set)
	}
	id := make([]byte, 4)
	rand.Read(id)
	c := &Cluster{
		t:   t,
		set: set,
		// A cluster id of its own keeps this cluster's gossip apart from
		// any other cluster that reuses one of its ports.
		clusterID: "clustertest-" + hex.EncodeToString(id),
		blobDir:   t.TempDir(),
		net:       newNetwork(),
		logs:      &logSink{t: t},
		transport: newTransport(),
	}
	c.adminPasswordFile = admin.PasswordFile(t)
	t.Cleanup(c.logs.stop) // runs after Close: cleanups run last-in first-out
	t.Cleanup(c.Close)

	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	if _, err := c.Add(nil); err != nil {
		t.Fatalf("clustertest: start node 0: %v", err)
	}
	if err := c.Node(0).WaitReady(ctx); err != nil {
		t.Fatalf("clustertest: %v", err)
	}
	// The others join in parallel; each slot is reserved first so the
	// indexes stay in order.
	errs := make([]error, size)
	var wg sync.WaitGroup
	for i := 1; i < size; i++ {
		c.mu.Lock()
		c.members = append(c.members, &member{cfg: c.configLocked(i, nil)})
		c.mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = c.startMember(i, c.Config(i))
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatalf("clustertest: %v", err)
	}
	if err := c.waitMembers(ctx, size, min(size, set.voters)); err != nil {
		t.Fatalf("clustertest: %v", err)
	}
	for _, i := range c.Running() {
		if err := c.Node(i).WaitReady(ctx); err != nil {
			t.Fatalf("clustertest: %v", err)
		}
	}
	return c
}

// configLocked builds the configuration of a new node i, joining the
// gossip address of the first running node (none for the first node).
func (c *Cluster) configLocked(i int, adjust func(*node.Config)) node.Config {
	cfg := node.DefaultConfig()
	cfg.NodeID = fmt.Sprintf("node-%d", i)
	cfg.ClusterID = c.clusterID
	cfg.DataDir = c.t.TempDir()
	cfg.BlobDir = c.blobDir
	cfg.HTTPAddr = "127.0.0.1:0"
	cfg.GRPCAddr = "127.0.0.1:0"
	cfg.RaftAddr = "127.0.0.1:0"
	cfg.GossipAddr = "127.0.0.1:0"
	cfg.GossipProfile = "local"
	// Fast failure detection, still with margin for a loaded machine.
	cfg.RaftHeartbeatTimeout = 500 * time.Millisecond
	cfg.RaftElectionTimeout = 500 * time.Millisecond
	cfg.Voters = c.set.voters
	cfg.Auth.AdminPasswordFile = c.adminPasswordFile
	for _, m := range c.members {
		if m.n != nil {
			cfg.Join = []string{m.cfg.GossipAddr}
			break
		}
	}
	for _, fn := range c.set.configs {
		fn(i, &cfg)
	}
	if adjust != nil {
		adjust(&cfg)
	}
	return cfg
}

// Add starts one more node, configured like the others (adjust may change
// its configuration last) and joining the first running node. It returns
// the new node's index, or Start's error, in which case the cluster is
// unchanged.
func (c *Cluster) Add(adjust func(*node.Config)) (int, error) {
	c.mu.Lock()
	i := len(c.members)
	cfg := c.configLocked(i, adjust)
	c.members = append(c.members, &member{cfg: cfg})
	c.mu.Unlock()
	if err := c.startMember(i, cfg); err != nil {
		c.mu.Lock()
		if i == len(c.members)-1 {
			c.members = c.members[:i]
		}
		c.mu.Unlock()
		return -1, err
	}
	return i, nil
}

// startMember starts node i with cfg and records the addresses it got.
func (c *Cluster) startMember(i int, cfg node.Config) error {
	cfg.Dial = c.net.dialer(i)
	n, err := node.New(cfg, c.logs.logger(c.set.logLevel))
	if err != nil {
		return fmt.Errorf("node %d: %w", i, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	if err := n.Start(ctx); err != nil {
		return fmt.Errorf("start node %d: %w", i, err)
	}
	// Record the ports :0 gave, so a restart comes back on the same ones.
	cfg.HTTPAddr = actual(cfg.HTTPAddr, n.HTTPAddr())
	cfg.GRPCAddr = actual(cfg.GRPCAddr, n.GRPCAddr())
	cfg.RaftAddr = actual(cfg.RaftAddr, n.RaftAddr())
	cfg.GossipAddr = actual(cfg.GossipAddr, n.GossipAddr())
	c.net.setAddrs(i, n.RaftAddr(), n.GRPCAddr())

	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		go n.Close(context.Background())
		return errors.New("clustertest: cluster closed")
	}
	c.members[i].cfg, c.members[i].n = cfg, n
	return nil
}

// actual is the address to reuse on restart: the one the node reports
// when it was configured with port 0, the configured one otherwise.
func actual(configured, reported string) string {
	if _, port, err := net.SplitHostPort(configured); err == nil && port == "0" {
		return reported
	}
	return configured
}

// Size is how many nodes the cluster has, running or not.
func (c *Cluster) Size() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.members)
}

// Running lists the indexes of the nodes that run.
func (c *Cluster) Running() []int {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []int
	for i, m := range c.members {
		if m.n != nil {
			out = append(out, i)
		}
	}
	return out
}

// Node returns node i, nil while it is stopped.
func (c *Cluster) Node(i int) *node.Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.members[i].n
}

// Config returns node i's configuration, with the addresses it listens on
// (or listened on last, when stopped).
func (c *Cluster) Config(i int) node.Config {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.members[i].cfg
}

// Host is node i's HTTP host:port, as registry references want it.
func (c *Cluster) Host(i int) string { return c.Config(i).HTTPAddr }

// URL is node i's registry URL, http://host:port.
func (c *Cluster) URL(i int) string { return "http://" + c.Host(i) }

// Transport is an HTTP transport with keep-alive for talking to the nodes.
// The harness closes its idle connections before stopping a node, so that
// the node's HTTP shutdown does not wait for them.
// Requests without credentials of their own log in as the admin.
func (c *Cluster) Transport() http.RoundTripper { return admin.Transport(c.transport) }

// Client is an HTTP client over Transport.
func (c *Cluster) Client() *http.Client { return &http.Client{Transport: c.Transport()} }

// RawTransport is Transport without the admin's credentials.
func (c *Cluster) RawTransport() *http.Transport { return c.transport }

func newTransport() *http.Transport {
	tr := baseTransport.Clone()
	tr.MaxIdleConns = 256
	tr.MaxIdleConnsPerHost = 64
	return tr
}

// Stop closes node i gracefully (it stays a Raft member: stopping is not
// leaving); Kill is the crash. A stopped node stays stopped.
func (c *Cluster) Stop(i int) {
	c.mu.Lock()
	n := c.members[i].n
	c.members[i].n = nil
	c.mu.Unlock()
	if n == nil {
		return
	}
	c.transport.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
	defer cancel()
	if err := n.Close(ctx); err != nil {
		c.t.Errorf("clustertest: close node %d: %v", i, err)
	}
}

// Kill stops node i abruptly, as a crash would. First every Raft and gRPC
// connection between it and the other nodes drops and new ones are
// refused, so nothing it does from then on reaches them; then the node
// stops with no graceful step (node.Node.Kill: no leadership handoff, no
// gossip leave, in-flight requests fail). It stays a Raft member, and
// Restart brings it back on its data directory.
func (c *Cluster) Kill(i int) {
	c.mu.Lock()
	n := c.members[i].n
	c.members[i].n = nil
	c.mu.Unlock()
	if n == nil {
		return
	}
	c.net.kill(i)
	n.Kill()
}

// Restart starts stopped (or killed) node i again on its data directory and addresses.
// It returns once the node serves; it may still be catching up.
func (c *Cluster) Restart(i int) error { return c.RestartWith(i, nil) }

// RestartWith is Restart with adjust applied to the node's configuration
// first (for example RaftAddr = "127.0.0.1:0" to come back on a new port,
// which is then recorded for later restarts).
func (c *Cluster) RestartWith(i int, adjust func(*node.Config)) error {
	c.mu.Lock()
	m := c.members[i]
	running, cfg := m.n != nil, m.cfg
	c.mu.Unlock()
	if running {
		return fmt.Errorf("clustertest: node %d is running", i)
	}
	if adjust != nil {
		adjust(&cfg)
	}
	c.net.revive(i)
	return c.startMember(i, cfg)
}

// Leader returns the index of the leading node, waiting for one until ctx
// ends. Nodes that are cut off are not asked; of several nodes that believe
// they lead, the one with the highest term wins.
func (c *Cluster) Leader(ctx context.Context) (int, error) {
	for {
		if i := c.leader(); i >= 0 {
			return i, nil
		}
		if err := wait(ctx); err != nil {
			return -1, fmt.Errorf("clustertest: no leader: %w", err)
		}
	}
}

func (c *Cluster) leader() int {
	best, bestTerm := -1, uint64(0)
	for _, i := range c.Running() {
		n := c.Node(i)
		if n == nil || c.net.isCut(i) || !n.Consensus().IsLeader() {
			continue
		}
		if term := n.Consensus().Stats().Term; best < 0 || term > bestTerm {
			best, bestTerm = i, term
		}
	}
	return best
}

// WaitVoters waits until the leader's Raft configuration holds exactly n
// voters.
func (c *Cluster) WaitVoters(ctx context.Context, n int) error {
	var last string
	for {
		if i := c.leader(); i >= 0 {
			if l := c.Node(i); l != nil {
				servers, err := l.Consensus().Servers()
				voters := 0
				for _, s := range servers {
					if s.Voter {
						voters++
					}
				}
				if err == nil && voters == n {
					return nil
				}
				last = fmt.Sprintf("leader node %d has %d voters in %+v (err %v)", i, voters, servers, err)
			}
		}
		if err := wait(ctx); err != nil {
			return fmt.Errorf("clustertest: waiting for %d voters: %w; %s", n, err, last)
		}
	}
}

// waitMembers waits until the leader's configuration lists size servers,
// voters of them.
func (c *Cluster) waitMembers(ctx context.Context, size, voters int) error {
	var last string
	for {
		if i := c.leader(); i >= 0 {
			if l := c.Node(i); l != nil {
				servers, _ := l.Consensus().Servers()
				v := 0
				for _, s := range servers {
					if s.Voter {
						v++
					}
				}
				if len(servers) == size && v == voters {
					return nil
				}
				last = fmt.Sprintf("configuration %+v", servers)
			}
		}
		if err := wait(ctx); err != nil {
			return fmt.Errorf("waiting for %d servers (%d voters): %w; %s", size, voters, err, last)
		}
	}
}

// WaitConverged waits until every running node has applied everything the
// leader has committed and holds the same state (equal state digests at
// equal indexes).
func (c *Cluster) WaitConverged(ctx context.Context) error {
	var last string
	for {
		ok, state := c.converged()
		if ok {
			return nil
		}
		last = state
		if err := wait(ctx); err != nil {
			return fmt.Errorf("clustertest: not converged: %w\n%s", err, last)
		}
	}
}

// converged checks once, and describes what it saw.
func (c *Cluster) converged() (bool, string) {
	li := c.leader()
	if li < 0 {
		return false, "no leader"
	}
	l := c.Node(li)
	if l == nil {
		return false, "leader stopped"
	}
	commit := l.Consensus().Stats().CommitIndex
	var b strings.Builder
	fmt.Fprintf(&b, "leader node %d commit index %d", li, commit)
	ok := true
	var digest []byte
	var digestIndex uint64
	for _, i := range c.Running() {
		n := c.Node(i)
		if n == nil {
			continue
		}
		applied := n.Consensus().Stats().AppliedIndex
		fmt.Fprintf(&b, "\n  node %d: applied %d", i, applied)
		if applied != commit {
			ok = false
			continue
		}
		sum, index, err := n.Consensus().Store().Digest()
		fmt.Fprintf(&b, ", state digest %x at %d", sum, index)
		switch {
		case err != nil:
			fmt.Fprintf(&b, " (%v)", err)
			ok = false
		case digest == nil:
			digest, digestIndex = sum, index
		case !bytes.Equal(sum, digest) || index != digestIndex:
			ok = false
		}
	}
	return ok, b.String()
}

// Cut partitions the given nodes, together, from all the others: Raft and
// gRPC dials between the two sides fail at once, and open connections
// between them are closed. Gossip and client HTTP are not cut.
func (c *Cluster) Cut(nodes ...int) {
	c.net.regroup(c.net.newGroup(), nodes...)
}

// Heal reconnects the given nodes with the main side of the cluster.
func (c *Cluster) Heal(nodes ...int) {
	c.net.regroup(0, nodes...)
}

// Close stops every running node. It is registered with t.Cleanup by New
// and safe to call more than once.
func (c *Cluster) Close() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	var running []int
	for i, m := range c.members {
		if m.n != nil {
			running = append(running, i)
		}
	}
	c.mu.Unlock()
	var wg sync.WaitGroup
	for _, i := range running {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.Stop(i)
		}()
	}
	wg.Wait()
	c.net.closeAll()
	c.transport.CloseIdleConnections()
}

// wait sleeps one poll interval, or returns ctx's error once it ends.
func wait(ctx context.Context) error {
	t := time.NewTimer(poll)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// TestLogger returns a logger that writes records at level and above to
// t's log until t ends (goroutines may log after that).
func TestLogger(t testing.TB, level slog.Level) *slog.Logger {
	s := &logSink{t: t}
	t.Cleanup(s.stop)
	return s.logger(level)
}

// logSink sends the nodes' logs to the test log until the test ends (Raft
// may still log from goroutines that outlive it).
type logSink struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (s *logSink) logger(level slog.Level) *slog.Logger {
	return slog.New(slog.NewTextHandler(s, &slog.HandlerOptions{Level: level}))
}

func (s *logSink) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.done {
		s.t.Logf("%s", bytes.TrimRight(p, "\n"))
	}
	return len(p), nil
}

func (s *logSink) stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.done = true
}
