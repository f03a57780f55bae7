package consensus

import (
	"context"
	"encoding/binary"
	"fmt"
	"slices"
	"time"

	"github.com/cockroachdb/pebble/v2"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// Deletes and garbage collection.
//
// References live in the state: a manifest's config and layers ('D') and an
// index's children ('I') are written when the manifest is put and dropped
// when it is deleted. Three candidate tables say since when something has
// been garbage: a blob link no manifest of its repository references ('C'),
// a blob record no repository links ('O'), a manifest no tag points at
// ('H'). They change only as references change, so a collection run reads
// the garbage, not the whole registry.
//
// A run is a series of CollectGarbage entries. Each re-checks its
// candidates at its own log index: a link, reference or tag that an earlier
// entry added wins, so no run can take a blob that a push in any region
// has just linked. A blob left with no link is condemned: it can no longer
// be linked or mounted, and each region holding it gets a removal row ('Z')
// that its replicator works off (delete the bytes, then BlobRemoved). The
// record goes with the last region's removal.
//
// A new push of the same digest writes to the same place in a region's
// store, and it writes before it links (LinkBlob with placed_region): an
// upload that wrote its bytes just before a removal deleted them must not
// link once the record is gone, or the registry acknowledges a blob whose
// bytes no region holds. So the last removal leaves a row ('z') with its
// log index, and an upload's link says after which index its gateway wrote
// (written_after_index): every removal committed by then had deleted before
// the write, while one committed later may have deleted the new bytes, and
// the link is refused (the client pushes again). Rows older than
// removedKeep go at the next run; a link written before the newest pruned
// row is refused, since nothing says what was removed after it.

// putTime writes a candidate row's since time.
func putTime(b *pebble.Batch, k []byte, t int64) error {
	return b.Set(k, encodeUint64s(uint64(t)), nil)
}

// timeAt reads a candidate row's since time.
func timeAt(r pebble.Reader, k []byte) (int64, bool, error) {
	v, ok, err := get(r, k)
	if err != nil || !ok || len(v) != 8 {
		return 0, false, err
	}
	return int64(binary.BigEndian.Uint64(v)), true, nil
}

// firstUnder returns the last field of the first key under p.
func firstUnder(r pebble.Reader, p []byte) (string, bool, error) {
	var first string
	found := false
	err := scan(r, p, "", 1, func(k, _ []byte) error {
		first, found = lastField(k), true
		return nil
	})
	return first, found, err
}

// addReferences records what manifest m of repo references.
func addReferences(b *pebble.Batch, repo, m string, blobs, children []string) error {
	for _, d := range blobs {
		if err := b.Set(key(tableBlobRef, repo, d, m), nil, nil); err != nil {
			return err
		}
		if err := b.Delete(key(tableUnrefLink, repo, d), nil); err != nil {
			return err
		}
	}
	for _, d := range children {
		if err := b.Set(key(tableChildRef, repo, d, m), nil, nil); err != nil {
			return err
		}
	}
	return nil
}

// dropReferences removes what rec referenced in repo; a linked blob that no
// manifest references any more becomes a candidate from now.
func dropReferences(b *pebble.Batch, repo string, rec *pb.ManifestRecord, now int64) error {
	for _, d := range rec.Blobs {
		if err := b.Delete(key(tableBlobRef, repo, d, rec.Digest), nil); err != nil {
			return err
		}
	}
	for _, d := range rec.Blobs {
		if err := markIfUnreferenced(b, repo, d, now); err != nil {
			return err
		}
	}
	for _, d := range rec.Manifests {
		if err := b.Delete(key(tableChildRef, repo, d, rec.Digest), nil); err != nil {
			return err
		}
	}
	return nil
}

// markIfUnreferenced starts the grace period of repo's link to blob d when
// no manifest of repo references it (and the link exists).
func markIfUnreferenced(b *pebble.Batch, repo, d string, now int64) error {
	_, referenced, err := firstUnder(b, prefix(tableBlobRef, repo, d))
	if err != nil || referenced {
		return err
	}
	linked, err := has(b, key(tableLink, repo, d))
	if err != nil || !linked {
		return err
	}
	return putTime(b, key(tableUnrefLink, repo, d), now)
}

// markIfUntagged starts the grace period of manifest d when no tag points
// at it (and it exists).
func markIfUntagged(b *pebble.Batch, repo, d string, now int64) error {
	_, tagged, err := firstUnder(b, prefix(tableTagIndex, repo, d))
	if err != nil || tagged {
		return err
	}
	exists, err := has(b, key(tableManifest, repo, d))
	if err != nil || !exists {
		return err
	}
	return putTime(b, key(tableUntagged, repo, d), now)
}

// unlink removes repo's link to blob d; a blob left with no link becomes an
// orphan from now.
func unlink(b *pebble.Batch, repo, d string, now int64) error {
	for _, k := range [][]byte{key(tableLink, repo, d), key(tableBlobRepos, d, repo), key(tableUnrefLink, repo, d)} {
		if err := b.Delete(k, nil); err != nil {
			return err
		}
	}
	size, err := blobSize(b, d)
	if err != nil {
		return err
	}
	if err := chargeLink(b, repo, d, size, -1); err != nil {
		return err
	}
	_, linked, err := firstUnder(b, prefix(tableBlobRepos, d))
	if err != nil || linked {
		return err
	}
	return putTime(b, key(tableOrphanBlob, d), now)
}

// refusedWhileReferenced refuses a delete that would leave a manifest
// pointing at nothing.
func refusedWhileReferenced(r pebble.Reader, table byte, repo, d, what, by string) error {
	m, found, err := firstUnder(r, prefix(table, repo, d))
	if err != nil || !found {
		return err
	}
	return pb.Errorf(pb.Code_CODE_DENIED, "%s %s is referenced by %s %s in %s; delete that first", what, d, by, m, repo)
}

// removeManifest removes a manifest, its tags, its referrer entry and its
// references. The caller has checked that no index lists it.
func removeManifest(b *pebble.Batch, repo string, rec *pb.ManifestRecord, now int64) error {
	tags, err := lastFields(b, prefix(tableTagIndex, repo, rec.Digest))
	if err != nil {
		return err
	}
	for _, tag := range tags {
		if err := b.Delete(key(tableTag, repo, tag), nil); err != nil {
			return err
		}
		if err := b.Delete(key(tableTagIndex, repo, rec.Digest, tag), nil); err != nil {
			return err
		}
		if err := b.Delete(key(tableTagTime, repo, tag), nil); err != nil {
			return err
		}
	}
	if err := b.Delete(key(tablePulled, repo, rec.Digest), nil); err != nil {
		return err
	}
	if err := chargeTags(b, repo, -int64(len(tags))); err != nil {
		return err
	}
	if rec.Subject != "" {
		if err := b.Delete(key(tableReferrer, repo, rec.Subject, rec.Digest), nil); err != nil {
			return err
		}
	}
	if err := b.Delete(key(tableUntagged, repo, rec.Digest), nil); err != nil {
		return err
	}
	if err := b.Delete(key(tableManifest, repo, rec.Digest), nil); err != nil {
		return err
	}
	return dropReferences(b, repo, rec, now)
}

func applyDeleteRepository(b *pebble.Batch, e *pb.LogEntry) error {
	repo := e.GetDeleteRepository().Repository
	ok, err := has(b, key(tableRepo, repo))
	if err != nil {
		return err
	}
	if !ok {
		return pb.Errorf(pb.Code_CODE_NAME_UNKNOWN, "repository %s not found", repo)
	}
	if err := refuseImmutableTagsOf(b, repo, "", "deleting the repository"); err != nil {
		return err
	}
	blobs, err := lastFields(b, prefix(tableLink, repo))
	if err != nil {
		return err
	}
	var tags int64
	if err := scan(b, prefix(tableTag, repo), "", -1, func(_, _ []byte) error {
		tags++
		return nil
	}); err != nil {
		return err
	}
	if err := chargeTags(b, repo, -tags); err != nil {
		return err
	}
	if err := chargeRepository(b, repo, -1); err != nil {
		return err
	}
	for _, table := range []byte{tableTag, tableTagIndex, tableManifest, tableReferrer, tableBlobRef, tableChildRef, tableUntagged, tableTagTime, tablePulled} {
		p := prefix(table, repo)
		if err := b.DeleteRange(p, upperBound(p), nil); err != nil {
			return err
		}
	}
	for _, d := range blobs {
		if err := unlink(b, repo, d, e.TimeUnixNano); err != nil {
			return err
		}
		if err := recomputeBlob(b, d, e.TimeUnixNano); err != nil {
			return err
		}
	}
	return b.Delete(key(tableRepo, repo), nil)
}

// blobPlan is what collecting one blob would do at a point of the log.
type blobPlan struct {
	digest string
	size   int64
	// drop are the repositories whose links go: unreferenced since before
	// the cut-off.
	drop []string
	// condemn: no link is left, so the bytes go in every region.
	condemn bool
}

// planBlob decides what collecting blob d does, given links unreferenced
// since before cutoff. Both the dry run and the state machine use it, so a
// dry run lists exactly what a run at the same point would do.
func planBlob(r pebble.Reader, d string, cutoff int64) (blobPlan, error) {
	p := blobPlan{digest: d}
	rec := &pb.BlobRecord{}
	found, err := getProto(r, key(tableBlob, d), rec)
	if err != nil || !found || rec.CondemnedUnixNano != 0 {
		return p, err
	}
	p.size = rec.Size
	repos, err := lastFields(r, prefix(tableBlobRepos, d))
	if err != nil {
		return p, err
	}
	for _, repo := range repos {
		since, ok, err := timeAt(r, key(tableUnrefLink, repo, d))
		if err != nil {
			return p, err
		}
		if ok && since <= cutoff {
			p.drop = append(p.drop, repo)
		}
	}
	if len(p.drop) < len(repos) {
		return p, nil
	}
	if len(repos) == 0 {
		since, ok, err := timeAt(r, key(tableOrphanBlob, d))
		if err != nil || !ok || since > cutoff {
			return p, err
		}
	}
	p.condemn = true
	return p, nil
}

// manifestCollectable reports whether manifest d of repo has been untagged
// since before cutoff, no index lists it, and it is not a referrer of a
// manifest that still exists (a signature lives as long as its image).
func manifestCollectable(r pebble.Reader, repo, d string, cutoff int64) (*pb.ManifestRecord, bool, error) {
	since, ok, err := timeAt(r, key(tableUntagged, repo, d))
	if err != nil || !ok || since > cutoff {
		return nil, false, err
	}
	if _, listed, err := firstUnder(r, prefix(tableChildRef, repo, d)); err != nil || listed {
		return nil, false, err
	}
	rec := &pb.ManifestRecord{}
	found, err := getProto(r, key(tableManifest, repo, d), rec)
	if err != nil || !found {
		return nil, false, err
	}
	if rec.Subject != "" {
		if live, err := has(r, key(tableManifest, repo, rec.Subject)); err != nil || live {
			return nil, false, err
		}
	}
	return rec, true, nil
}

func applyCollectGarbage(b *pebble.Batch, e *pb.LogEntry) error {
	c := e.GetCollectGarbage()
	now := e.TimeUnixNano
	run := &pb.GCRun{}
	if _, err := getProto(b, key(tableGC, "run"), run); err != nil {
		return err
	}
	if run.RunId != c.RunId {
		run = &pb.GCRun{
			RunId: c.RunId, StartedUnixNano: c.RunStartedUnixNano,
			UnreferencedBeforeUnixNano: c.UnreferencedBeforeUnixNano, UntaggedBeforeUnixNano: c.UntaggedBeforeUnixNano,
		}
		if err := pruneRemoved(b, now-int64(removedKeep)); err != nil {
			return err
		}
	}
	run.FinishedUnixNano = now
	run.Candidates += int64(len(c.Blobs) + len(c.Manifests))
	// One entry may carry hundreds of blobs: read the placement rules once.
	rules, err := loadRules(b)
	if err != nil {
		return err
	}
	if c.UntaggedBeforeUnixNano > 0 {
		for _, m := range c.Manifests {
			rec, ok, err := manifestCollectable(b, m.Repository, m.Digest, c.UntaggedBeforeUnixNano)
			if err != nil {
				return err
			}
			if !ok {
				continue
			}
			if err := removeManifest(b, m.Repository, rec, now); err != nil {
				return err
			}
			run.ManifestsDeleted++
		}
	}
	for _, d := range c.Blobs {
		p, err := planBlob(b, d, c.UnreferencedBeforeUnixNano)
		if err != nil {
			return err
		}
		for _, repo := range p.drop {
			if err := unlink(b, repo, d, now); err != nil {
				return err
			}
			run.LinksDropped++
		}
		if p.condemn {
			if err := condemn(b, rules, d, now); err != nil {
				return err
			}
			run.BlobsCondemned++
			run.BytesCondemned += p.size
		} else if len(p.drop) > 0 {
			if err := recomputeWanted(b, rules, d, now); err != nil {
				return err
			}
		}
	}
	return setProto(b, key(tableGC, "run"), run)
}

// condemn marks blob d for removal: it can no longer be linked, and every
// region holding it must delete its copy. A blob held nowhere goes at once.
func condemn(b *pebble.Batch, rules placementRules, d string, now int64) error {
	rec := &pb.BlobRecord{}
	if _, err := getProto(b, key(tableBlob, d), rec); err != nil {
		return err
	}
	if err := b.Delete(key(tableOrphanBlob, d), nil); err != nil {
		return err
	}
	if len(rec.Regions) == 0 {
		return b.Delete(key(tableBlob, d), nil)
	}
	rec.CondemnedUnixNano = now
	if err := setProto(b, key(tableBlob, d), rec); err != nil {
		return err
	}
	for _, region := range rec.Regions {
		if err := setProto(b, key(tableRemoval, region, d), &pb.Wanted{Digest: d, Size: rec.Size, SinceUnixNano: now}); err != nil {
			return err
		}
	}
	return recomputeWanted(b, rules, d, now)
}

// applyBlobRemoved records that a region deleted its copy of a condemned
// blob. Only a pending removal counts: a region never drops a live copy
// this way.
func applyBlobRemoved(b *pebble.Batch, e *pb.LogEntry) error {
	c := e.GetBlobRemoved()
	zk := key(tableRemoval, c.Region, c.Digest)
	pending, err := has(b, zk)
	if err != nil || !pending {
		return err
	}
	if err := b.Delete(zk, nil); err != nil {
		return err
	}
	rec := &pb.BlobRecord{}
	found, err := getProto(b, key(tableBlob, c.Digest), rec)
	if err != nil || !found {
		return err
	}
	rec.Regions = slices.DeleteFunc(rec.Regions, func(r string) bool { return r == c.Region })
	freed := &pb.GCRegion{Region: c.Region}
	fk := key(tableGC, "freed", c.Region)
	if _, err := getProto(b, fk, freed); err != nil {
		return err
	}
	freed.BlobsFreed++
	freed.BytesFreed += rec.Size
	if err := setProto(b, fk, freed); err != nil {
		return err
	}
	if rec.CondemnedUnixNano != 0 && len(rec.Regions) == 0 {
		if e.Version >= 3 {
			index, _, err := appliedIndex(b)
			if err != nil {
				return err
			}
			if err := b.Set(key(tableRemoved, c.Digest), encodeUint64s(index, uint64(e.TimeUnixNano)), nil); err != nil {
				return err
			}
		}
		return b.Delete(key(tableBlob, c.Digest), nil)
	}
	if err := setProto(b, key(tableBlob, c.Digest), rec); err != nil {
		return err
	}
	return recomputeBlob(b, c.Digest, e.TimeUnixNano)
}

// removedKeep is how long the row of a removed blob stays: far longer than
// an upload takes from writing its bytes to linking them.
const removedKeep = time.Hour

// refuseIfRemovedSince refuses an upload's link of blob d when its bytes,
// written after index writtenAfter, may have been deleted by a removal
// committed after that index.
func refuseIfRemovedSince(r pebble.Reader, d string, writtenAfter uint64) error {
	v, ok, err := get(r, key(tableRemoved, d))
	if err != nil {
		return err
	}
	if ok && len(v) == 16 && binary.BigEndian.Uint64(v) > writtenAfter {
		return pb.Errorf(pb.Code_CODE_UNAVAILABLE,
			"blob %s was garbage-collected while this upload wrote it; push it again", d)
	}
	pv, ok, err := get(r, key(tableGC, "removed-pruned"))
	if err != nil {
		return err
	}
	if ok && len(pv) == 8 && binary.BigEndian.Uint64(pv) > writtenAfter {
		return pb.Errorf(pb.Code_CODE_UNAVAILABLE,
			"the upload of blob %s is older than what garbage collection remembers; push it again", d)
	}
	return nil
}

// pruneRemoved drops the rows of blobs removed before cutoff and remembers
// the newest index among them.
func pruneRemoved(b *pebble.Batch, cutoff int64) error {
	var old [][]byte
	var newest uint64
	if err := scan(b, key(tableRemoved), "", -1, func(k, v []byte) error {
		if len(v) == 16 && int64(binary.BigEndian.Uint64(v[8:])) < cutoff {
			old = append(old, slices.Clone(k))
			newest = max(newest, binary.BigEndian.Uint64(v))
		}
		return nil
	}); err != nil {
		return err
	}
	for _, k := range old {
		if err := b.Delete(k, nil); err != nil {
			return err
		}
	}
	if newest == 0 {
		return nil
	}
	pk := key(tableGC, "removed-pruned")
	if pv, ok, err := get(b, pk); err != nil {
		return err
	} else if ok && len(pv) == 8 {
		newest = max(newest, binary.BigEndian.Uint64(pv))
	}
	return b.Set(pk, encodeUint64s(newest), nil)
}

// GCPlan is what a collection run at the store's current state would do.
type GCPlan struct {
	// Blobs whose links go, or which are condemned, in digest order.
	Blobs []BlobCollection
	// Manifests deleted as untagged.
	Manifests []*pb.ManifestRef
}

// BlobCollection is one blob's part of a plan.
type BlobCollection struct {
	Digest string
	Size   int64
	// Unlinked are the repositories whose link to the blob goes.
	Unlinked []string
	// Condemned: no link is left, so every region deletes the bytes.
	Condemned bool
}

// PlanGC reads the candidate tables and returns what a run with these
// cut-offs would collect (untaggedBefore 0: no manifests). The state
// machine applies the same checks again when the run's entries commit.
func (s *Store) PlanGC(_ context.Context, unreferencedBefore, untaggedBefore int64) (*GCPlan, error) {
	plan := &GCPlan{}
	err := s.read(func(db *pebble.DB) error {
		snap := db.NewSnapshot()
		defer snap.Close()
		if untaggedBefore > 0 {
			var refs []*pb.ManifestRef
			if err := scan(snap, key(tableUntagged), "", -1, func(k, v []byte) error {
				if len(v) == 8 && int64(binary.BigEndian.Uint64(v)) <= untaggedBefore {
					repo, d, err := splitPair(k)
					if err != nil {
						return err
					}
					refs = append(refs, &pb.ManifestRef{Repository: repo, Digest: d})
				}
				return nil
			}); err != nil {
				return err
			}
			for _, m := range refs {
				if _, ok, err := manifestCollectable(snap, m.Repository, m.Digest, untaggedBefore); err != nil {
					return err
				} else if ok {
					plan.Manifests = append(plan.Manifests, m)
				}
			}
		}
		var digests []string
		collect := func(d string, v []byte) {
			if len(v) == 8 && int64(binary.BigEndian.Uint64(v)) <= unreferencedBefore {
				digests = append(digests, d)
			}
		}
		if err := scan(snap, key(tableUnrefLink), "", -1, func(k, v []byte) error {
			collect(lastField(k), v)
			return nil
		}); err != nil {
			return err
		}
		if err := scan(snap, key(tableOrphanBlob), "", -1, func(k, v []byte) error {
			collect(string(k[2:]), v)
			return nil
		}); err != nil {
			return err
		}
		slices.Sort(digests)
		for _, d := range slices.Compact(digests) {
			p, err := planBlob(snap, d, unreferencedBefore)
			if err != nil {
				return err
			}
			if len(p.drop) > 0 || p.condemn {
				plan.Blobs = append(plan.Blobs, BlobCollection{Digest: d, Size: p.size, Unlinked: p.drop, Condemned: p.condemn})
			}
		}
		return nil
	})
	return plan, err
}

// splitPair splits a key of the form v table a 0 b.
func splitPair(k []byte) (string, string, error) {
	rest := string(k[2:])
	for i := 0; i < len(rest); i++ {
		if rest[i] == sep {
			return rest[:i], rest[i+1:], nil
		}
	}
	return "", "", fmt.Errorf("key %q: want two fields", k)
}

// Removals lists condemned blobs region must still delete, by digest after
// after: the replicator's removal work list.
func (s *Store) Removals(_ context.Context, region, after string, limit int) ([]*pb.Wanted, error) {
	var out []*pb.Wanted
	err := s.read(func(db *pebble.DB) error {
		var err error
		out, err = scanValues(db, prefix(tableRemoval, region), after, limit, func() *pb.Wanted { return &pb.Wanted{} })
		return err
	})
	return out, err
}

// GCStatus returns the last collection run (nil before the first) and, per
// region of regions, what collection freed there and what it still has to
// remove.
func (s *Store) GCStatus(_ context.Context, regions []string) (*pb.GCRun, []*pb.GCRegion, error) {
	var run *pb.GCRun
	var out []*pb.GCRegion
	err := s.read(func(db *pebble.DB) error {
		snap := db.NewSnapshot()
		defer snap.Close()
		r := &pb.GCRun{}
		ok, err := getProto(snap, key(tableGC, "run"), r)
		if err != nil {
			return err
		}
		if ok {
			run = r
		}
		for _, region := range regions {
			g := &pb.GCRegion{}
			if _, err := getProto(snap, key(tableGC, "freed", region), g); err != nil {
				return err
			}
			g.Region = region
			pending, err := scanValues(snap, prefix(tableRemoval, region), "", -1, func() *pb.Wanted { return &pb.Wanted{} })
			if err != nil {
				return err
			}
			for _, w := range pending {
				g.BlobsPending++
				g.BytesPending += w.Size
			}
			out = append(out, g)
		}
		return nil
	})
	return run, out, err
}
