package node

import (
	"context"
	"regexp"
	"slices"
	"time"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// policyPrefixRE accepts the start of a repository name: lowercase letters,
// digits and the name separators; "" is the root policy.
var policyPrefixRE = regexp.MustCompile(`^[a-z0-9._/-]{0,255}$`)

// validatePolicy checks a policy against the cluster's regions and the
// policies it would join, so that what is committed is always satisfiable.
func (n *Node) validatePolicy(ctx context.Context, p *pb.Policy) error {
	if p == nil {
		return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "no policy given")
	}
	if !policyPrefixRE.MatchString(p.Prefix) {
		return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "prefix %q: use the start of a repository name (lowercase letters, digits, '.', '_', '-', '/')", p.Prefix)
	}
	store := n.consensus.Store()
	regions, err := store.Regions(ctx)
	if err != nil {
		return err
	}
	if len(regions) == 0 {
		regions = n.cfg.regionNames()
	}
	for _, r := range p.Regions {
		if !slices.Contains(regions, r) {
			return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "unknown region %q; the cluster's regions are %v", r, regions)
		}
	}
	if p.MinRegions < 0 {
		return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "min_regions cannot be negative")
	}
	policies, err := store.Policies(ctx)
	if err != nil {
		return err
	}
	policies = slices.DeleteFunc(policies, func(q *pb.Policy) bool { return q.Prefix == p.Prefix })
	eff := pb.ResolvePolicy(append(policies, p), regions, p.Prefix)
	if p.MinRegions > 0 && int(p.MinRegions) > len(eff.Regions) {
		return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "min_regions %d is more than the %d regions %v that prefix %q resolves to",
			p.MinRegions, len(eff.Regions), eff.Regions, p.Prefix)
	}
	return nil
}

func (s adminServer) ListPolicies(ctx context.Context, _ *pb.ListPoliciesRequest) (*pb.ListPoliciesResponse, error) {
	// An operator reading policies expects the committed ones.
	if err := s.n.catchUp(ctx); err != nil {
		return nil, pb.ToStatus(err)
	}
	store := s.n.consensus.Store()
	policies, err := store.Policies(ctx)
	if err != nil {
		return nil, pb.ToStatus(err)
	}
	regions, err := store.Regions(ctx)
	if err != nil {
		return nil, pb.ToStatus(err)
	}
	return &pb.ListPoliciesResponse{Policies: policies, Regions: regions}, nil
}

func (s adminServer) SetPolicy(ctx context.Context, req *pb.SetPolicyRequest) (*pb.SetPolicyResponse, error) {
	// Caught up first, so the policy is checked against the newest ones;
	// commit validates it.
	err := s.n.catchUp(ctx)
	if err == nil {
		err = s.n.commit(ctx, &pb.Command{Intent: &pb.Command_SetPolicy{SetPolicy: &pb.SetPolicy{Policy: req.Policy}}})
	}
	r, gerr := answer(err)
	if gerr != nil {
		return nil, gerr
	}
	return &pb.SetPolicyResponse{Result: r}, nil
}

func (s adminServer) DeletePolicy(ctx context.Context, req *pb.DeletePolicyRequest) (*pb.DeletePolicyResponse, error) {
	err := s.n.commit(ctx, &pb.Command{Intent: &pb.Command_DeletePolicy{DeletePolicy: &pb.DeletePolicy{Prefix: req.Prefix}}})
	r, gerr := answer(err)
	if gerr != nil {
		return nil, gerr
	}
	return &pb.DeletePolicyResponse{Result: r}, nil
}

// regionLags reads every region's backlog from this replica.
func (n *Node) regionLags(ctx context.Context) []*pb.RegionLag {
	var out []*pb.RegionLag
	for _, region := range n.cfg.regionNames() {
		lag, err := n.consensus.Store().RegionLag(ctx, region)
		if err != nil {
			continue
		}
		rl := &pb.RegionLag{Region: region, MissingBlobs: lag.Blobs, MissingBytes: lag.Bytes}
		if lag.OldestUnixNano > 0 {
			rl.OldestMissingSeconds = max(0, secondsSince(lag.OldestUnixNano))
		}
		out = append(out, rl)
	}
	return out
}

func secondsSince(unixNano int64) float64 {
	return time.Since(time.Unix(0, unixNano)).Seconds()
}
