package chaos

import (
	"encoding/base64"
	"fmt"
	"strings"
	"testing"
)

var testRegions = []string{"us-east", "eu-west"}

// statusMember is one member of a `meridian cluster status --json`
// answer, as protojson prints it (64-bit integers as strings, the digest
// as base64); a zero applied index leaves its status out, as the CLI does
// for a member it could not reach.
type statusMember struct {
	id, region, raftState, leader string
	commit, applied, digestIndex  uint64
	digest                        string
}

func (m statusMember) json() string {
	if m.applied == 0 {
		return fmt.Sprintf(`{"id":%q,"region":%q,"role":"server","suffrage":"voter","health":"dead","error":"not reachable through gossip"}`, m.id, m.region)
	}
	return fmt.Sprintf(`{"id":%q,"region":%q,"role":"server","suffrage":"voter","health":"alive","status":{"id":%q,"region":%q,`+
		`"raftState":%q,"suffrage":"voter","leaderId":%q,"term":"7","commitIndex":"%d","appliedIndex":"%d","lastLogIndex":"%d",`+
		`"stateDigest":%q,"stateDigestIndex":"%d"}}`,
		m.id, m.region, m.id, m.region, m.raftState, m.leader, m.commit, m.applied, m.commit, base64.StdEncoding.EncodeToString([]byte(m.digest)), m.digestIndex)
}

// statusJSONText is a whole status answer: leader and its commit index,
// members, and the regions' missing blobs.
func statusJSONText(leader string, leaderCommit uint64, members []statusMember, missing map[string]int) string {
	var ms, rs []string
	for _, m := range members {
		ms = append(ms, m.json())
	}
	for _, r := range testRegions {
		if n, ok := missing[r]; !ok || n >= 0 {
			rs = append(rs, fmt.Sprintf(`{"region":%q,"missingBlobs":"%d","missingBytes":"%d"}`, r, max(n, 0), max(n, 0)*1000))
		}
	}
	return fmt.Sprintf(`{"clusterId":"chaos","leaderId":%q,"leaderCommitIndex":"%d","answeredBy":"us-east-a","members":[%s],"regions":[%s]}`,
		leader, leaderCommit, strings.Join(ms, ","), strings.Join(rs, ","))
}

// TestConvergence: the convergence decision, fed the CLI's JSON of a
// converged cluster, says converged; fed each kind of divergence, it says
// not converged and names the difference.
func TestConvergence(t *testing.T) {
	nodes := []NodeSpec{{ID: "us-east-a", Region: "us-east"}, {ID: "eu-west-a", Region: "eu-west"}, {ID: "us-east-b", Region: "us-east"}}
	healthy := func() (string, uint64, []statusMember, map[string]int) {
		var ms []statusMember
		for _, n := range nodes {
			state := "follower"
			if n.ID == "eu-west-a" {
				state = "leader"
			}
			ms = append(ms, statusMember{id: n.ID, region: n.Region, raftState: state, leader: "eu-west-a",
				commit: 900, applied: 900, digestIndex: 900, digest: "state-digest-at-900"})
		}
		return "eu-west-a", 900, ms, map[string]int{}
	}
	for _, c := range []struct {
		name   string
		change func(leader *string, commit *uint64, ms []statusMember, missing map[string]int)
		want   string // in Detail; "" when converged
	}{
		{"converged", func(*string, *uint64, []statusMember, map[string]int) {}, ""},
		{"different state digests", func(_ *string, _ *uint64, ms []statusMember, _ map[string]int) {
			ms[2].digest = "another-digest-at-900"
		}, "us-east-b digest"},
		{"different applied index", func(_ *string, _ *uint64, ms []statusMember, _ map[string]int) {
			ms[1].applied, ms[1].commit = 899, 899
		}, "eu-west-a applied 899, us-east-a 900"},
		{"different digest index", func(_ *string, _ *uint64, ms []statusMember, _ map[string]int) {
			ms[2].digestIndex = 897
		}, "us-east-b digest"},
		{"leader commit ahead of applied", func(_ *string, commit *uint64, _ []statusMember, _ map[string]int) {
			*commit = 901
		}, "leader commit index 901, applied 900"},
		{"a node committed more than it applied", func(_ *string, _ *uint64, ms []statusMember, _ map[string]int) {
			ms[0].commit = 905
		}, "us-east-a committed 905, applied 900"},
		{"an unreachable node", func(_ *string, _ *uint64, ms []statusMember, _ map[string]int) {
			ms[2].applied = 0
		}, "us-east-b unreachable (not reachable through gossip)"},
		{"a node missing from the status", func(_ *string, _ *uint64, ms []statusMember, _ map[string]int) {
			ms[2].id = "someone-else"
		}, "us-east-b unreachable (not in the cluster status)"},
		{"missing blobs in a region", func(_ *string, _ *uint64, _ []statusMember, missing map[string]int) {
			missing["eu-west"] = 3
		}, "region eu-west misses 3 blobs (3000 bytes)"},
		{"a region missing from the status", func(_ *string, _ *uint64, _ []statusMember, missing map[string]int) {
			missing["us-east"] = -1
		}, "region us-east missing from status"},
		{"no leader", func(leader *string, commit *uint64, ms []statusMember, _ map[string]int) {
			*leader, *commit = "", 0
			for i := range ms {
				ms[i].leader, ms[i].raftState = "", "candidate"
			}
		}, "no leader"},
		{"a node follows another leader", func(_ *string, _ *uint64, ms []statusMember, _ map[string]int) {
			ms[0].leader = "us-east-b"
		}, `us-east-a follows leader "us-east-b", not eu-west-a`},
	} {
		t.Run(c.name, func(t *testing.T) {
			leader, commit, ms, missing := healthy()
			c.change(&leader, &commit, ms, missing)
			st, err := parseStatus([]byte(statusJSONText(leader, commit, ms, missing)), nodes)
			if err != nil {
				t.Fatal(err)
			}
			conv := convergence(st, testRegions)
			if c.want == "" {
				if !conv.Converged || conv.Detail != "" || conv.Applied != 900 || conv.Digest == "" {
					t.Fatalf("a converged cluster: %+v", conv)
				}
				return
			}
			if conv.Converged {
				t.Fatalf("reported converged: %+v", conv)
			}
			if !strings.Contains(conv.Detail, c.want) {
				t.Fatalf("detail %q lacks %q", conv.Detail, c.want)
			}
		})
	}
	// No status at all proves nothing.
	if conv := convergence(ClusterState{Leader: "x"}, nil); conv.Converged {
		t.Fatalf("an empty status converged: %+v", conv)
	}
}
