package consensus

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

func deleteRepo(repo string) *pb.LogEntry {
	return &pb.LogEntry{Command: &pb.LogEntry_DeleteRepository{DeleteRepository: &pb.DeleteRepository{Repository: repo}}}
}

func blobRemoved(digest, region string) *pb.LogEntry {
	return &pb.LogEntry{Command: &pb.LogEntry_BlobRemoved{BlobRemoved: &pb.BlobRemoved{Digest: digest, Region: region}}}
}

// collectEntry is a CollectGarbage entry for the candidates of plan.
func collectEntry(run string, unrefBefore, untaggedBefore int64, plan *GCPlan) *pb.LogEntry {
	c := &pb.CollectGarbage{RunId: run, UnreferencedBeforeUnixNano: unrefBefore, UntaggedBeforeUnixNano: untaggedBefore, Manifests: plan.Manifests}
	for _, b := range plan.Blobs {
		c.Blobs = append(c.Blobs, b.Digest)
	}
	return &pb.LogEntry{Command: &pb.LogEntry_CollectGarbage{CollectGarbage: c}}
}

// now is the time of the last applied entry (entries are 1 ms apart).
func (h *testFSM) now() int64 { return int64(h.index) * 1_000_000 }

// gc plans and runs a collection with both cut-offs at the last entry's time:
// everything unreferenced or untagged so far goes.
func (h *testFSM) gc(run string) *GCPlan {
	h.tb.Helper()
	return h.gcUntil(run, h.now(), h.now())
}

func (h *testFSM) gcUntil(run string, unrefBefore, untaggedBefore int64) *GCPlan {
	h.tb.Helper()
	plan, err := h.store.PlanGC(context.Background(), unrefBefore, untaggedBefore)
	if err != nil {
		h.tb.Fatal(err)
	}
	h.mustApply(collectEntry(run, unrefBefore, untaggedBefore, plan))
	return plan
}

// image puts a manifest in repo referencing blobs, which it places first.
func (h *testFSM) image(repo, content string, tags []string, blobs ...string) string {
	h.tb.Helper()
	for _, d := range blobs {
		h.mustApply(placeBlob(repo, d, int64(len(d)), "us"))
	}
	c := manifest(repo, content, tags...)
	c.Blobs = blobs
	h.mustApply(put(c))
	return c.Digest
}

func wantCondemned(t *testing.T, s *Store, digest string, regions ...string) {
	t.Helper()
	rec, err := s.Blob(context.Background(), digest)
	if err != nil {
		t.Fatalf("Blob(%s): %v", digest, err)
	}
	if rec.CondemnedUnixNano == 0 {
		t.Fatalf("blob %s is not condemned", digest)
	}
	for _, r := range regions {
		got, err := s.Removals(context.Background(), r, "", -1)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.ContainsFunc(got, func(w *pb.Wanted) bool { return w.Digest == digest }) {
			t.Fatalf("region %s has no removal of %s", r, digest)
		}
	}
}

func TestDeletesRefusedWhileReferenced(t *testing.T) {
	h := newTestFSM(t)
	layer, config := digestOf("layer"), digestOf("config")
	img := h.image("app", "img", nil, config, layer)
	idx := manifest("app", "index", "latest")
	idx.Manifests = []string{img}
	h.mustApply(put(idx))

	// A blob a manifest uses, and a manifest an index lists, stay.
	err := h.apply(unlinkBlob("app", layer))
	if !errors.Is(err, pb.ErrDenied) || !strings.Contains(err.Error(), img) {
		t.Fatalf("unlink of a referenced blob: %v; want DENIED naming %s", err, img)
	}
	err = h.apply(deleteManifest("app", img))
	if !errors.Is(err, pb.ErrDenied) || !strings.Contains(err.Error(), idx.Digest) {
		t.Fatalf("delete of a listed manifest: %v; want DENIED naming %s", err, idx.Digest)
	}
	// Top down, everything goes.
	h.mustApply(deleteManifest("app", idx.Digest))
	h.mustApply(deleteManifest("app", img))
	h.mustApply(unlinkBlob("app", layer))
	h.mustApply(unlinkBlob("app", config))
	h.checkApplied()
}

func TestGCCondemnsUnreferencedBlobsAfterGrace(t *testing.T) {
	h := newTestFSM(t)
	ctx := context.Background()
	layer, config, shared := digestOf("layer"), digestOf("config"), digestOf("shared")
	img := h.image("app", "img", []string{"v1"}, config, layer, shared)
	h.mustApply(placeBlob("app", layer, int64(len(layer)), "eu"))
	h.image("other", "other-img", []string{"v1"}, shared)
	h.mustApply(deleteManifest("app", img))
	deleted := h.now()

	// Within the grace period nothing goes.
	plan, err := h.store.PlanGC(ctx, deleted-1, 0)
	if err != nil || len(plan.Blobs) != 0 {
		t.Fatalf("plan inside the grace period = %+v, %v; want nothing", plan.Blobs, err)
	}
	plan = h.gc("run1")
	var condemned []string
	for _, b := range plan.Blobs {
		if b.Condemned {
			condemned = append(condemned, b.Digest)
		}
	}
	slices.Sort(condemned)
	want := []string{config, layer}
	slices.Sort(want)
	if !slices.Equal(condemned, want) {
		t.Fatalf("plan condemns %v; want %v", condemned, want)
	}
	// The shared blob lost its link in app only.
	if _, err := h.store.LinkedBlob(ctx, "app", shared); !errors.Is(err, pb.ErrBlobUnknown) {
		t.Fatalf("app's unreferenced link to the shared blob: %v; want gone", err)
	}
	if _, err := h.store.LinkedBlob(ctx, "other", shared); err != nil {
		t.Fatalf("other's referenced link: %v", err)
	}
	wantCondemned(t, h.store, layer, "us", "eu")
	wantCondemned(t, h.store, config, "us")

	// A condemned blob cannot be mounted, nor linked until it is gone.
	h.reject(mountBlob("third", layer, ""), pb.ErrBlobUnknown)
	h.reject(placeBlob("third", layer, int64(len(layer)), "us"), pb.ErrUnavailable)

	// Each region removes its copy; the record goes with the last.
	h.mustApply(blobRemoved(layer, "us"))
	wantCondemned(t, h.store, layer, "eu")
	h.mustApply(blobRemoved(layer, "us")) // a repeat changes nothing
	h.mustApply(blobRemoved(layer, "eu"))
	if _, err := h.store.Blob(ctx, layer); !errors.Is(err, pb.ErrBlobUnknown) {
		t.Fatalf("record after every region removed it: %v", err)
	}
	run, regions, err := h.store.GCStatus(ctx, []string{"eu", "us"})
	if err != nil {
		t.Fatal(err)
	}
	if run.RunId != "run1" || run.BlobsCondemned != 2 || run.LinksDropped != 3 {
		t.Fatalf("run = %+v; want run1, 2 condemned, 3 links dropped", run)
	}
	if regions[0].BlobsFreed != 1 || regions[1].BlobsFreed != 1 || regions[1].BlobsPending != 1 {
		t.Fatalf("regions = %+v; want eu 1 freed, us 1 freed and 1 pending", regions)
	}

	// Once gone, the same digest pushes afresh, but only an upload that
	// wrote its bytes after the last removal committed: one that wrote
	// before may have had them deleted under it.
	removedAt := h.index
	stale := placeBlob("third", layer, int64(len(layer)), "us")
	stale.GetLinkBlob().WrittenAfterIndex = removedAt - 1
	h.reject(stale, pb.ErrUnavailable)
	fresh := placeBlob("third", layer, int64(len(layer)), "us")
	fresh.GetLinkBlob().WrittenAfterIndex = removedAt
	h.mustApply(fresh)
	h.checkApplied()
}

// TestGCRemovalFencesUploads checks the row a removal leaves: it refuses
// links of uploads written before it, not after, only in log format 3,
// and a run prunes it after removedKeep, then refuses uploads older than
// what it pruned.
func TestGCRemovalFencesUploads(t *testing.T) {
	h := newTestFSM(t)
	layer := digestOf("layer")
	h.mustApply(placeBlob("app", layer, 5, "us"))
	written := h.index // an upload in flight wrote after this
	h.gc("run1")
	h.mustApply(blobRemoved(layer, "us"))
	removedAt := h.index
	link := func(fence uint64) *pb.LogEntry {
		e := placeBlob("app", layer, 5, "us")
		e.GetLinkBlob().WrittenAfterIndex = fence
		return e
	}
	h.reject(link(written), pb.ErrUnavailable)
	h.reject(link(removedAt-1), pb.ErrUnavailable)
	// Format 1 (a cluster still upgrading) has no fence, as before.
	old := link(written)
	old.Version = 1
	old.GetLinkBlob().WrittenAfterIndex = 0
	h.mustApply(old)

	// A later removal of the same digest: the row moves to it.
	h.mustApply(unlinkBlob("app", layer))
	h.gc("run2")
	h.mustApply(blobRemoved(layer, "us"))
	h.reject(link(removedAt), pb.ErrUnavailable)
	removedAt = h.index - 1 // the removal, before the rejected link
	h.mustApply(link(removedAt))

	// A run after removedKeep prunes the row; an upload written before the
	// pruned removal is refused, one after it links.
	other := digestOf("other")
	h.mustApply(placeBlob("app", other, 5, "us"))
	h.mustApply(unlinkBlob("app", layer))
	h.mustApply(unlinkBlob("app", other))
	plan, err := h.store.PlanGC(context.Background(), h.now(), 0)
	if err != nil {
		t.Fatal(err)
	}
	later := collectEntry("run3", h.now(), 0, plan)
	later.TimeUnixNano = h.now() + int64(removedKeep) + 1
	h.mustApply(later)
	if _, ok, err := get(h.store.db, key(tableRemoved, layer)); err != nil || ok {
		t.Fatalf("row of a removal older than removedKeep after a run: %v, %v; want pruned", ok, err)
	}
	// A digest never removed: only what was pruned can refuse it.
	never := func(fence uint64) *pb.LogEntry {
		e := placeBlob("app", digestOf("never"), 5, "us")
		e.GetLinkBlob().WrittenAfterIndex = fence
		return e
	}
	h.reject(never(removedAt-1), pb.ErrUnavailable)
	h.mustApply(never(removedAt))
	h.checkApplied()
}

func TestGCLinkAfterPlanWins(t *testing.T) {
	h := newTestFSM(t)
	ctx := context.Background()
	layer := digestOf("layer")
	h.mustApply(placeBlob("app", layer, 5, "us"))
	cutoff := h.now()
	plan, err := h.store.PlanGC(ctx, cutoff, 0)
	if err != nil || len(plan.Blobs) != 1 || !plan.Blobs[0].Condemned {
		t.Fatalf("plan = %+v, %v; want the layer condemned", plan.Blobs, err)
	}
	// Between the plan and its entry, a push in another region links it
	// again, and a manifest starts using it.
	h.mustApply(placeBlob("app", layer, 5, "eu"))
	c := manifest("app", "img", "v1")
	c.Blobs = []string{layer}
	h.mustApply(put(c))
	h.mustApply(collectEntry("run", cutoff, 0, plan))
	rec, err := h.store.LinkedBlob(ctx, "app", layer)
	if err != nil || rec.CondemnedUnixNano != 0 {
		t.Fatalf("blob after a link raced the run: %+v, %v; want linked and alive", rec, err)
	}
	// A relink alone (no manifest) also restarts the grace period.
	h.mustApply(placeBlob("solo", digestOf("solo"), 4, "us"))
	cutoff = h.now()
	plan, _ = h.store.PlanGC(ctx, cutoff, 0)
	h.mustApply(placeBlob("solo", digestOf("solo"), 4, "us"))
	h.mustApply(collectEntry("run2", cutoff, 0, plan))
	if _, err := h.store.LinkedBlob(ctx, "solo", digestOf("solo")); err != nil {
		t.Fatalf("relinked blob collected: %v", err)
	}
}

func TestGCUntaggedManifests(t *testing.T) {
	h := newTestFSM(t)
	ctx := context.Background()
	tagged := h.image("app", "tagged", []string{"v1"}, digestOf("l1"))
	untagged := h.image("app", "untagged", nil, digestOf("l2"))
	child := h.image("app", "child", nil, digestOf("l3"))
	idx := manifest("app", "index", "multi")
	idx.Manifests = []string{child}
	h.mustApply(put(idx))
	sig := manifest("app", "signature")
	sig.Subject = tagged
	h.mustApply(put(sig))
	orphanSig := manifest("app", "orphan-signature")
	orphanSig.Subject = digestOf("gone")
	h.mustApply(put(orphanSig))
	retagged := h.image("app", "retagged", []string{"moving"}, digestOf("l4"))
	h.image("app", "newer", []string{"moving"}, digestOf("l5")) // retagged loses its tag

	// Untagged collection is off unless asked for.
	plan, err := h.store.PlanGC(ctx, h.now(), 0)
	if err != nil || len(plan.Manifests) != 0 {
		t.Fatalf("plan without an untagged cut-off = %v, %v", plan.Manifests, err)
	}
	plan = h.gc("run")
	var got []string
	for _, m := range plan.Manifests {
		got = append(got, m.Digest)
	}
	want := []string{untagged, orphanSig.Digest, retagged}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("untagged manifests collected = %v; want %v", got, want)
	}
	for _, d := range want {
		if _, err := h.store.Manifest(ctx, "app", d); !errors.Is(err, pb.ErrManifestUnknown) {
			t.Fatalf("manifest %s after collection: %v", d, err)
		}
	}
	for _, d := range []string{tagged, child, idx.Digest, sig.Digest} {
		if _, err := h.store.Manifest(ctx, "app", d); err != nil {
			t.Fatalf("kept manifest %s: %v", d, err)
		}
	}
	// The collected manifests' layers are unreferenced from now: the next
	// run, after the grace period, takes them.
	plan = h.gc("run2")
	if len(plan.Blobs) != 2 {
		t.Fatalf("second run collects %+v; want l2 and l4", plan.Blobs)
	}
	wantCondemned(t, h.store, digestOf("l2"), "us")
	wantCondemned(t, h.store, digestOf("l4"), "us")
}

func TestDeleteRepository(t *testing.T) {
	h := newTestFSM(t)
	ctx := context.Background()
	shared, own := digestOf("shared"), digestOf("own")
	h.image("doomed", "img", []string{"v1", "v2"}, shared, own)
	h.image("kept", "img2", []string{"v1"}, shared)
	h.mustApply(deleteRepo("doomed"))
	if ok, err := h.store.RepositoryExists(ctx, "doomed"); err != nil || ok {
		t.Fatalf("repository after delete: %v, %v", ok, err)
	}
	wantNoTag(t, h.store, "doomed", "v1")
	if _, err := h.store.LinkedBlob(ctx, "doomed", own); !errors.Is(err, pb.ErrBlobUnknown) {
		t.Fatalf("link after repository delete: %v", err)
	}
	h.gc("run")
	wantCondemned(t, h.store, own, "us")
	if rec, err := h.store.LinkedBlob(ctx, "kept", shared); err != nil || rec.CondemnedUnixNano != 0 {
		t.Fatalf("blob another repository uses: %+v, %v", rec, err)
	}
	h.reject(deleteRepo("doomed"), pb.ErrNameUnknown)
	// The name can be used again from scratch.
	h.image("doomed", "img", []string{"v1"}, digestOf("fresh"))
	wantTags(t, h.store, "doomed", "v1")
}

func TestCopyFinishingAfterCondemnationIsRemoved(t *testing.T) {
	h := newTestFSM(t)
	h.mustApply(setRegions("us", "eu"))
	d := digestOf("layer")
	h.mustApply(placeBlob("app", d, 5, "us"))
	wantWanted(t, h.store, "eu", d)
	h.mustApply(unlinkBlob("app", d))
	h.gc("run")
	wantCondemned(t, h.store, d, "us")
	// eu's replicator was mid-copy; its placement lands now.
	h.mustApply(placeIn(d, 5, "eu"))
	wantCondemned(t, h.store, d, "us", "eu")
	wantWanted(t, h.store, "eu")
}

func immutable(repos, tags string) *pb.LogEntry {
	return &pb.LogEntry{Command: &pb.LogEntry_SetImmutableRule{SetImmutableRule: &pb.SetImmutableRule{
		Rule: &pb.ImmutableRule{Repositories: repos, Tags: tags}}}}
}

func TestImmutableTags(t *testing.T) {
	h := newTestFSM(t)
	v1 := h.image("team/app", "one", []string{"v1", "latest"}, digestOf("l1"))
	h.mustApply(immutable("team", "v*"))
	h.reject(immutable("team", "["), pb.ErrInvalidArgument)

	// Covered tags stay where they are.
	two := manifest("team/app", "two", "v1")
	err := h.apply(put(two))
	if !errors.Is(err, pb.ErrDenied) || !strings.Contains(err.Error(), "immutable") || !strings.Contains(err.Error(), "team") {
		t.Fatalf("moving an immutable tag: %v; want DENIED naming the rule", err)
	}
	h.reject(deleteTag("team/app", "v1"), pb.ErrDenied)
	h.reject(deleteManifest("team/app", v1), pb.ErrDenied)
	h.reject(deleteRepo("team/app"), pb.ErrDenied)

	// Re-pushing the same manifest, new covered tags, and uncovered tags
	// (or repositories) are fine.
	h.mustApply(put(manifest("team/app", "one", "v1")))
	h.mustApply(put(manifest("team/app", "two", "v2")))
	h.mustApply(put(manifest("team/app", "two", "latest")))
	h.mustApply(put(manifest("other/app", "one", "v1")))
	h.mustApply(put(manifest("other/app", "two", "v1")))

	// Without the rule, the tag moves again.
	h.mustApply(&pb.LogEntry{Command: &pb.LogEntry_DeleteImmutableRule{DeleteImmutableRule: &pb.DeleteImmutableRule{
		Rule: &pb.ImmutableRule{Repositories: "team", Tags: "v*"}}}})
	h.mustApply(put(manifest("team/app", "two", "v1")))
	wantTag(t, h.store, "team/app", "v1", digestOf("two"))
}

func setQuota(repos string, maxBytes, maxRepos, maxTags int64) *pb.LogEntry {
	return &pb.LogEntry{Command: &pb.LogEntry_SetQuota{SetQuota: &pb.SetQuota{Quota: &pb.Quota{
		Repositories: repos, MaxBytes: maxBytes, MaxRepositories: maxRepos, MaxTags: maxTags}}}}
}

func wantUsage(t *testing.T, s *Store, repos string, bytes, nrepos, tags int64) {
	t.Helper()
	us, err := s.QuotaUsages(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range us {
		if u.Quota.Repositories == repos {
			if u.Bytes != bytes || u.Repositories != nrepos || u.Tags != tags {
				t.Fatalf("quota %q uses %d bytes, %d repositories, %d tags; want %d, %d, %d", repos, u.Bytes, u.Repositories, u.Tags, bytes, nrepos, tags)
			}
			return
		}
	}
	t.Fatalf("no quota %q", repos)
}

func TestQuotas(t *testing.T) {
	h := newTestFSM(t)
	ctx := context.Background()
	shared := digestOf("shared")
	// Usage is counted from what exists when the quota is set.
	h.mustApply(placeBlob("team/a", shared, 100, "us"))
	h.mustApply(setQuota("team", 250, 2, 2))
	wantUsage(t, h.store, "team", 100, 1, 0)

	// A blob linked in two covered repositories counts once.
	h.mustApply(mountBlob("team/b", shared, "team/a"))
	wantUsage(t, h.store, "team", 100, 2, 0)
	h.mustApply(placeBlob("team/b", digestOf("b1"), 150, "us"))
	wantUsage(t, h.store, "team", 250, 2, 0)

	// Past a limit: DENIED with the usage, and nothing changes.
	err := h.apply(placeBlob("team/b", digestOf("b2"), 1, "us"))
	if !errors.Is(err, pb.ErrDenied) || !strings.Contains(err.Error(), "quota exceeded: uses 250 of 250 bytes") {
		t.Fatalf("link past the byte quota: %v", err)
	}
	wantUsage(t, h.store, "team", 250, 2, 0)
	// The refused push's bytes are in the store: the record stays,
	// unlinked, and collection frees them.
	if _, err := h.store.LinkedBlob(ctx, "team/b", digestOf("b2")); !errors.Is(err, pb.ErrBlobUnknown) {
		t.Fatalf("refused blob is linked: %v", err)
	}
	plan, err := h.store.PlanGC(ctx, h.now(), 0)
	if err != nil || !slices.ContainsFunc(plan.Blobs, func(b BlobCollection) bool { return b.Digest == digestOf("b2") && b.Condemned }) {
		t.Fatalf("collection plan %+v, %v; want the refused blob condemned", plan.Blobs, err)
	}

	if err := h.apply(placeBlob("team/c", digestOf("c"), 1, "us")); !errors.Is(err, pb.ErrDenied) { // a third repository
		t.Fatalf("a third repository: %v", err)
	}
	h.mustApply(placeBlob("elsewhere", digestOf("e"), 1000, "us")) // not covered

	// Tags.
	m := manifest("team/a", "m", "v1", "v2")
	m.Blobs = []string{shared}
	h.mustApply(put(m))
	wantUsage(t, h.store, "team", 250, 2, 2)
	h.reject(put(manifest("team/a", "m2", "v3")), pb.ErrDenied)
	h.mustApply(put(manifest("team/a", "m2", "v2"))) // moving a tag adds none
	h.mustApply(deleteTag("team/a", "v2"))
	wantUsage(t, h.store, "team", 250, 2, 1)

	// Unlinks and repository deletes give it back.
	h.mustApply(deleteRepo("team/b"))
	wantUsage(t, h.store, "team", 100, 1, 1)
	h.mustApply(placeBlob("team/c", digestOf("c2"), 150, "us"))
	wantUsage(t, h.store, "team", 250, 2, 1)

	// Replays and snapshots agree: a second store fed the same log holds
	// the same usage.
	h2 := newTestFSM(t)
	for _, l := range h.logs {
		applyResult(t, h2.fsm.Apply(l))
	}
	if !slices.Equal(h.digest(), h2.digest()) {
		t.Fatal("replaying the log gives another state")
	}
}

func setRetention(r *pb.RetentionRule) *pb.LogEntry {
	return &pb.LogEntry{Command: &pb.LogEntry_SetRetentionRule{SetRetentionRule: &pb.SetRetentionRule{Rule: r}}}
}

func recordPull(repo, digest string, t int64) *pb.LogEntry {
	return &pb.LogEntry{Command: &pb.LogEntry_RecordPulls{RecordPulls: &pb.RecordPulls{Pulls: []*pb.Pull{{Repository: repo, Digest: digest, UnixNano: t}}}}}
}

// retain plans a retention run now and applies it, returning the plan.
func (h *testFSM) retain(run string) *pb.ApplyRetention {
	h.tb.Helper()
	plan, err := h.store.PlanRetention(context.Background(), h.now())
	if err != nil {
		h.tb.Fatal(err)
	}
	plan.RunId = run
	h.mustApply(&pb.LogEntry{Command: &pb.LogEntry_ApplyRetention{ApplyRetention: proto.Clone(plan).(*pb.ApplyRetention)}})
	return plan
}

func TestRetention(t *testing.T) {
	h := newTestFSM(t)
	ctx := context.Background()
	// Six releases pushed in order, a protected "stable", a "dev-" tag the
	// pattern does not count, and an old untagged manifest.
	var rel []string
	for i := range 6 {
		rel = append(rel, h.image("app", fmt.Sprint("release-", i), []string{fmt.Sprintf("v%d", i)}, digestOf(fmt.Sprint("layer-", i))))
	}
	h.mustApply(put(manifest("app", "release-0", "stable")))
	h.image("app", "dev", []string{"dev-1"}, digestOf("dev-layer"))
	old := h.image("app", "old-untagged", nil, digestOf("old-layer"))
	// v1 was pulled recently; the rule keeps what was pulled within the window.
	h.mustApply(recordPull("app", rel[1], h.now()))
	h.mustApply(immutable("app", "v2"))
	h.mustApply(setRetention(&pb.RetentionRule{Repositories: "app", KeepTags: 2, TagPattern: "v*",
		ProtectedTags: []string{"stable"}, UntaggedAfterNanos: 1, KeepPulledWithinNanos: int64(time.Hour)}))
	h.reject(setRetention(&pb.RetentionRule{Repositories: "app", TagPattern: "["}), pb.ErrInvalidArgument)

	plan := h.retain("r1")
	var planned []string
	for _, tg := range plan.Tags {
		planned = append(planned, tg.Tag)
	}
	slices.Sort(planned)
	// v5, v4 kept (newest two counted); v2 immutable and v1 pulled are not
	// counted or kept; v3 and v0 go. v0's manifest keeps "stable".
	if !slices.Equal(planned, []string{"v0", "v3"}) {
		t.Fatalf("retention plans to delete tags %v; want [v0 v3]", planned)
	}
	wantTags(t, h.store, "app", "dev-1", "stable", "v1", "v2", "v4", "v5")
	// v3's manifest had no other tag: it went too; v0's stays under stable.
	if _, err := h.store.Manifest(ctx, "app", rel[3]); !errors.Is(err, pb.ErrManifestUnknown) {
		t.Fatalf("manifest of a deleted tag: %v", err)
	}
	if _, err := h.store.Manifest(ctx, "app", rel[0]); err != nil {
		t.Fatalf("manifest still tagged stable: %v", err)
	}
	if _, err := h.store.Manifest(ctx, "app", old); !errors.Is(err, pb.ErrManifestUnknown) {
		t.Fatalf("old untagged manifest: %v", err)
	}
	run, err := func() (*pb.RetentionRun, error) {
		r := &pb.RetentionRun{}
		_, err := getProto(h.store.db, key(tableGC, "retention"), r)
		return r, err
	}()
	if err != nil || run.TagsDeleted != 2 || run.ManifestsDeleted != 2 {
		t.Fatalf("retention run = %+v, %v; want 2 tags, 2 manifests", run, err)
	}

	// A tag pushed again after the plan stays: the entry re-checks.
	h.image("app", "release-6", []string{"v6"}, digestOf("layer-6"))
	plan, _ = h.store.PlanRetention(ctx, h.now())
	plan.RunId = "r2"
	// v4 is pushed again (deleted and re-created on the same manifest)
	// after the plan: newer than the plan, it stays.
	h.mustApply(deleteTag("app", "v4"))
	h.mustApply(put(manifest("app", "release-4", "v4")))
	h.mustApply(&pb.LogEntry{Command: &pb.LogEntry_ApplyRetention{ApplyRetention: plan}})
	wantTags(t, h.store, "app", "dev-1", "stable", "v1", "v2", "v4", "v5", "v6")
	// The next run counts v4 as the newest push: v5 goes.
	h.retain("r3")
	wantTags(t, h.store, "app", "dev-1", "stable", "v1", "v2", "v4", "v6")
}
