package meridianpb

import (
	"slices"
	"strings"
)

// EffectivePolicy is the replication policy that applies to one repository
// once prefixes are resolved.
type EffectivePolicy struct {
	// Regions whose stores must hold the repository's blobs, sorted.
	Regions []string
	// MinRegions is how many regions hold a blob before its PUT answers 201;
	// at least 1 and at most len(Regions).
	MinRegions int
}

// ResolvePolicy applies the policies whose prefix matches repo, shortest
// first, so the longest matching prefix wins and fields it leaves unset
// inherit from shorter ones. The root default is every region of the
// cluster with min_regions 1. Regions a policy names that the cluster does
// not have are ignored, so a policy can never ask for the impossible.
func ResolvePolicy(policies []*Policy, clusterRegions []string, repo string) EffectivePolicy {
	matching := make([]*Policy, 0, 4)
	for _, p := range policies {
		if strings.HasPrefix(repo, p.Prefix) {
			matching = append(matching, p)
		}
	}
	slices.SortFunc(matching, func(a, b *Policy) int { return len(a.Prefix) - len(b.Prefix) })
	eff := EffectivePolicy{Regions: slices.Sorted(slices.Values(clusterRegions)), MinRegions: 1}
	for _, p := range matching {
		if len(p.Regions) > 0 {
			var rs []string
			for _, r := range p.Regions {
				if slices.Contains(clusterRegions, r) && !slices.Contains(rs, r) {
					rs = append(rs, r)
				}
			}
			if len(rs) > 0 {
				slices.Sort(rs)
				eff.Regions = rs
			}
		}
		if p.MinRegions > 0 {
			eff.MinRegions = int(p.MinRegions)
		}
	}
	eff.MinRegions = max(1, min(eff.MinRegions, len(eff.Regions)))
	return eff
}
