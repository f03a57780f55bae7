package chaos

import (
	"fmt"
	"slices"
	"strings"
	"time"
)

// RegionSpec is one region of a chaos cluster. An S3 region gets its own
// versitygw server behind an HTTP fault proxy (S3Proxy); any other region
// keeps its blobs in a directory under the run directory, which its nodes
// serve to the rest of the cluster over gRPC.
type RegionSpec struct {
	Name string
	S3   bool
}

// NodeSpec is one `meridian serve` process.
type NodeSpec struct{ ID, Region string }

// GatewaySpec is one standalone `meridian gateway` process. ID is its
// --gateway-id, the name `meridian cluster status` shows.
// ReadConsistency is "strong" or "local".
type GatewaySpec struct{ ID, Region, ReadConsistency string }

// Profile describes a chaos run: the cluster's shape, its Raft timings and
// the default pace of the workload and the faults.
type Profile struct {
	Name     string
	Regions  []RegionSpec
	Nodes    []NodeSpec // the first node bootstraps the cluster
	Gateways []GatewaySpec
	// Voters is how many Raft voters the leader keeps (--voters); 0 means
	// every node, at most.
	Voters int

	RaftHeartbeatTimeout, RaftElectionTimeout, ApplyTimeout time.Duration

	// Workload is the default length of the workload phase.
	Workload time.Duration
	// FaultEvery is the mean time between fault injections.
	FaultEvery time.Duration
	// MaxFaultHold caps how long a fault lasts (0: each kind's own
	// maximum), so that a short run fits a round of every kind.
	MaxFaultHold time.Duration
	// FaultRounds is how many times the schedule promises to inject
	// every kind within Workload (see FaultQuotas); a shorter workload
	// promises proportionally fewer, at least one.
	FaultRounds int
	// MaxFaults is how many faults may be active at once (FaultPlan's
	// MaxConcurrent). Whatever it says, node faults never take down more
	// than a minority of the voters.
	MaxFaults int
}

// CriticalPrefix is the repository prefix whose policy asks for two regions
// before a blob PUT is acknowledged (min_regions: 2). The other policy, for
// prefix "", places every repository in every region.
const CriticalPrefix = "critical/"

// ShortProfile is the quick run: three nodes and two gateways in two
// regions, one of them on S3.
//
//   - us-east (S3, its own versitygw): nodes us-east-a and us-east-b, which
//     share the bucket, and gateway gw-strong (read_consistency strong);
//   - eu-west (a directory, served by its node): node eu-west-a and gateway
//     gw-local (read_consistency local).
//
// All three nodes are voters, so the cluster survives one node down. With
// two regions, a critical/ push (min_regions 2) needs both, so it stalls
// (and may answer 503) while eu-west-a or the us-east S3 server is down:
// that is intended, it exercises sync_timeout.
//
// The Raft timings (1.5 s heartbeat, 2 s election, 15 s apply timeout)
// suit a loaded two-core machine running everything at once.
func ShortProfile() Profile {
	return Profile{
		Name:    "short",
		Regions: []RegionSpec{{Name: "us-east", S3: true}, {Name: "eu-west"}},
		Nodes: []NodeSpec{
			{ID: "us-east-a", Region: "us-east"},
			{ID: "eu-west-a", Region: "eu-west"},
			{ID: "us-east-b", Region: "us-east"},
		},
		Gateways: []GatewaySpec{
			{ID: "gw-strong", Region: "us-east", ReadConsistency: "strong"},
			{ID: "gw-local", Region: "eu-west", ReadConsistency: "local"},
		},
		Voters:               3,
		RaftHeartbeatTimeout: 1500 * time.Millisecond,
		RaftElectionTimeout:  2 * time.Second,
		ApplyTimeout:         15 * time.Second,
		Workload:             190 * time.Second, // a worst-case round of every kind fits (TestFaultHoldCap)
		FaultEvery:           8 * time.Second,
		MaxFaultHold:         10 * time.Second,
		FaultRounds:          1,
		MaxFaults:            1,
	}
}

// LongProfile is the thorough run: five voters in three regions, two of
// them on S3 (each its own versitygw), 2/2/1 nodes, and the same two
// gateways (gw-strong in us-east, gw-local in eu-west). It survives two
// nodes down.
func LongProfile() Profile {
	return Profile{
		Name:    "long",
		Regions: []RegionSpec{{Name: "us-east", S3: true}, {Name: "eu-west", S3: true}, {Name: "ap-south"}},
		Nodes: []NodeSpec{
			{ID: "us-east-a", Region: "us-east"},
			{ID: "eu-west-a", Region: "eu-west"},
			{ID: "ap-south-a", Region: "ap-south"},
			{ID: "us-east-b", Region: "us-east"},
			{ID: "eu-west-b", Region: "eu-west"},
		},
		Gateways: []GatewaySpec{
			{ID: "gw-strong", Region: "us-east", ReadConsistency: "strong"},
			{ID: "gw-local", Region: "eu-west", ReadConsistency: "local"},
		},
		Voters:               5,
		RaftHeartbeatTimeout: 1500 * time.Millisecond,
		RaftElectionTimeout:  2 * time.Second,
		ApplyTimeout:         15 * time.Second,
		Workload:             30 * time.Minute,
		FaultEvery:           30 * time.Second,
		FaultRounds:          4,
		MaxFaults:            2,
	}
}

// ProfileByName returns "short" or "long".
func ProfileByName(name string) (Profile, error) {
	switch strings.ToLower(name) {
	case "short":
		return ShortProfile(), nil
	case "long":
		return LongProfile(), nil
	}
	return Profile{}, fmt.Errorf("chaos: unknown profile %q (want short or long)", name)
}

// voters is how many voters the cluster keeps: Profile.Voters, at most
// every node (0: every node).
func (p Profile) voters() int {
	if p.Voters <= 0 || p.Voters > len(p.Nodes) {
		return len(p.Nodes)
	}
	return p.Voters
}

// faultRounds is how many rounds of every kind a workload phase of length
// workload promises: FaultRounds, scaled down for a shorter workload, at
// least one.
func (p Profile) faultRounds(workload time.Duration) int {
	if p.FaultRounds <= 0 {
		return 0
	}
	if workload <= 0 || workload >= p.Workload || p.Workload <= 0 {
		return p.FaultRounds
	}
	return max(1, int(int64(p.FaultRounds)*int64(workload)/int64(p.Workload)))
}

// maxNodesDown is how many nodes may be down at once with a quorum left.
func (p Profile) maxNodesDown() int { return (p.voters() - 1) / 2 }

// region returns the spec of region name.
func (p Profile) region(name string) (RegionSpec, bool) {
	i := slices.IndexFunc(p.Regions, func(r RegionSpec) bool { return r.Name == name })
	if i < 0 {
		return RegionSpec{}, false
	}
	return p.Regions[i], true
}

// validate checks that the profile describes a cluster that can start.
func (p Profile) validate() error {
	var errs []string
	if len(p.Regions) == 0 || len(p.Nodes) == 0 {
		errs = append(errs, "a profile needs at least one region and one node")
	}
	// Member certificates share a directory with the CA's files and the
	// harness's admin certificate.
	seen := map[string]bool{"ca": true, "gossip": true, adminID: true}
	for _, r := range p.Regions {
		if r.Name == "" || seen["region "+r.Name] {
			errs = append(errs, fmt.Sprintf("region %q: empty or listed twice", r.Name))
		}
		seen["region "+r.Name] = true
	}
	hasNode := map[string]bool{}
	for _, n := range p.Nodes {
		// An id ending in .gossip would overwrite another's gossip key file.
		if n.ID == "" || seen[n.ID] || strings.HasSuffix(n.ID, ".gossip") {
			errs = append(errs, fmt.Sprintf("node %q: empty, duplicate or reserved id", n.ID))
		}
		seen[n.ID] = true
		if _, ok := p.region(n.Region); !ok {
			errs = append(errs, fmt.Sprintf("node %s: unknown region %q", n.ID, n.Region))
		}
		hasNode[n.Region] = true
	}
	for _, r := range p.Regions {
		if !r.S3 && !hasNode[r.Name] {
			errs = append(errs, fmt.Sprintf("directory region %s has no node to serve it", r.Name))
		}
	}
	for _, g := range p.Gateways {
		// An id ending in .gossip would overwrite another's gossip key file.
		if g.ID == "" || seen[g.ID] || strings.HasSuffix(g.ID, ".gossip") {
			errs = append(errs, fmt.Sprintf("gateway %q: empty, duplicate or reserved id", g.ID))
		}
		seen[g.ID] = true
		if _, ok := p.region(g.Region); !ok {
			errs = append(errs, fmt.Sprintf("gateway %s: unknown region %q", g.ID, g.Region))
		}
		if g.ReadConsistency != "strong" && g.ReadConsistency != "local" {
			errs = append(errs, fmt.Sprintf("gateway %s: read consistency %q (want strong or local)", g.ID, g.ReadConsistency))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("chaos: profile %s: %s", p.Name, strings.Join(errs, "; "))
	}
	return nil
}
