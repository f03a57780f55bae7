package consensus

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/v2"
	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

const ociManifest = "application/vnd.oci.image.manifest.v1+json"

func testLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

// openTestStore opens a state store in dir and closes it when the test ends.
func openTestStore(tb testing.TB, dir string) *Store {
	tb.Helper()
	s, err := OpenStore(dir, testLogger())
	if err != nil {
		tb.Fatalf("OpenStore: %v", err)
	}
	tb.Cleanup(func() { s.Close() })
	return s
}

// testFSM applies entries straight through the fsm, as Raft would, with
// increasing indexes. logs keeps every applied entry for replays.
type testFSM struct {
	tb    testing.TB
	dir   string
	store *Store
	fsm   *fsm
	index uint64
	logs  []*raft.Log
}

func newTestFSM(tb testing.TB) *testFSM {
	tb.Helper()
	dir := filepath.Join(tb.TempDir(), "state")
	s := openTestStore(tb, dir)
	return &testFSM{tb: tb, dir: dir, store: s, fsm: &fsm{store: s, logger: testLogger()}}
}

// apply appends e at the next index. Version and time are filled in when
// unset, the time derived from the index so two stores fed the same entries
// stay comparable.
func (h *testFSM) apply(e *pb.LogEntry) error {
	h.tb.Helper()
	if e.Version == 0 {
		e.Version = LogVersion
	}
	if e.TimeUnixNano == 0 {
		e.TimeUnixNano = int64(h.index+1) * 1_000_000
	}
	data, err := proto.Marshal(e)
	if err != nil {
		h.tb.Fatalf("marshal: %v", err)
	}
	h.index++
	l := &raft.Log{Index: h.index, Term: 1 + h.index/100, Type: raft.LogCommand, Data: data}
	h.logs = append(h.logs, l)
	return applyResult(h.tb, h.fsm.Apply(l))
}

func applyResult(tb testing.TB, res any) error {
	tb.Helper()
	if res == nil {
		return nil
	}
	err, ok := res.(error)
	if !ok {
		tb.Fatalf("Apply returned %T (%v), want an error or nil", res, res)
	}
	var pe *pb.Error
	if !errors.As(err, &pe) {
		tb.Fatalf("Apply returned %v (%T), want a *meridianpb.Error", err, err)
	}
	return err
}

func (h *testFSM) mustApply(e *pb.LogEntry) {
	h.tb.Helper()
	if err := h.apply(e); err != nil {
		h.tb.Fatalf("apply entry %d: %v", h.index, err)
	}
}

// reject applies e, expects it to fail with want, and checks that nothing
// but the applied index changed.
func (h *testFSM) reject(e *pb.LogEntry, want *pb.Error) {
	h.tb.Helper()
	before := h.digest()
	err := h.apply(e)
	if !errors.Is(err, want) {
		h.tb.Fatalf("apply: got %v, want %v", err, want.Code)
	}
	if after := h.digest(); !bytes.Equal(before, after) {
		h.tb.Fatalf("a rejected entry changed the store")
	}
	h.checkApplied()
}

// checkApplied checks that the store recorded the last entry as applied.
func (h *testFSM) checkApplied() {
	h.tb.Helper()
	idx, term, err := h.store.AppliedIndex()
	if err != nil {
		h.tb.Fatal(err)
	}
	last := h.logs[len(h.logs)-1]
	if idx != last.Index || term != last.Term {
		h.tb.Fatalf("applied index = %d/%d, want %d/%d", idx, term, last.Index, last.Term)
	}
}

func (h *testFSM) digest() []byte {
	h.tb.Helper()
	sum, _, err := h.store.Digest()
	if err != nil {
		h.tb.Fatal(err)
	}
	return sum
}

func digestOf(content string) string {
	sum := sha256.Sum256([]byte(content))
	return "sha256:" + hex.EncodeToString(sum[:])
}

// manifest returns a PutManifest of content in repo with tags.
func manifest(repo, content string, tags ...string) *pb.PutManifest {
	return &pb.PutManifest{
		Repository: repo, Digest: digestOf(content), MediaType: ociManifest,
		Content: []byte(content), Tags: tags,
	}
}

func put(c *pb.PutManifest) *pb.LogEntry {
	return &pb.LogEntry{Command: &pb.LogEntry_PutManifest{PutManifest: c}}
}

func deleteManifest(repo, digest string) *pb.LogEntry {
	return &pb.LogEntry{Command: &pb.LogEntry_DeleteManifest{DeleteManifest: &pb.DeleteManifest{Repository: repo, Digest: digest}}}
}

func deleteTag(repo, tag string) *pb.LogEntry {
	return &pb.LogEntry{Command: &pb.LogEntry_DeleteTag{DeleteTag: &pb.DeleteTag{Repository: repo, Tag: tag}}}
}

func placeBlob(repo, digest string, size int64, region string) *pb.LogEntry {
	return &pb.LogEntry{Command: &pb.LogEntry_LinkBlob{LinkBlob: &pb.LinkBlob{
		Repository: repo, Digest: digest, Size: size, PlacedRegion: region}}}
}

func mountBlob(repo, digest, from string) *pb.LogEntry {
	return &pb.LogEntry{Command: &pb.LogEntry_LinkBlob{LinkBlob: &pb.LinkBlob{
		Repository: repo, Digest: digest, MountFrom: from}}}
}

func unlinkBlob(repo, digest string) *pb.LogEntry {
	return &pb.LogEntry{Command: &pb.LogEntry_UnlinkBlob{UnlinkBlob: &pb.UnlinkBlob{Repository: repo, Digest: digest}}}
}

func setUploadKey(k []byte) *pb.LogEntry {
	return &pb.LogEntry{Command: &pb.LogEntry_SetUploadKey{SetUploadKey: &pb.SetUploadKey{Key: k}}}
}

func wantTag(t *testing.T, s *Store, repo, tag, digest string) {
	t.Helper()
	got, err := s.Tag(context.Background(), repo, tag)
	if err != nil {
		t.Fatalf("Tag(%s:%s): %v", repo, tag, err)
	}
	if got != digest {
		t.Fatalf("Tag(%s:%s) = %s, want %s", repo, tag, got, digest)
	}
}

func wantNoTag(t *testing.T, s *Store, repo, tag string) {
	t.Helper()
	if d, err := s.Tag(context.Background(), repo, tag); !errors.Is(err, pb.ErrTagUnknown) {
		t.Fatalf("Tag(%s:%s) = %q, %v; want ErrTagUnknown", repo, tag, d, err)
	}
}

func wantTags(t *testing.T, s *Store, repo string, want ...string) {
	t.Helper()
	got, err := s.Tags(context.Background(), repo, "", -1)
	if err != nil {
		t.Fatalf("Tags(%s): %v", repo, err)
	}
	if want == nil {
		want = []string{}
	}
	if !slices.Equal(got, want) {
		t.Fatalf("Tags(%s) = %q, want %q", repo, got, want)
	}
}

func wantNoManifest(t *testing.T, s *Store, repo, digest string) {
	t.Helper()
	if _, err := s.Manifest(context.Background(), repo, digest); !errors.Is(err, pb.ErrManifestUnknown) {
		t.Fatalf("Manifest(%s@%s): %v, want ErrManifestUnknown", repo, digest, err)
	}
}

func TestPutManifestStoresManifestAndTags(t *testing.T) {
	h := newTestFSM(t)
	ctx := context.Background()
	c := manifest("library/app", `{"v":1}`, "latest", "v1")
	c.Annotations = map[string]string{"org.opencontainers.image.title": "app"}
	h.mustApply(put(c))
	h.checkApplied()
	created := int64(1_000_000) // fixed by the first entry's time

	m, err := h.store.Manifest(ctx, "library/app", c.Digest)
	if err != nil {
		t.Fatal(err)
	}
	if m.Digest != c.Digest || m.MediaType != ociManifest || string(m.Content) != `{"v":1}` ||
		m.CreatedUnixNano != created || m.Annotations["org.opencontainers.image.title"] != "app" {
		t.Fatalf("manifest record = %v", m)
	}
	wantTag(t, h.store, "library/app", "latest", c.Digest)
	wantTag(t, h.store, "library/app", "v1", c.Digest)
	wantTags(t, h.store, "library/app", "latest", "v1")
	if ok, err := h.store.RepositoryExists(ctx, "library/app"); err != nil || !ok {
		t.Fatalf("RepositoryExists = %v, %v", ok, err)
	}
	// Other repositories see nothing.
	wantNoManifest(t, h.store, "library/other", c.Digest)
	if _, err := h.store.Tags(ctx, "library/other", "", -1); !errors.Is(err, pb.ErrNameUnknown) {
		t.Fatalf("Tags of an unknown repository: %v, want ErrNameUnknown", err)
	}

	// A re-put keeps the creation time, adds tags and keeps the old ones.
	again := manifest("library/app", `{"v":1}`, "stable")
	h.mustApply(put(again))
	m, err = h.store.Manifest(ctx, "library/app", c.Digest)
	if err != nil {
		t.Fatal(err)
	}
	if m.CreatedUnixNano != created {
		t.Fatalf("re-put changed created from %d to %d", created, m.CreatedUnixNano)
	}
	wantTags(t, h.store, "library/app", "latest", "stable", "v1")

	// Untagged push by digest.
	d2 := manifest("library/app", `{"v":2}`)
	h.mustApply(put(d2))
	if _, err := h.store.Manifest(ctx, "library/app", d2.Digest); err != nil {
		t.Fatal(err)
	}
	wantTags(t, h.store, "library/app", "latest", "stable", "v1")
}

func TestTagMoveKeepsReverseIndex(t *testing.T) {
	h := newTestFSM(t)
	const repo = "team/svc"
	m1 := manifest(repo, "one", "latest", "v1")
	m2 := manifest(repo, "two", "latest")
	h.mustApply(put(m1))
	h.mustApply(put(m2)) // latest moves from m1 to m2
	wantTag(t, h.store, repo, "latest", m2.Digest)
	wantTag(t, h.store, repo, "v1", m1.Digest)

	// Deleting the old digest must take only the tags still pointing at it.
	h.mustApply(deleteManifest(repo, m1.Digest))
	wantTag(t, h.store, repo, "latest", m2.Digest)
	wantNoTag(t, h.store, repo, "v1")
	wantTags(t, h.store, repo, "latest")

	// Move it back and forth once more, then delete the target: nothing left.
	m3 := manifest(repo, "three", "latest")
	h.mustApply(put(m3))
	h.mustApply(put(manifest(repo, "two", "latest")))
	h.mustApply(deleteManifest(repo, m3.Digest))
	wantTag(t, h.store, repo, "latest", m2.Digest)
	h.mustApply(deleteManifest(repo, m2.Digest))
	wantNoTag(t, h.store, repo, "latest")
	wantTags(t, h.store, repo)
}

func TestPutManifestConditions(t *testing.T) {
	const repo = "cas/repo"
	current := manifest(repo, "current", "latest")
	next := digestOf("next")
	tests := []struct {
		name        string
		tags        []string
		ifMatch     string
		ifNoneMatch bool
		want        *pb.Error // nil: accepted
		wantTag     string    // the tag checked afterwards
	}{
		{name: "if-match current digest", tags: []string{"latest"}, ifMatch: current.Digest, wantTag: "latest"},
		{name: "if-match star on existing tag", tags: []string{"latest"}, ifMatch: "*", wantTag: "latest"},
		{name: "if-match stale digest", tags: []string{"latest"}, ifMatch: digestOf("stale"), want: pb.ErrPreconditionFailed, wantTag: "latest"},
		{name: "if-match new digest already", tags: []string{"latest"}, ifMatch: next, want: pb.ErrPreconditionFailed, wantTag: "latest"},
		{name: "if-match on missing tag", tags: []string{"new"}, ifMatch: current.Digest, want: pb.ErrPreconditionFailed, wantTag: "new"},
		{name: "if-match star on missing tag", tags: []string{"new"}, ifMatch: "*", want: pb.ErrPreconditionFailed, wantTag: "new"},
		{name: "if-none-match on existing tag", tags: []string{"latest"}, ifNoneMatch: true, want: pb.ErrPreconditionFailed, wantTag: "latest"},
		{name: "if-none-match on missing tag", tags: []string{"new"}, ifNoneMatch: true, wantTag: "new"},
		{name: "conditional with two tags", tags: []string{"latest", "new"}, ifMatch: current.Digest, want: pb.ErrInvalidArgument, wantTag: "new"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newTestFSM(t)
			h.mustApply(put(current))
			c := manifest(repo, "next", tt.tags...)
			c.IfMatch, c.IfNoneMatch = tt.ifMatch, tt.ifNoneMatch
			if tt.want != nil {
				h.reject(put(c), tt.want)
				wantNoManifest(t, h.store, repo, next)
				if tt.wantTag == "latest" {
					wantTag(t, h.store, repo, "latest", current.Digest)
				} else {
					wantNoTag(t, h.store, repo, tt.wantTag)
				}
				return
			}
			h.mustApply(put(c))
			wantTag(t, h.store, repo, tt.wantTag, next)
		})
	}
}

func TestPutManifestRequiresReferences(t *testing.T) {
	layer := digestOf("layer")
	child := manifest("img/app", "child")
	tests := []struct {
		name      string
		repo      string
		blobs     []string
		manifests []string
		want      *pb.Error
	}{
		{name: "linked blob and manifest", repo: "img/app", blobs: []string{layer}, manifests: []string{child.Digest}},
		{name: "blob never uploaded", repo: "img/app", blobs: []string{layer, digestOf("missing")}, want: pb.ErrManifestBlobUnknown},
		{name: "blob linked only in another repository", repo: "img/new", blobs: []string{layer}, want: pb.ErrManifestBlobUnknown},
		{name: "blob unlinked", repo: "img/app", blobs: []string{digestOf("unlinked")}, want: pb.ErrManifestBlobUnknown},
		{name: "manifest missing", repo: "img/app", manifests: []string{digestOf("nope")}, want: pb.ErrManifestBlobUnknown},
		{name: "manifest only in another repository", repo: "img/new", manifests: []string{child.Digest}, want: pb.ErrManifestBlobUnknown},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newTestFSM(t)
			h.mustApply(placeBlob("img/app", layer, 5, "us"))
			h.mustApply(placeBlob("img/app", digestOf("unlinked"), 8, "us"))
			h.mustApply(unlinkBlob("img/app", digestOf("unlinked")))
			h.mustApply(put(child))
			c := manifest(tt.repo, "index", "latest")
			c.Blobs, c.Manifests = tt.blobs, tt.manifests
			if tt.want == nil {
				h.mustApply(put(c))
				wantTag(t, h.store, tt.repo, "latest", c.Digest)
				return
			}
			h.reject(put(c), tt.want)
			wantNoManifest(t, h.store, tt.repo, c.Digest)
			if tt.repo == "img/new" {
				ok, err := h.store.RepositoryExists(context.Background(), tt.repo)
				if err != nil || ok {
					t.Fatalf("a rejected push created repository %s (%v, %v)", tt.repo, ok, err)
				}
			}
		})
	}
}

func TestReferrersFollowTheirManifest(t *testing.T) {
	h := newTestFSM(t)
	ctx := context.Background()
	const repo = "sig/app"
	subject := manifest(repo, "subject", "v1")
	// A referrer may arrive before its subject.
	sbom := manifest(repo, "sbom")
	sbom.Subject, sbom.ArtifactType = subject.Digest, "application/spdx+json"
	sbom.Annotations = map[string]string{"created": "now"}
	h.mustApply(put(sbom))
	h.mustApply(put(subject))
	sig := manifest(repo, "signature-bytes")
	sig.Subject, sig.ArtifactType = subject.Digest, "application/vnd.dev.cosign"
	h.mustApply(put(sig))
	// Same subject digest in another repository is a different subject.
	other := manifest("sig/other", "other-ref")
	other.Subject = subject.Digest
	h.mustApply(put(other))

	refs, err := h.store.Referrers(ctx, repo, subject.Digest)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{sbom.Digest, sig.Digest}
	slices.Sort(want)
	if got := referrerDigests(refs); !slices.Equal(got, want) {
		t.Fatalf("referrers = %q, want %q", got, want)
	}
	for _, r := range refs {
		if r.Digest == sbom.Digest {
			if r.ArtifactType != "application/spdx+json" || r.Size != int64(len("sbom")) ||
				r.MediaType != ociManifest || r.Annotations["created"] != "now" {
				t.Fatalf("sbom referrer = %v", r)
			}
		}
	}

	h.mustApply(deleteManifest(repo, sbom.Digest))
	refs, err = h.store.Referrers(ctx, repo, subject.Digest)
	if err != nil {
		t.Fatal(err)
	}
	if got := referrerDigests(refs); !slices.Equal(got, []string{sig.Digest}) {
		t.Fatalf("after delete, referrers = %q, want only %s", got, sig.Digest)
	}
	// Deleting the subject leaves its referrers listed (OCI: they stay).
	h.mustApply(deleteManifest(repo, subject.Digest))
	refs, err = h.store.Referrers(ctx, repo, subject.Digest)
	if err != nil || len(refs) != 1 {
		t.Fatalf("referrers after deleting the subject = %v, %v", refs, err)
	}
	refs, err = h.store.Referrers(ctx, repo, digestOf("nothing"))
	if err != nil || refs == nil || len(refs) != 0 {
		t.Fatalf("referrers of an unknown subject = %#v, %v; want an empty list", refs, err)
	}
}

func referrerDigests(refs []*pb.Referrer) []string {
	var ds []string
	for _, r := range refs {
		ds = append(ds, r.Digest)
	}
	return ds
}

func TestDeleteManifestRemovesEveryTag(t *testing.T) {
	h := newTestFSM(t)
	const repo = "del/app"
	m1 := manifest(repo, "m1", "a", "b", "c")
	m2 := manifest(repo, "m2", "d")
	h.mustApply(put(m1))
	h.mustApply(put(m2))
	h.mustApply(put(manifest(repo, "m1", "e"))) // a later tag on the same manifest
	h.mustApply(put(manifest("del/other", "m1", "a")))

	h.mustApply(deleteManifest(repo, m1.Digest))
	for _, tag := range []string{"a", "b", "c", "e"} {
		wantNoTag(t, h.store, repo, tag)
	}
	wantNoManifest(t, h.store, repo, m1.Digest)
	wantTags(t, h.store, repo, "d")
	// The same digest in another repository is untouched.
	wantTag(t, h.store, "del/other", "a", m1.Digest)

	h.reject(deleteManifest(repo, m1.Digest), pb.ErrManifestUnknown)
	h.reject(deleteManifest("del/none", m1.Digest), pb.ErrManifestUnknown)
}

func TestDeleteTagKeepsManifest(t *testing.T) {
	h := newTestFSM(t)
	ctx := context.Background()
	const repo = "deltag/app"
	m1 := manifest(repo, "m1", "latest", "v1")
	h.mustApply(put(m1))
	h.mustApply(deleteTag(repo, "latest"))
	wantNoTag(t, h.store, repo, "latest")
	wantTag(t, h.store, repo, "v1", m1.Digest)
	if _, err := h.store.Manifest(ctx, repo, m1.Digest); err != nil {
		t.Fatalf("DeleteTag removed the manifest: %v", err)
	}

	// The reverse index forgot the tag: re-pointing it elsewhere and deleting
	// m1 must not take it away.
	m2 := manifest(repo, "m2", "latest")
	h.mustApply(put(m2))
	h.mustApply(deleteManifest(repo, m1.Digest))
	wantTag(t, h.store, repo, "latest", m2.Digest)
	wantTags(t, h.store, repo, "latest")

	before := h.digest()
	err := h.apply(deleteTag(repo, "missing"))
	if c := pb.CodeOf(err); c != pb.Code_CODE_MANIFEST_UNKNOWN && c != pb.Code_CODE_TAG_UNKNOWN {
		t.Fatalf("deleting a missing tag: %v, want a not-found error", err)
	}
	if !bytes.Equal(before, h.digest()) {
		t.Fatal("deleting a missing tag changed the store")
	}
}

func TestLinkBlobPlacement(t *testing.T) {
	h := newTestFSM(t)
	ctx := context.Background()
	d := digestOf("blob")
	h.mustApply(placeBlob("p/app", d, 4, "us-east"))
	b, err := h.store.Blob(ctx, d)
	if err != nil {
		t.Fatal(err)
	}
	if b.Digest != d || b.Size != 4 || !slices.Equal(b.Regions, []string{"us-east"}) || b.CreatedUnixNano != 1_000_000 {
		t.Fatalf("blob record = %v", b)
	}
	if _, err := h.store.LinkedBlob(ctx, "p/app", d); err != nil {
		t.Fatalf("LinkedBlob: %v", err)
	}
	if ok, _ := h.store.RepositoryExists(ctx, "p/app"); !ok {
		t.Fatal("placing a blob did not create the repository")
	}

	// Regions accumulate sorted, without duplicates, and the creation time stays.
	h.mustApply(placeBlob("p/app", d, 4, "ap-south"))
	h.mustApply(placeBlob("p/app", d, 4, "us-east"))
	h.mustApply(placeBlob("p/other", d, 4, "eu-west"))
	b, err = h.store.Blob(ctx, d)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"ap-south", "eu-west", "us-east"}; !slices.Equal(b.Regions, want) || b.CreatedUnixNano != 1_000_000 {
		t.Fatalf("regions = %q created %d, want %q created 1000000", b.Regions, b.CreatedUnixNano, want)
	}
	if _, err := h.store.LinkedBlob(ctx, "p/other", d); err != nil {
		t.Fatalf("LinkedBlob in the second repository: %v", err)
	}

	// A different size for the same digest means the proposer's check failed.
	h.reject(placeBlob("p/third", d, 5, "eu-west"), pb.ErrInvalidArgument)
	if _, err := h.store.LinkedBlob(ctx, "p/third", d); !errors.Is(err, pb.ErrBlobUnknown) {
		t.Fatalf("a rejected placement linked the blob: %v", err)
	}
	if _, err := h.store.Blob(ctx, digestOf("never")); !errors.Is(err, pb.ErrBlobUnknown) {
		t.Fatalf("Blob(unknown): %v", err)
	}
}

func TestLinkBlobMount(t *testing.T) {
	d := digestOf("shared-layer")
	tests := []struct {
		name string
		dgst string
		from string
		want *pb.Error
	}{
		{name: "mount placed blob without from", dgst: d},
		{name: "mount from a repository that links it", dgst: d, from: "src/app"},
		{name: "mount unknown blob", dgst: digestOf("unknown"), want: pb.ErrBlobUnknown},
		{name: "mount unknown blob with from", dgst: digestOf("unknown"), from: "src/app", want: pb.ErrBlobUnknown},
		{name: "mount from a repository that does not link it", dgst: d, from: "src/empty", want: pb.ErrBlobUnknown},
		{name: "mount from a repository that unlinked it", dgst: d, from: "src/gone", want: pb.ErrBlobUnknown},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newTestFSM(t)
			ctx := context.Background()
			h.mustApply(placeBlob("src/app", d, 12, "us"))
			h.mustApply(placeBlob("src/empty", digestOf("other"), 5, "us"))
			h.mustApply(placeBlob("src/gone", d, 12, "us"))
			h.mustApply(unlinkBlob("src/gone", d))
			if tt.want != nil {
				h.reject(mountBlob("dst/app", tt.dgst, tt.from), tt.want)
				if ok, _ := h.store.RepositoryExists(ctx, "dst/app"); ok {
					t.Fatal("a rejected mount created the repository")
				}
				return
			}
			h.mustApply(mountBlob("dst/app", tt.dgst, tt.from))
			b, err := h.store.LinkedBlob(ctx, "dst/app", tt.dgst)
			if err != nil {
				t.Fatal(err)
			}
			if b.Size != 12 || !slices.Equal(b.Regions, []string{"us"}) {
				t.Fatalf("mounted blob record = %v", b)
			}
		})
	}
}

func TestUnlinkBlob(t *testing.T) {
	h := newTestFSM(t)
	ctx := context.Background()
	d := digestOf("layer")
	h.mustApply(placeBlob("u/a", d, 5, "us"))
	h.mustApply(placeBlob("u/b", d, 5, "us"))
	h.mustApply(unlinkBlob("u/a", d))
	if _, err := h.store.LinkedBlob(ctx, "u/a", d); !errors.Is(err, pb.ErrBlobUnknown) {
		t.Fatalf("LinkedBlob after unlink: %v", err)
	}
	// The bytes and other repositories' links stay.
	if _, err := h.store.LinkedBlob(ctx, "u/b", d); err != nil {
		t.Fatal(err)
	}
	if _, err := h.store.Blob(ctx, d); err != nil {
		t.Fatal(err)
	}
	// A manifest in u/a can no longer reference it.
	c := manifest("u/a", "img")
	c.Blobs = []string{d}
	h.reject(put(c), pb.ErrManifestBlobUnknown)
	h.reject(unlinkBlob("u/a", d), pb.ErrBlobUnknown)
	h.reject(unlinkBlob("u/none", d), pb.ErrBlobUnknown)
}

func TestSetUploadKeyAppliedOnce(t *testing.T) {
	h := newTestFSM(t)
	ctx := context.Background()
	h.reject(setUploadKey(bytes.Repeat([]byte{1}, 31)), pb.ErrInvalidArgument)
	if k, err := h.store.UploadKey(ctx); err != nil || k != nil {
		t.Fatalf("UploadKey after a short key = %x, %v; want none", k, err)
	}
	first := bytes.Repeat([]byte{7}, 32)
	h.mustApply(setUploadKey(first))
	// A second leader's key (or a replay of a racing one) is ignored, not an error.
	h.mustApply(setUploadKey(bytes.Repeat([]byte{9}, 64)))
	h.mustApply(setUploadKey(nil))
	k, err := h.store.UploadKey(ctx)
	if err != nil || !bytes.Equal(k, first) {
		t.Fatalf("UploadKey = %x, %v; want the first key %x", k, err, first)
	}
	h.checkApplied()
}

func TestOpenStoreRefusesUnknownLayout(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	s, err := OpenStore(dir, testLogger())
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	db, err := pebble.Open(dir, &pebble.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Set(key(tableLayout), []byte{0, 0, 0, layoutVersion + 1}, pebble.Sync); err != nil {
		t.Fatal(err)
	}
	db.Close()
	if s, err := OpenStore(dir, testLogger()); err == nil {
		s.Close()
		t.Fatal("OpenStore accepted a store written by a newer layout")
	}
}

func TestTagsPagination(t *testing.T) {
	h := newTestFSM(t)
	ctx := context.Background()
	tags := []string{"latest", "a", "ab", "a-b", "a.b", "a_b", "A", "B", "_x", "1", "10", "2", "v1.0", "v1.0-rc1", "v1"}
	h.mustApply(put(manifest("a", "m", tags...)))
	// Repositories whose names extend "a" hold tags of their own.
	h.mustApply(put(manifest("a-b", "m", "zz-a-b")))
	h.mustApply(put(manifest("a/b", "m", "zz-a-slash-b")))
	h.mustApply(put(manifest("ab", "m", "0")))
	all := slices.Clone(tags)
	slices.Sort(all)
	if !slices.Equal(all[:8], []string{"1", "10", "2", "A", "B", "_x", "a", "a-b"}) {
		t.Fatalf("bad test data order %q", all)
	}

	tests := []struct {
		after string
		limit int
		want  []string
	}{
		{"", -1, all},
		{"", 1000, all},
		{"", 3, []string{"1", "10", "2"}},
		{"10", 2, []string{"2", "A"}},
		{"a", 3, []string{"a-b", "a.b", "a_b"}},
		{"a0", -1, []string{"a_b", "ab", "latest", "v1", "v1.0", "v1.0-rc1"}},
		{"v1", -1, []string{"v1.0", "v1.0-rc1"}},
		{"v1.0", 1, []string{"v1.0-rc1"}},
		{"v1.0-rc1", -1, []string{}},
		{"zzz", 5, []string{}},
		{"", 0, []string{}},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("after=%q/limit=%d", tt.after, tt.limit), func(t *testing.T) {
			got, err := h.store.Tags(ctx, "a", tt.after, tt.limit)
			if err != nil {
				t.Fatal(err)
			}
			if got == nil || !slices.Equal(got, tt.want) {
				t.Fatalf("Tags = %#v, want %q", got, tt.want)
			}
		})
	}
	for size := 1; size <= len(all); size++ {
		if got := paginate(t, func(after string) ([]string, error) { return h.store.Tags(ctx, "a", after, size) }); !slices.Equal(got, all) {
			t.Fatalf("pages of %d = %q, want %q", size, got, all)
		}
	}
	wantTags(t, h.store, "a-b", "zz-a-b")
	wantTags(t, h.store, "a/b", "zz-a-slash-b")
}

func TestRepositoriesPagination(t *testing.T) {
	h := newTestFSM(t)
	ctx := context.Background()
	repos := []string{"b", "a/b/c", "a", "a/b", "a-b", "a.b", "ab", "a_b", "b/a", "0"}
	for i, r := range repos {
		if i%2 == 0 {
			h.mustApply(put(manifest(r, "m", "t")))
		} else {
			h.mustApply(placeBlob(r, digestOf("x"), 1, "us"))
		}
	}
	all := []string{"0", "a", "a-b", "a.b", "a/b", "a/b/c", "a_b", "ab", "b", "b/a"}
	tests := []struct {
		after string
		limit int
		want  []string
	}{
		{"", -1, all},
		{"", 2, []string{"0", "a"}},
		{"a", 3, []string{"a-b", "a.b", "a/b"}},
		{"a/b", -1, []string{"a/b/c", "a_b", "ab", "b", "b/a"}},
		{"a/a", 1, []string{"a/b"}},
		{"b", -1, []string{"b/a"}},
		{"b/a", -1, []string{}},
		{"", 0, []string{}},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("after=%q/limit=%d", tt.after, tt.limit), func(t *testing.T) {
			got, err := h.store.Repositories(ctx, tt.after, tt.limit)
			if err != nil {
				t.Fatal(err)
			}
			if got == nil || !slices.Equal(got, tt.want) {
				t.Fatalf("Repositories = %#v, want %q", got, tt.want)
			}
		})
	}
	for size := 1; size <= len(all); size++ {
		if got := paginate(t, func(after string) ([]string, error) { return h.store.Repositories(ctx, after, size) }); !slices.Equal(got, all) {
			t.Fatalf("pages of %d = %q, want %q", size, got, all)
		}
	}
}

// paginate follows pages until one comes back short.
func paginate(t *testing.T, page func(after string) ([]string, error)) []string {
	t.Helper()
	var got []string
	after := ""
	for range 1000 {
		p, err := page(after)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, p...)
		if len(p) == 0 {
			return got
		}
		after = p[len(p)-1]
	}
	t.Fatal("pagination did not end")
	return nil
}

// populate applies a mixed history: placements, mounts, manifests with tags,
// tag moves, referrers, deletes and unlinks.
func populate(h *testFSM, n int) {
	h.tb.Helper()
	h.mustApply(setUploadKey(bytes.Repeat([]byte{0x42}, 32)))
	for i := range n {
		repo := fmt.Sprintf("org%d/app", i%7)
		layer := digestOf(fmt.Sprintf("layer-%d", i))
		h.mustApply(placeBlob(repo, layer, int64(100+i), "us"))
		if i%3 == 0 {
			h.mustApply(placeBlob(repo, layer, int64(100+i), "eu"))
		}
		if i%4 == 0 {
			h.mustApply(mountBlob("mirror/all", layer, repo))
		}
		c := manifest(repo, fmt.Sprintf(`{"layer":%d}`, i), fmt.Sprintf("v%d", i), "latest")
		c.Blobs = []string{layer}
		c.Annotations = map[string]string{"i": fmt.Sprint(i), "repo": repo, "k": "v"}
		if i%5 == 4 {
			c.Subject = digestOf(fmt.Sprintf(`{"layer":%d}`, i-1))
			c.ArtifactType = "application/example"
			c.Tags = nil
		}
		h.mustApply(put(c))
		if i%11 == 10 && c.Tags != nil {
			h.mustApply(deleteTag(repo, fmt.Sprintf("v%d", i)))
		}
		if i%13 == 12 {
			h.mustApply(deleteManifest(repo, digestOf(fmt.Sprintf(`{"layer":%d}`, i-7))))
		}
		if i%17 == 16 && i%4 == 0 {
			// Only a link no manifest references may go.
			h.mustApply(unlinkBlob("mirror/all", layer))
		}
		if i%50 == 49 {
			// Collect every blob unreferenced so far (and, below, drop a
			// repository): snapshots and replays carry the lifecycle tables too.
			h.gcUntil(fmt.Sprint("run", i), h.now(), 0)
		}
	}
	if n > 100 {
		h.mustApply(deleteRepo("org6/app"))
	}
}

func TestApplyIsDeterministic(t *testing.T) {
	a, b := newTestFSM(t), newTestFSM(t)
	populate(a, 60)
	for _, l := range a.logs {
		if err := applyResult(t, b.fsm.Apply(l)); err != nil {
			t.Fatalf("entry %d: %v", l.Index, err)
		}
	}
	da, ia, _ := a.store.Digest()
	db, ib, _ := b.store.Digest()
	if !bytes.Equal(da, db) || ia != ib || ia != a.index {
		t.Fatalf("two stores fed the same log differ: %x@%d vs %x@%d", da, ia, db, ib)
	}
}

func TestApplySkipsAppliedEntries(t *testing.T) {
	h := newTestFSM(t)
	populate(h, 30)
	create := manifest("org0/app", "new", "latest")
	create.IfNoneMatch = true
	h.reject(put(create), pb.ErrPreconditionFailed)
	sum, idx, err := h.store.Digest()
	if err != nil {
		t.Fatal(err)
	}

	// Restart: reopen the store and replay the whole log as Raft would.
	if err := h.store.Close(); err != nil {
		t.Fatal(err)
	}
	s := openTestStore(t, h.dir)
	f := &fsm{store: s, logger: testLogger()}
	if got, _, _ := s.Digest(); !bytes.Equal(got, sum) {
		t.Fatal("the store changed across a reopen")
	}
	for _, l := range h.logs {
		if res := f.Apply(l); res != nil {
			t.Fatalf("replayed entry %d returned %v; a replay must be a no-op", l.Index, res)
		}
	}
	// A different entry at an already applied index is skipped too.
	data, _ := proto.Marshal(withVersion(deleteManifest("org1/app", digestOf(`{"layer":1}`))))
	if res := f.Apply(&raft.Log{Index: idx, Term: 1, Type: raft.LogCommand, Data: data}); res != nil {
		t.Fatalf("entry at the applied index returned %v", res)
	}
	got, gotIdx, err := s.Digest()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, sum) || gotIdx != idx {
		t.Fatalf("replay changed the store: index %d → %d", idx, gotIdx)
	}
	// The next new entry applies.
	res := f.Apply(&raft.Log{Index: idx + 1, Term: 9, Type: raft.LogCommand, Data: data})
	if err := applyResult(t, res); err != nil {
		t.Fatalf("first new entry after replay: %v", err)
	}
	wantNoManifest(t, s, "org1/app", digestOf(`{"layer":1}`))
	if i, term, _ := s.AppliedIndex(); i != idx+1 || term != 9 {
		t.Fatalf("applied = %d/%d, want %d/9", i, term, idx+1)
	}
}

func withVersion(e *pb.LogEntry) *pb.LogEntry {
	e.Version = LogVersion
	return e
}

// panicValue runs fn and returns what it panicked with, or nil.
func panicValue(fn func()) (v any) {
	defer func() { v = recover() }()
	fn()
	return nil
}

func TestApplyPanicsOnEntriesItCannotApply(t *testing.T) {
	marshal := func(e *pb.LogEntry) []byte {
		b, err := proto.Marshal(e)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	good := put(manifest("x/y", "m", "t"))
	good.Version = LogVersion
	v0 := proto.Clone(good).(*pb.LogEntry)
	v0.Version = 0
	v2 := proto.Clone(good).(*pb.LogEntry)
	v2.Version = LogVersion + 1
	// A command this binary does not know: oneof field 99, kept as an unknown field.
	future := protowire.AppendTag(marshal(&pb.LogEntry{Version: LogVersion}), 99, protowire.BytesType)
	future = protowire.AppendBytes(future, []byte{0x0a, 0x01, 'x'})

	tests := []struct {
		name string
		data []byte
		want string
	}{
		{"garbage", []byte{0xff, 0xff, 0xff}, "does not decode"},
		{"truncated", marshal(good)[:10], "does not decode"},
		{"version 0", marshal(v0), "version 0"},
		{"newer version", marshal(v2), fmt.Sprintf("version %d", LogVersion+1)},
		{"no command", marshal(&pb.LogEntry{Version: LogVersion, TimeUnixNano: 1}), "no command"},
		{"unknown command", future, "no command"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newTestFSM(t)
			h.mustApply(put(manifest("x/y", "first", "t")))
			before := h.digest()
			v := panicValue(func() {
				h.fsm.Apply(&raft.Log{Index: 2, Term: 1, Type: raft.LogCommand, Data: tt.data})
			})
			if v == nil {
				t.Fatal("Apply did not panic")
			}
			if msg := fmt.Sprint(v); !strings.Contains(msg, tt.want) {
				t.Fatalf("panic %q does not mention %q", msg, tt.want)
			}
			if idx, _, _ := h.store.AppliedIndex(); idx != 1 {
				t.Fatalf("applied index moved to %d on an entry that panicked", idx)
			}
			if !bytes.Equal(before, h.digest()) {
				t.Fatal("an entry that panicked changed the store")
			}
			// The read lock was released on the way out.
			if !h.store.mu.TryLock() {
				t.Fatal("the store stays locked after a panicking apply")
			}
			h.store.mu.Unlock()
		})
	}
	t.Run("closed store", func(t *testing.T) {
		h := newTestFSM(t)
		h.store.Close()
		if v := panicValue(func() { h.apply(put(manifest("x/y", "m"))) }); v == nil {
			t.Fatal("Apply on a closed store did not panic")
		}
	})
}

func TestEveryCommandHasAnApplyFunc(t *testing.T) {
	fields := commandOneof.Fields()
	if fields.Len() == 0 {
		t.Fatal("LogEntry has no command oneof fields")
	}
	names := map[protoreflect.Name]bool{}
	for i := range fields.Len() {
		fd := fields.Get(i)
		names[fd.Name()] = true
		if _, ok := commands[fd.Name()]; !ok {
			t.Errorf("command %s (field %d) has no entry in the commands table", fd.Name(), fd.Number())
			continue
		}
		// An empty command reaches its apply function and comes back as a
		// value, never a panic.
		t.Run(string(fd.Name()), func(t *testing.T) {
			h := newTestFSM(t)
			e := &pb.LogEntry{}
			e.ProtoReflect().Set(fd, protoreflect.ValueOfMessage(e.ProtoReflect().NewField(fd).Message()))
			if v := panicValue(func() { h.apply(e) }); v != nil {
				t.Fatalf("empty %s panicked: %v", fd.Name(), v)
			}
			h.checkApplied()
		})
	}
	for name := range commands {
		if !names[name] {
			t.Errorf("commands table has %s, which is not a LogEntry command", name)
		}
	}
}
