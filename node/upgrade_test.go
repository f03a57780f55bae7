package node_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meridian-registry/meridian/consensus"
	"github.com/meridian-registry/meridian/node/clustertest"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// A change whose command needs a newer log format, sent to a follower,
// reaches the leader, which refuses it while any node advertises an older
// format in gossip (naming exactly those nodes, and committing nothing),
// and commits it once every node advertises the format. Here set_policy
// stands in for a command of a newer release; every node of this process
// applies it, so only the gate stands between it and the log.
func TestLogFormatGateAcrossTheCluster(t *testing.T) {
	// A format newer than this release's stands in for the next release's.
	next, current := consensus.LogVersion+1, consensus.LogVersion
	// Registered before the cluster, so undone after it stops.
	t.Cleanup(consensus.OverrideCommandVersionForTest("set_policy", next))
	c := clustertest.New(t, 3)
	ctx := within(t, 3*time.Minute)
	leader := mustLeader(t, ctx, c)
	follower := (leader + 1) % 3
	adm := adminClient(t, c, follower)

	var st *pb.ClusterStatusResponse
	waitFor(t, ctx, "every node to answer the cluster status", func() bool {
		var err error
		if st, err = adm.ClusterStatus(ctx, &pb.ClusterStatusRequest{}); err != nil {
			t.Fatal(err)
		}
		for _, m := range st.Members {
			if m.Status == nil {
				return false
			}
		}
		return len(st.Members) == 3
	})
	for _, m := range st.Members {
		if m.Status.GetLogVersion() != consensus.LogVersion {
			t.Errorf("cluster status: %s reports log format %d, want %d", m.Id, m.Status.GetLogVersion(), consensus.LogVersion)
		}
	}

	setPolicy := func() error {
		resp, err := adm.SetPolicy(ctx, &pb.SetPolicyRequest{Policy: &pb.Policy{Prefix: "gated/"}})
		if err != nil {
			return err
		}
		return resp.Result.Err()
	}
	// advertise makes node i claim log format v in gossip, as a node of a
	// newer release would.
	advertise := func(i int, v uint32) {
		t.Helper()
		m := c.Node(i).Membership()
		meta := m.Local().Meta
		meta.LogVersion = v
		if err := m.UpdateMeta(meta); err != nil {
			t.Fatalf("advertise log format %d on node %d: %v", v, i, err)
		}
	}
	// refusedNaming waits until the refusal names exactly the nodes in
	// behind (gossip takes a moment to carry a change to the leader).
	refusedNaming := func(behind ...int) {
		t.Helper()
		var last error
		waitFor(t, ctx, "a refusal naming exactly the nodes still on this release's format", func() bool {
			last = setPolicy()
			if pb.CodeOf(last) != pb.Code_CODE_PRECONDITION_FAILED || !strings.Contains(last.Error(), fmt.Sprintf("log format %d", next)) {
				t.Fatalf("set a policy of log format %d: %v, want a refusal", next, last)
			}
			for i := range 3 {
				named := strings.Contains(last.Error(), fmt.Sprintf("%s (format %d)", c.Node(i).ID(), current))
				if named != slices.Contains(behind, i) {
					return false
				}
			}
			return true
		})
		for i := range 3 {
			if ps, err := c.Node(i).Consensus().Store().Policies(ctx); err != nil || len(ps) != 0 {
				t.Fatalf("node %d holds policies %v (%v) after a refusal", i, ps, err)
			}
		}
	}

	refusedNaming(0, 1, 2)
	advertise(leader, next)
	advertise(follower, next)
	last := (leader + 2) % 3
	refusedNaming(last)

	advertise(last, next)
	waitFor(t, ctx, "the policy to commit once every node advertises the newer format", func() bool {
		err := setPolicy()
		if err != nil && pb.CodeOf(err) != pb.Code_CODE_PRECONDITION_FAILED {
			t.Fatalf("set a policy: %v", err)
		}
		return err == nil
	})
	for i := range 3 {
		waitFor(t, ctx, "every node to apply the policy", func() bool {
			ps, err := c.Node(i).Consensus().Store().Policies(context.Background())
			return err == nil && len(ps) == 1 && ps[0].Prefix == "gated/"
		})
	}
}
