package node_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/meridian-registry/meridian/node"
	"github.com/meridian-registry/meridian/node/clustertest"
)

// TestClusterVoterPlacement: voters spread across regions, and a voter gone
// longer than the dead-voter timeout is replaced by a healthy non-voter.
func TestClusterVoterPlacement(t *testing.T) {
	regions := []string{"r1", "r1", "r2", "r3"}
	var stores []node.RegionConfig
	for _, r := range []string{"r1", "r2", "r3"} {
		stores = append(stores, node.RegionConfig{Name: r, Store: "file://" + t.TempDir()})
	}
	c := clustertest.New(t, 4, clustertest.WithVoters(3), clustertest.WithConfig(func(i int, cfg *node.Config) {
		cfg.Region = regions[i]
		cfg.BlobDir = ""
		cfg.Regions = stores
		cfg.DeadVoterTimeout = 2 * time.Second
	}))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	leader, err := c.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Node 3 (r3) arrives last, after r1 already holds two voters: the
	// leader swaps an r1 voter for it, so each region holds one voter.
	waitVoterRegions(t, ctx, c, regions, []string{"r1", "r2", "r3"})

	// Stop the r2 voter: after the timeout the r1 non-voter takes its vote.
	gone := 2
	if gone == leader {
		t.Fatalf("test setup: node %d (r2) leads; expected node 0 to lead", gone)
	}
	c.Stop(gone)
	waitVoterRegions(t, ctx, c, regions, []string{"r1", "r1", "r3"})
}

// waitVoterRegions polls the leader's configuration until its voters lie
// in exactly the regions want (sorted).
func waitVoterRegions(t *testing.T, ctx context.Context, c *clustertest.Cluster, regions, want []string) {
	t.Helper()
	var last string
	for {
		if l, err := c.Leader(ctx); err == nil {
			servers, err := c.Node(l).Consensus().Servers()
			if err == nil {
				var got []string
				for _, s := range servers {
					if !s.Voter {
						continue
					}
					for i := range regions {
						if n := c.Node(i); n != nil && n.ID() == s.ID {
							got = append(got, regions[i])
						} else if n == nil && c.Config(i).NodeID == s.ID {
							got = append(got, regions[i])
						}
					}
				}
				slices.Sort(got)
				if slices.Equal(got, want) {
					return
				}
				last = fmt.Sprintf("voter regions %v in %+v", got, servers)
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("voters never lay in regions %v: %s", want, last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
