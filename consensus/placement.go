package consensus

import (
	"context"
	"slices"
	"strings"

	"github.com/cockroachdb/pebble/v2"
	"google.golang.org/protobuf/proto"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// Placement: which regions hold each blob (BlobRecord.Regions), which regions
// each blob should be in (the policies of the repositories that link it), and
// the difference, kept as the Wanted table so every region's replicator reads
// its work list with one prefix scan and lag is a count, not a computation.
//
// The Wanted table is derived state, recomputed for a blob whenever its
// placements, its links or the policies change, inside the same batch.

func applyPlaceBlob(b *pebble.Batch, e *pb.LogEntry) error {
	c := e.GetPlaceBlob()
	rec := &pb.BlobRecord{}
	found, err := getProto(b, key(tableBlob, c.Digest), rec)
	if err != nil {
		return err
	}
	if !found {
		return pb.Errorf(pb.Code_CODE_BLOB_UNKNOWN, "blob %s not found", c.Digest)
	}
	if rec.Size != c.Size {
		return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "blob %s has size %d, not %d", c.Digest, rec.Size, c.Size)
	}
	if c.Region == "" {
		return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "a placement names its region")
	}
	if rec.CondemnedUnixNano != 0 {
		// A copy that finished after the blob was condemned: the region
		// holds bytes now, so it must remove them too.
		if err := addPlacement(b, rec, c.Region); err != nil {
			return err
		}
		if err := b.Delete(key(tableWanted, c.Region, c.Digest), nil); err != nil {
			return err
		}
		return setProto(b, key(tableRemoval, c.Region, c.Digest), &pb.Wanted{Digest: c.Digest, Size: rec.Size, SinceUnixNano: e.TimeUnixNano})
	}
	if err := addPlacement(b, rec, c.Region); err != nil {
		return err
	}
	return b.Delete(key(tableWanted, c.Region, c.Digest), nil)
}

// addPlacement records region in rec and stores it.
func addPlacement(b *pebble.Batch, rec *pb.BlobRecord, region string) error {
	if !slices.Contains(rec.Regions, region) {
		rec.Regions = append(rec.Regions, region)
		slices.Sort(rec.Regions)
	}
	return setProto(b, key(tableBlob, rec.Digest), rec)
}

func applySetPolicy(b *pebble.Batch, e *pb.LogEntry) error {
	p := e.GetSetPolicy().GetPolicy()
	if p == nil {
		return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "set_policy carries no policy")
	}
	if p.MinRegions < 0 {
		return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "min_regions cannot be negative")
	}
	if err := setProto(b, key(tablePolicy, p.Prefix), p); err != nil {
		return err
	}
	return recomputeAllWanted(b, e.TimeUnixNano)
}

func applyDeletePolicy(b *pebble.Batch, e *pb.LogEntry) error {
	k := key(tablePolicy, e.GetDeletePolicy().Prefix)
	ok, err := has(b, k)
	if err != nil {
		return err
	}
	if !ok {
		return pb.Errorf(pb.Code_CODE_POLICY_UNKNOWN, "no policy for prefix %q", e.GetDeletePolicy().Prefix)
	}
	if err := b.Delete(k, nil); err != nil {
		return err
	}
	return recomputeAllWanted(b, e.TimeUnixNano)
}

func applySetRegions(b *pebble.Batch, e *pb.LogEntry) error {
	rs := slices.Sorted(slices.Values(e.GetSetRegions().Regions))
	if len(rs) == 0 || slices.Contains(rs, "") || len(slices.Compact(slices.Clone(rs))) != len(rs) {
		return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "regions must be distinct non-empty names")
	}
	if err := setProto(b, key(tableRegions), &pb.SetRegions{Regions: rs}); err != nil {
		return err
	}
	return recomputeAllWanted(b, e.TimeUnixNano)
}

// placementRules is what deciding a blob's regions needs, read once per entry.
type placementRules struct {
	regions  []string
	policies []*pb.Policy
}

func loadRules(r pebble.Reader) (placementRules, error) {
	var rules placementRules
	topo := &pb.SetRegions{}
	if _, err := getProto(r, key(tableRegions), topo); err != nil {
		return rules, err
	}
	rules.regions = topo.Regions
	lower, upper := tableBounds(tablePolicy)
	it, err := r.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: upper})
	if err != nil {
		return rules, err
	}
	defer it.Close()
	for ok := it.First(); ok; ok = it.Next() {
		p := &pb.Policy{}
		if err := proto.Unmarshal(it.Value(), p); err != nil {
			return rules, err
		}
		rules.policies = append(rules.policies, p)
	}
	return rules, it.Error()
}

// recomputeWanted brings the Wanted rows of one blob in line with its
// placements and the policies of the repositories linking it. A region that
// already wanted the blob keeps its original since time.
func recomputeWanted(b *pebble.Batch, rules placementRules, digest string, now int64) error {
	rec := &pb.BlobRecord{}
	found, err := getProto(b, key(tableBlob, digest), rec)
	if err != nil {
		return err
	}
	want := map[string]bool{}
	if found {
		if err := scan(b, prefix(tableBlobRepos, digest), "", -1, func(k, _ []byte) error {
			for _, r := range pb.ResolvePolicy(rules.policies, rules.regions, lastField(k)).Regions {
				want[r] = true
			}
			return nil
		}); err != nil {
			return err
		}
	}
	// Regions known to the cluster plus any the blob is already placed in.
	for _, region := range rules.regions {
		wk := key(tableWanted, region, digest)
		// A region still removing a condemned copy must not copy the blob
		// in again until the removal is done: it could delete the new copy.
		removing, err := has(b, key(tableRemoval, region, digest))
		if err != nil {
			return err
		}
		if want[region] && !removing && !slices.Contains(rec.Regions, region) {
			ok, err := has(b, wk)
			if err != nil {
				return err
			}
			if !ok {
				if err := setProto(b, wk, &pb.Wanted{Digest: digest, Size: rec.Size, SinceUnixNano: now}); err != nil {
					return err
				}
			}
			continue
		}
		if err := b.Delete(wk, nil); err != nil {
			return err
		}
	}
	return nil
}

// recomputeAllWanted recomputes every blob: a policy or topology change can
// move any of them. Its cost is one pass over the blob table, paid only when
// policies change.
func recomputeAllWanted(b *pebble.Batch, now int64) error {
	rules, err := loadRules(b)
	if err != nil {
		return err
	}
	// Rows of regions that left the topology go first.
	var stale [][]byte
	lower, upper := tableBounds(tableWanted)
	it, err := b.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: upper})
	if err != nil {
		return err
	}
	for ok := it.First(); ok; ok = it.Next() {
		region := string(it.Key()[2:])
		if i := strings.IndexByte(region, sep); i >= 0 {
			region = region[:i]
		}
		if !slices.Contains(rules.regions, region) {
			stale = append(stale, slices.Clone(it.Key()))
		}
	}
	if err := it.Close(); err != nil {
		return err
	}
	for _, k := range stale {
		if err := b.Delete(k, nil); err != nil {
			return err
		}
	}
	var digests []string
	lower, upper = tableBounds(tableBlob)
	it, err = b.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: upper})
	if err != nil {
		return err
	}
	for ok := it.First(); ok; ok = it.Next() {
		digests = append(digests, string(it.Key()[2:]))
	}
	if err := it.Close(); err != nil {
		return err
	}
	for _, d := range digests {
		if err := recomputeWanted(b, rules, d, now); err != nil {
			return err
		}
	}
	return nil
}

// Regions returns the cluster's region names, empty until the leader has
// recorded them.
func (s *Store) Regions(context.Context) ([]string, error) {
	topo := &pb.SetRegions{}
	err := s.read(func(db *pebble.DB) error {
		_, err := getProto(db, key(tableRegions), topo)
		return err
	})
	return topo.Regions, err
}

// Policies returns every replication policy, ordered by prefix.
func (s *Store) Policies(context.Context) ([]*pb.Policy, error) {
	var rules placementRules
	err := s.read(func(db *pebble.DB) (err error) {
		rules, err = loadRules(db)
		return err
	})
	return rules.policies, err
}

// Policy resolves the replication policy of a repository.
func (s *Store) Policy(_ context.Context, repo string) (pb.EffectivePolicy, error) {
	var rules placementRules
	err := s.read(func(db *pebble.DB) (err error) {
		rules, err = loadRules(db)
		return err
	})
	if err != nil {
		return pb.EffectivePolicy{}, err
	}
	return pb.ResolvePolicy(rules.policies, rules.regions, repo), nil
}

// Wanted returns up to limit blobs that region should hold but does not,
// ordered by digest and starting after after.
func (s *Store) Wanted(_ context.Context, region, after string, limit int) ([]*pb.Wanted, error) {
	var out []*pb.Wanted
	err := s.read(func(db *pebble.DB) error {
		return scan(db, prefix(tableWanted, region), after, limit, func(_, v []byte) error {
			w := &pb.Wanted{}
			if err := proto.Unmarshal(v, w); err != nil {
				return err
			}
			out = append(out, w)
			return nil
		})
	})
	return out, err
}

// Lag summarizes a region's replication backlog.
type Lag struct {
	Blobs int64
	Bytes int64
	// OldestUnixNano is when the longest-waiting blob became wanted (0: none).
	OldestUnixNano int64
}

// RegionLag counts what region is missing.
func (s *Store) RegionLag(_ context.Context, region string) (Lag, error) {
	var lag Lag
	err := s.read(func(db *pebble.DB) error {
		return scan(db, prefix(tableWanted, region), "", -1, func(_, v []byte) error {
			w := &pb.Wanted{}
			if err := proto.Unmarshal(v, w); err != nil {
				return err
			}
			lag.Blobs++
			lag.Bytes += w.Size
			if lag.OldestUnixNano == 0 || w.SinceUnixNano < lag.OldestUnixNano {
				lag.OldestUnixNano = w.SinceUnixNano
			}
			return nil
		})
	})
	return lag, err
}
