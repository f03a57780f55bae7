package chaos

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/meridian-registry/meridian/replication"
)

// fakeStore is a region's store: blob bytes by digest, or an error for
// every read.
type fakeStore struct {
	blobs map[string][]byte
	err   error
}

func (f *fakeStore) Open(_ context.Context, dgst digest.Digest, offset int64) (io.ReadCloser, error) {
	if f.err != nil {
		return nil, f.err
	}
	b, ok := f.blobs[string(dgst)]
	if !ok {
		return nil, fmt.Errorf("%w: %s", replication.ErrBlobNotFound, dgst)
	}
	return io.NopCloser(bytes.NewReader(b[offset:])), nil
}

// storeWorld is a history of pushes of real bytes and the stores of two
// regions holding all of them.
type storeWorld struct {
	h      testHist
	bytes  map[string][]byte // by digest
	stores map[string]*fakeStore
}

func newStoreWorld() *storeWorld {
	w := &storeWorld{bytes: map[string][]byte{}, stores: map[string]*fakeStore{}}
	for _, r := range testRegions {
		w.stores[r] = &fakeStore{blobs: map[string][]byte{}}
	}
	return w
}

// push records an acknowledged push of blobs named by contents, held by
// every region.
func (w *storeWorld) push(kind OpKind, repo, tag string, at int, contents ...string) Op {
	op := hPush(0, repo, tag, testDigest(repo+":"+tag), at, at+10, OutcomeOK)
	op.Kind = kind
	for _, c := range contents {
		b := []byte(c)
		d := sha256Digest(b)
		w.bytes[d] = b
		op.Blobs = append(op.Blobs, Blob{Digest: d, Size: int64(len(b))})
		for _, s := range w.stores {
			s.blobs[d] = b
		}
	}
	return w.h.add(op)
}

func (w *storeWorld) check(regionsOf func(string) []string, drain GCDrain) CheckResult {
	stores := map[string]blobStore{}
	for r, s := range w.stores {
		stores[r] = s
	}
	return CheckLiveManifests(context.Background(), w.h.sorted(), stores, regionsOf, drain)
}

var drained = GCDrain{Run: "run test: 3 candidates", Drained: true, Took: time.Second}

func everyRegion(string) []string { return testRegions }

// TestCheckLiveManifests: the check passes on stores that hold every blob
// of every live manifest in every region its policy names, whatever they
// lack besides, and fails, naming the region, the blob and the pushes,
// when one copy is missing or holds other bytes; an unreadable store or a
// collection whose removals were not seen to finish leaves it undecided.
func TestCheckLiveManifests(t *testing.T) {
	const app, mnt = "chaos/app0", "chaos/mount1"
	world := func() (*storeWorld, map[string]Op) {
		w := newStoreWorld()
		ops := map[string]Op{
			"v0":    w.push(OpPush, app, "v0", 0, "config-0", "layer-a", "shared"),
			"v1":    w.push(OpPush, app, "v1", 100, "config-1", "layer-b", "shared"),
			"gone":  w.push(OpPush, app, "gone", 200, "config-2", "layer-gone"),
			"mount": w.push(OpMount, mnt, "v0", 300, "config-0", "layer-a", "shared"),
		}
		w.h.add(hDelete(app, ops["gone"].Digest, 400, 450, OutcomeOK))
		// Neither acknowledged nor live: their blobs may be gone.
		w.h.add(hPush(0, app, "maybe", testDigest("maybe"), 500, 600, OutcomeUnknown, sha256Digest([]byte("layer-maybe"))))
		w.h.add(hPush(0, app, "refused", "", 500, 600, OutcomeFail, sha256Digest([]byte("layer-refused"))))
		return w, ops
	}
	digestOf := func(s string) string { return sha256Digest([]byte(s)) }

	t.Run("complete", func(t *testing.T) {
		w, _ := world()
		for _, s := range w.stores {
			// What a collection took, and what was never acknowledged.
			delete(s.blobs, digestOf("config-2"))
			delete(s.blobs, digestOf("layer-gone"))
		}
		r := w.check(everyRegion, drained)
		wantStatus(t, r, CheckPass)
		// Distinct blobs config-0, config-1, layer-a, layer-b, shared: in
		// two regions each.
		if r.Checked != 10 || !strings.Contains(r.Detail, "3 live manifests (1 deleted left out)") || !strings.Contains(r.Detail, drained.Run) {
			t.Fatalf("checked %d: %s", r.Checked, r.Detail)
		}
	})

	t.Run("a blob missing in one region", func(t *testing.T) {
		w, ops := world()
		delete(w.stores["eu-west"].blobs, digestOf("shared"))
		r := w.check(everyRegion, drained)
		wantStatus(t, r, CheckFail)
		v := r.Violations[0]
		if len(r.Violations) != 1 || !strings.Contains(v.Message, "region eu-west: blob "+digestOf("shared")) ||
			!strings.Contains(v.Message, "of 3 live manifests") || !strings.Contains(v.Message, "is missing") {
			t.Fatalf("violations:\n%s", violationText(r))
		}
		for _, k := range []string{"v0", "v1", "mount"} {
			if !hasOp(v, ops[k].ID) {
				t.Errorf("violation does not show push %s:\n%s", k, violationText(r))
			}
		}
	})

	t.Run("wrong bytes", func(t *testing.T) {
		w, _ := world()
		w.stores["us-east"].blobs[digestOf("layer-b")] = []byte("layer-B")
		r := w.check(everyRegion, drained)
		wantStatus(t, r, CheckFail)
		if len(r.Violations) != 1 || !strings.Contains(r.Violations[0].Message, "region us-east") ||
			!strings.Contains(r.Violations[0].Message, "hashing to "+digestOf("layer-B")) {
			t.Fatalf("violations:\n%s", violationText(r))
		}
	})

	t.Run("a blob missing where the policy does not place it", func(t *testing.T) {
		w, _ := world()
		delete(w.stores["eu-west"].blobs, digestOf("layer-b"))
		r := w.check(func(repo string) []string { return []string{"us-east"} }, drained)
		wantStatus(t, r, CheckPass)
		if r.Checked != 5 {
			t.Fatalf("checked %d copies, want 5 (one region)", r.Checked)
		}
	})

	t.Run("unreadable store", func(t *testing.T) {
		w, _ := world()
		w.stores["us-east"].err = errors.New("connection refused")
		r := w.check(everyRegion, drained)
		wantStatus(t, r, CheckUnknown)
		if r.Checked != 5 || !strings.Contains(r.Detail, "connection refused") {
			t.Fatalf("checked %d: %s", r.Checked, r.Detail)
		}
	})

	t.Run("removals not seen to finish", func(t *testing.T) {
		w, _ := world()
		r := w.check(everyRegion, GCDrain{Run: "run x", Pending: map[string]int64{"us-east": 2}, Took: time.Minute, Err: "context deadline exceeded"})
		wantStatus(t, r, CheckUnknown)
		if !strings.Contains(r.Detail, "us-east 2 blobs") {
			t.Fatalf("detail %q", r.Detail)
		}
		delete(w.stores["us-east"].blobs, digestOf("layer-a"))
		wantStatus(t, w.check(everyRegion, GCDrain{Run: "run x"}), CheckFail) // a violation still decides
	})

	t.Run("nothing live", func(t *testing.T) {
		r := CheckLiveManifests(context.Background(), nil, nil, everyRegion, drained)
		if r.Checked != 0 || len(verdict([]CheckResult{r}, nil, convergedState())) == 0 {
			t.Fatalf("an empty check passed the run: %+v", r)
		}
	})
}

// TestCheckLiveManifestsFilesystem: the check reads a store the way the
// registry lays it out, through its own driver, and sees a live blob
// deleted from it.
func TestCheckLiveManifestsFilesystem(t *testing.T) {
	ctx := context.Background()
	stores := map[string]blobStore{}
	drivers := map[string]*replication.Filesystem{}
	for _, r := range testRegions {
		d, err := replication.NewFilesystem(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		drivers[r], stores[r] = d, d
	}
	var h testHist
	op := hPush(0, "chaos/app0", "v0", testDigest("m"), 0, 10, OutcomeOK)
	for _, content := range []string{"config", strings.Repeat("layer ", 10000)} {
		b := Blob{Digest: sha256Digest([]byte(content)), Size: int64(len(content))}
		op.Blobs = append(op.Blobs, b)
		for _, d := range drivers {
			id, err := d.StartUpload(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := d.WriteUpload(ctx, id, 0, strings.NewReader(content)); err != nil {
				t.Fatal(err)
			}
			if err := d.CommitUpload(ctx, id, b.Size, digest.Digest(b.Digest)); err != nil {
				t.Fatal(err)
			}
		}
	}
	h.add(op)
	r := CheckLiveManifests(ctx, h.sorted(), stores, everyRegion, drained)
	wantStatus(t, r, CheckPass)
	if r.Checked != 4 {
		t.Fatalf("checked %d copies, want 4", r.Checked)
	}

	if err := drivers["us-east"].Delete(ctx, digest.Digest(op.Blobs[1].Digest)); err != nil {
		t.Fatal(err)
	}
	r = CheckLiveManifests(ctx, h.sorted(), stores, everyRegion, drained)
	wantStatus(t, r, CheckFail)
	if len(r.Violations) != 1 || !strings.Contains(r.Violations[0].Message, "region us-east: blob "+op.Blobs[1].Digest) {
		t.Fatalf("violations:\n%s", violationText(r))
	}
}

// TestPolicyRegions: the harness's policies place every repository, the
// critical ones too, in every region; a longer prefix that names regions
// wins.
func TestPolicyRegions(t *testing.T) {
	all := []string{"ap-south", "eu-west", "us-east"}
	policies := append(replicationPolicies(all), yamlPolicy{Prefix: "eu/", Regions: []string{"eu-west"}}, yamlPolicy{Prefix: "eu/min/", MinRegions: 1})
	for repo, want := range map[string][]string{
		"chaos/app0":           all,
		CriticalPrefix + "app": all,
		"eu/app":               {"eu-west"},
		"eu/min/app":           {"eu-west"},
		"europe/app":           all,
	} {
		if got := policyRegions(policies, all, repo); !slices.Equal(got, want) {
			t.Errorf("%s: %v, want %v", repo, got, want)
		}
	}
}

// TestGCDrainText: the check's detail says how the last collection ended.
func TestGCDrainText(t *testing.T) {
	for _, c := range []struct {
		d    GCDrain
		want string
	}{
		{drained, "every region's removals were done in 1s"},
		{GCDrain{Err: "no leader"}, "no last gc run succeeded: no leader"},
		{GCDrain{Run: "run x", Pending: map[string]int64{"us-east": 0, "eu-west": 3}, Err: "deadline"}, "still pending after 0s: eu-west 3 blobs (deadline)"},
	} {
		if got := c.d.String(); !strings.Contains(got, c.want) {
			t.Errorf("%q, want %q in it", got, c.want)
		}
	}
}
