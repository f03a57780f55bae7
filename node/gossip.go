package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/meridian-registry/meridian/consensus"
	"github.com/meridian-registry/meridian/node/membership"
)

// startMembership starts gossip with this node's metadata.
func (n *Node) startMembership() error {
	mc := membership.DefaultConfig()
	mc.Meta = membership.Meta{
		ID: n.cfg.NodeID, ClusterID: n.cfg.ClusterID, Region: n.cfg.Region, Zone: n.cfg.Zone,
		Role: membership.RoleServer, RaftAddr: n.consensus.Addr(), GRPCAddr: n.GRPCAddr(),
		HTTPAddr: n.advertisedHTTP(), Version: membership.ProtocolVersion,
		Topology: n.cfg.topologyFingerprint(), LogVersion: consensus.LogVersion,
	}
	mc.BindAddr = n.cfg.GossipAddr
	mc.AdvertiseAddr = n.cfg.AdvertiseGossip
	switch n.cfg.GossipProfile {
	case "wan":
		mc.Timings = membership.WANTimings()
	case "local":
		mc.Timings = membership.LocalTimings()
	}
	mc.Keys = n.gossipKeys
	mc.OnKeysChanged = saveGossipKeys(n.cfg.GossipKeyFile)
	mc.Logger = n.logger
	m, err := membership.New(mc)
	if err != nil {
		return fmt.Errorf("gossip: %w", err)
	}
	if err := m.Start(); err != nil {
		return fmt.Errorf("gossip: %w", err)
	}
	n.membership = m
	return nil
}

// logVersionOf is the log format server id advertises in gossip, and
// whether it is alive there to advertise it (consensus.Config.LogVersionOf).
// It is only asked before an entry of a format above 1 is proposed, which
// no node does before it serves, so gossip has started by then.
func (n *Node) logVersionOf(id string) (uint32, bool) {
	if n.membership == nil {
		return 0, false
	}
	m, ok := n.membership.Member(id)
	if !ok || m.State != membership.StateAlive || m.Role != membership.RoleServer {
		return 0, false
	}
	return m.LogVersion, true
}

// joinCluster joins gossip. A node without state that was told to join
// must reach the cluster (or fail to start with the reason); a restarting
// node retries in the background through keepGossiping.
func (n *Node) joinCluster(ctx context.Context, hasState bool) error {
	if len(n.cfg.Join) == 0 || hasState {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if seeds := n.seeds(); len(seeds) > 0 {
				if err := n.membership.Join(ctx, seeds); err != nil {
					n.logger.Warn("rejoining gossip", "seeds", seeds, "err", err)
				}
			}
		}()
		return nil
	}
	jctx, cancel := context.WithTimeout(ctx, n.cfg.JoinTimeout)
	defer cancel()
	err := n.membership.Join(jctx, n.cfg.Join)
	if errors.Is(err, membership.ErrClusterMismatch) || errors.Is(err, membership.ErrIncompatibleVersion) {
		return fmt.Errorf("refused to join: %w", err)
	}
	if err != nil {
		return fmt.Errorf("join %v: %w", n.cfg.Join, err)
	}
	return nil
}

// seeds are the configured join addresses plus the gossip addresses of
// members seen alive before the last stop, so a restarted node finds its
// cluster again without --join.
func (n *Node) seeds() []string {
	seeds := slices.Clone(n.cfg.Join)
	for _, s := range n.loadKnownPeers() {
		if !slices.Contains(seeds, s) && s != n.membership.Addr() {
			seeds = append(seeds, s)
		}
	}
	return seeds
}

// keepGossiping rejoins gossip when this node sees no other member alive.
func (n *Node) keepGossiping() {
	defer n.wg.Done()
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-n.stop:
			return
		case <-t.C:
		}
		n.rejoinStopped()
		if len(n.alivePeers()) > 0 {
			continue
		}
		if seeds := n.seeds(); len(seeds) > 0 {
			ctx, cancel := context.WithTimeout(context.Background(), 4*time.Second)
			if err := n.membership.Join(ctx, seeds); err != nil {
				n.logger.Debug("rejoining gossip", "err", err)
			}
			cancel()
		}
	}
}

// alivePeers lists, sorted, the gossip addresses of the other servers that
// gossip reports alive.
func (n *Node) alivePeers() []string {
	var alive []string
	for _, m := range n.membership.Members() {
		if m.ID != n.cfg.NodeID && m.State == membership.StateAlive && m.Role == membership.RoleServer {
			alive = append(alive, m.GossipAddr)
		}
	}
	slices.Sort(alive)
	return alive
}

// rememberPeers records the alive peers for the next start when they
// differ from saved, and returns what is recorded. It runs on every
// membership event: a bootstrap node (no --join) that crashes right after
// the others joined must still find them when it restarts; if it did not,
// the others, to whom it never stopped answering probes, would not look
// for it either, and it would stay alone until a periodic gossip sync.
func (n *Node) rememberPeers(saved []string) []string {
	alive := n.alivePeers()
	if len(alive) == 0 || slices.Equal(alive, saved) {
		return saved
	}
	if err := n.saveKnownPeers(alive); err != nil {
		n.logger.Warn("save known peers", "err", err)
		return saved
	}
	return alive
}

// rejoinStopped brings Raft servers that left gossip back into it once
// they accept connections again. A restarted node normally finds the
// cluster itself (its join seeds and the peers it saved), but one with
// neither, such as the bootstrap node stopped before it saved its peers,
// would otherwise stay alone: gossip does not probe members that left, and
// without gossip the node cannot reach the leader to forward or confirm.
func (n *Node) rejoinStopped() {
	servers, err := n.consensus.Servers()
	if err != nil {
		return
	}
	var seeds []string
	for _, s := range servers {
		m, ok := n.membership.Member(s.ID)
		if !ok || s.ID == n.cfg.NodeID || m.GRPCAddr == "" ||
			(m.State != membership.StateLeft && m.State != membership.StateDead) {
			continue
		}
		if n.accepts(m.GRPCAddr) {
			seeds = append(seeds, m.GossipAddr)
		}
	}
	if len(seeds) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Second)
	defer cancel()
	if err := n.membership.Join(ctx, seeds); err != nil {
		n.logger.Debug("bringing stopped servers back into gossip", "seeds", seeds, "err", err)
	}
}

// accepts reports whether something accepts connections at addr, dialing
// the way this node reaches its peers.
func (n *Node) accepts(addr string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var c net.Conn
	var err error
	if n.cfg.Dial != nil {
		c, err = n.cfg.Dial(ctx, addr)
	} else {
		var d net.Dialer
		c, err = d.DialContext(ctx, "tcp", addr)
	}
	if err != nil {
		return false
	}
	c.Close()
	return true
}

func (n *Node) peersFile() string { return filepath.Join(n.cfg.DataDir, "peers.json") }

func (n *Node) loadKnownPeers() []string {
	b, err := os.ReadFile(n.peersFile())
	if err != nil {
		return nil
	}
	var addrs []string
	if json.Unmarshal(b, &addrs) != nil {
		return nil
	}
	return addrs
}

func (n *Node) saveKnownPeers(addrs []string) error {
	b, _ := json.Marshal(addrs)
	tmp := n.peersFile() + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, n.peersFile())
}
