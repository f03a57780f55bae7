package consensus

import (
	"context"
	"slices"
	"testing"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

func setRegions(rs ...string) *pb.LogEntry {
	return &pb.LogEntry{Command: &pb.LogEntry_SetRegions{SetRegions: &pb.SetRegions{Regions: rs}}}
}

func setPolicy(prefix string, min int32, regions ...string) *pb.LogEntry {
	return &pb.LogEntry{Command: &pb.LogEntry_SetPolicy{SetPolicy: &pb.SetPolicy{
		Policy: &pb.Policy{Prefix: prefix, Regions: regions, MinRegions: min}}}}
}

func placeIn(digest string, size int64, region string) *pb.LogEntry {
	return &pb.LogEntry{Command: &pb.LogEntry_PlaceBlob{PlaceBlob: &pb.PlaceBlob{Digest: digest, Size: size, Region: region}}}
}

// wanted lists the digests region is missing.
func wanted(t *testing.T, s *Store, region string) []string {
	t.Helper()
	ws, err := s.Wanted(context.Background(), region, "", -1)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, w := range ws {
		out = append(out, w.Digest)
	}
	return out
}

func wantWanted(t *testing.T, s *Store, region string, want ...string) {
	t.Helper()
	got := wanted(t, s, region)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("wanted in %s = %v, want %v", region, got, want)
	}
}

func TestWantedFollowsPlacementsAndLinks(t *testing.T) {
	h := newTestFSM(t)
	h.mustApply(setRegions("us", "eu", "ap"))
	a, b := digestOf("a"), digestOf("b")
	h.mustApply(placeBlob("app", a, 1, "us"))
	wantWanted(t, h.store, "us")
	wantWanted(t, h.store, "eu", a)
	wantWanted(t, h.store, "ap", a)

	h.mustApply(placeIn(a, 1, "eu"))
	wantWanted(t, h.store, "eu")
	wantWanted(t, h.store, "ap", a)
	rec, err := h.store.Blob(context.Background(), a)
	if err != nil || !slices.Equal(rec.Regions, []string{"eu", "us"}) {
		t.Fatalf("placements = %v, %v; want [eu us]", rec.GetRegions(), err)
	}

	// A placement with the wrong size or of an unknown blob is refused.
	h.reject(placeIn(a, 2, "ap"), pb.ErrInvalidArgument)
	h.reject(placeIn(b, 1, "ap"), pb.ErrBlobUnknown)

	// Unlinked from its only repository: wanted nowhere.
	h.mustApply(unlinkBlob("app", a))
	wantWanted(t, h.store, "ap")
	// Mounted back: wanted again.
	h.mustApply(mountBlob("other", a, ""))
	wantWanted(t, h.store, "ap", a)
	h.checkApplied()
}

func TestPoliciesDecideWhereBlobsGo(t *testing.T) {
	h := newTestFSM(t)
	h.mustApply(setRegions("us", "eu", "ap"))
	h.mustApply(setPolicy("", 0, "us", "eu"))
	a, b := digestOf("a"), digestOf("b")
	h.mustApply(placeBlob("app", a, 1, "us"))
	h.mustApply(placeBlob("prod/app", b, 1, "us"))
	wantWanted(t, h.store, "eu", a, b)
	wantWanted(t, h.store, "ap")

	// A longer prefix widens prod/ to every region; existing blobs follow.
	h.mustApply(setPolicy("prod/", 2, "us", "eu", "ap"))
	wantWanted(t, h.store, "ap", b)
	eff, err := h.store.Policy(context.Background(), "prod/app")
	if err != nil || eff.MinRegions != 2 || len(eff.Regions) != 3 {
		t.Fatalf("prod/app policy = %+v, %v", eff, err)
	}

	// The same blob linked into a wider repository is wanted by the union.
	h.mustApply(mountBlob("prod/app", a, "app"))
	wantWanted(t, h.store, "ap", a, b)

	// Deleting the policy narrows again.
	h.mustApply(&pb.LogEntry{Command: &pb.LogEntry_DeletePolicy{DeletePolicy: &pb.DeletePolicy{Prefix: "prod/"}}})
	wantWanted(t, h.store, "ap")
	h.reject(&pb.LogEntry{Command: &pb.LogEntry_DeletePolicy{DeletePolicy: &pb.DeletePolicy{Prefix: "prod/"}}}, pb.ErrPolicyUnknown)

	// A region leaving the topology takes its rows with it.
	h.mustApply(setPolicy("", 0))
	wantWanted(t, h.store, "ap", a, b)
	h.mustApply(setRegions("us", "eu"))
	wantWanted(t, h.store, "ap")
	h.checkApplied()
}

func TestWantedKeepsItsFirstTime(t *testing.T) {
	h := newTestFSM(t)
	h.mustApply(setRegions("us", "eu"))
	a := digestOf("a")
	h.mustApply(placeBlob("app", a, 10, "us"))
	lag, err := h.store.RegionLag(context.Background(), "eu")
	if err != nil || lag.Blobs != 1 || lag.Bytes != 10 || lag.OldestUnixNano == 0 {
		t.Fatalf("lag = %+v, %v", lag, err)
	}
	first := lag.OldestUnixNano
	h.mustApply(mountBlob("other", a, ""))
	h.mustApply(setPolicy("x/", 1))
	lag, _ = h.store.RegionLag(context.Background(), "eu")
	if lag.OldestUnixNano != first {
		t.Fatalf("oldest moved from %d to %d after unrelated entries", first, lag.OldestUnixNano)
	}
	h.reject(setRegions(), pb.ErrInvalidArgument)
	h.reject(setRegions("a", "a"), pb.ErrInvalidArgument)
}
