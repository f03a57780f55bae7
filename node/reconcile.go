package node

import (
	"context"
	"slices"
	"sort"
	"time"

	"github.com/meridian-registry/meridian/consensus"
	"github.com/meridian-registry/meridian/node/membership"
)

// reconcileMembers runs on every node and acts while it leads: it adds
// gossiping servers to the Raft configuration (voters up to the configured
// count, spread across regions, non-voters beyond), follows address
// changes, and replaces voters that have been gone too long by healthy
// non-voters. Stopped nodes are not removed: stopping is not leaving. On
// every node it also records the peers for the next start.
func (n *Node) reconcileMembers() {
	defer n.wg.Done()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	var peers []string
	for {
		select {
		case <-n.stop:
			return
		case <-n.membership.Events():
		case <-t.C:
		}
		peers = n.rememberPeers(peers)
		if n.consensus.IsLeader() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			if err := n.reconcileOnce(ctx); err != nil {
				n.logger.Warn("reconcile raft membership", "err", err)
			}
			cancel()
		}
	}
}

func (n *Node) reconcileOnce(ctx context.Context) error {
	servers, err := n.consensus.Servers()
	if err != nil {
		return err
	}
	inConfig := map[string]consensus.Server{}
	for _, s := range servers {
		inConfig[s.ID] = s
	}
	members := map[string]membership.Member{}
	for _, m := range n.membership.Members() {
		if m.Role == membership.RoleServer {
			members[m.ID] = m
		}
	}
	regionOf := func(id string) string {
		if m, ok := members[id]; ok {
			return m.Region
		}
		return ""
	}
	votersByRegion := map[string]int{}
	voters := 0
	for _, s := range servers {
		if s.Voter {
			voters++
			votersByRegion[regionOf(s.ID)]++
		}
	}

	// New servers and moved addresses, in a stable order.
	for _, id := range sortedKeys(members) {
		m := members[id]
		if m.State != membership.StateAlive || m.RaftAddr == "" {
			continue
		}
		s, known := inConfig[id]
		switch {
		case !known:
			if newest, err := n.consensus.Store().NewestLogFormat(); err != nil {
				return err
			} else if v := max(m.LogVersion, 1); v < newest {
				// It would stop at the first entry it cannot apply.
				n.logger.Warn("not adding a server of an older release: the log holds entries of a newer format",
					"id", id, "its_log_format", v, "log_holds", newest)
				continue
			}
			if err := n.trust.VerifyNode(ctx, n.cfg.Dial, m.RaftAddr, id); err != nil {
				n.logger.Warn("not adding a server whose certificate does not match its gossip id", "id", id, "raft_addr", m.RaftAddr, "err", err)
				continue
			}
			voter := voters < n.cfg.Voters
			n.logger.Info("adding server", "id", id, "raft_addr", m.RaftAddr, "region", m.Region, "voter", voter)
			if err := n.consensus.AddServer(ctx, id, m.RaftAddr, voter); err != nil {
				return err
			}
			if voter {
				voters++
				votersByRegion[m.Region]++
			}
		case s.Address != m.RaftAddr:
			if err := n.trust.VerifyNode(ctx, n.cfg.Dial, m.RaftAddr, id); err != nil {
				n.logger.Warn("not moving a server to an address whose certificate does not match its id", "id", id, "raft_addr", m.RaftAddr, "err", err)
				continue
			}
			n.logger.Info("server moved", "id", id, "from", s.Address, "to", m.RaftAddr)
			if err := n.consensus.AddServer(ctx, id, m.RaftAddr, s.Voter); err != nil {
				return err
			}
		}
	}

	// Promote healthy non-voters while voters are missing or long gone.
	gone := func(id string) bool {
		m, ok := members[id]
		return ok && m.State != membership.StateAlive && m.State != membership.StateSuspect &&
			time.Since(m.Since) > n.cfg.DeadVoterTimeout
	}
	for _, s := range servers {
		if !s.Voter || !gone(s.ID) || s.ID == n.cfg.NodeID {
			continue
		}
		cand := n.pickNonvoter(servers, members, votersByRegion)
		if cand == "" {
			break
		}
		n.logger.Warn("replacing a voter that is gone", "gone", s.ID, "since", members[s.ID].Since, "replacement", cand)
		if err := n.consensus.AddServer(ctx, cand, members[cand].RaftAddr, true); err != nil {
			return err
		}
		votersByRegion[members[cand].Region]++
		if err := n.consensus.DemoteVoter(ctx, s.ID); err != nil {
			return err
		}
		votersByRegion[regionOf(s.ID)]--
		servers, _ = n.consensus.Servers()
	}
	for voters < n.cfg.Voters {
		cand := n.pickNonvoter(servers, members, votersByRegion)
		if cand == "" {
			break
		}
		n.logger.Info("promoting to voter", "id", cand, "region", members[cand].Region)
		if err := n.consensus.AddServer(ctx, cand, members[cand].RaftAddr, true); err != nil {
			return err
		}
		voters++
		votersByRegion[members[cand].Region]++
		servers, _ = n.consensus.Servers()
	}
	return n.spreadVoters(ctx, servers, members, votersByRegion)
}

// spreadVoters swaps voters so that regions share them: while an alive
// non-voter sits in a region without a voter and another region holds two
// or more, the non-voter is promoted and one of those voters demoted.
// Losing any one region then costs as few votes as possible.
func (n *Node) spreadVoters(ctx context.Context, servers []consensus.Server, members map[string]membership.Member, votersByRegion map[string]int) error {
	for {
		cand, crowded := "", ""
		for _, s := range servers {
			m, ok := members[s.ID]
			if !ok || m.State != membership.StateAlive {
				continue
			}
			switch {
			case !s.Voter && votersByRegion[m.Region] == 0 && cand == "":
				cand = s.ID
			case s.Voter && votersByRegion[m.Region] >= 2 && s.ID != n.cfg.NodeID && crowded == "":
				crowded = s.ID
			}
		}
		if cand == "" || crowded == "" {
			return nil
		}
		n.logger.Info("spreading voters across regions", "promote", cand, "region", members[cand].Region,
			"demote", crowded, "from_region", members[crowded].Region)
		if err := n.consensus.AddServer(ctx, cand, members[cand].RaftAddr, true); err != nil {
			return err
		}
		votersByRegion[members[cand].Region]++
		if err := n.consensus.DemoteVoter(ctx, crowded); err != nil {
			return err
		}
		votersByRegion[members[crowded].Region]--
		var err error
		if servers, err = n.consensus.Servers(); err != nil {
			return err
		}
	}
}

// pickNonvoter chooses an alive non-voter, preferring regions that hold the
// fewest voters so losing a region costs the fewest votes.
func (n *Node) pickNonvoter(servers []consensus.Server, members map[string]membership.Member, votersByRegion map[string]int) string {
	var cands []membership.Member
	for _, s := range servers {
		if m, ok := members[s.ID]; ok && !s.Voter && m.State == membership.StateAlive {
			cands = append(cands, m)
		}
	}
	if len(cands) == 0 {
		return ""
	}
	sort.Slice(cands, func(i, j int) bool {
		ri, rj := votersByRegion[cands[i].Region], votersByRegion[cands[j].Region]
		if ri != rj {
			return ri < rj
		}
		return cands[i].ID < cands[j].ID
	})
	return cands[0].ID
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}
