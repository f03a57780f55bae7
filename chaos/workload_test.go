package chaos

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeRegistry keeps blob links and manifests per repository and refuses
// what Meridian refuses: a manifest whose blobs the repository does not
// link (400), a blob delete while a manifest of the repository uses the
// blob (403).
type fakeRegistry struct {
	mu        sync.Mutex
	links     map[string]map[string]bool     // repo → blob digests
	manifests map[string]map[string][]string // repo → manifest digest → blob digests
}

func newFakeRegistry() *fakeRegistry {
	return &fakeRegistry{links: map[string]map[string]bool{}, manifests: map[string]map[string][]string{}}
}

func (f *fakeRegistry) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	path := strings.TrimPrefix(r.URL.Path, "/v2/")
	f.mu.Lock()
	defer f.mu.Unlock()
	if repo, _, ok := strings.Cut(path, "/blobs/uploads/"); ok && r.Method == http.MethodPost {
		if f.links[repo] == nil {
			f.links[repo] = map[string]bool{}
		}
		f.links[repo][r.URL.Query().Get("digest")] = true
		w.WriteHeader(http.StatusCreated)
		return
	}
	if repo, dgst, ok := strings.Cut(path, "/blobs/"); ok && r.Method == http.MethodDelete {
		for _, blobs := range f.manifests[repo] {
			if slices.Contains(blobs, dgst) {
				http.Error(w, `{"errors":[{"code":"DENIED"}]}`, http.StatusForbidden)
				return
			}
		}
		if !f.links[repo][dgst] {
			http.Error(w, `{"errors":[{"code":"BLOB_UNKNOWN"}]}`, http.StatusNotFound)
			return
		}
		delete(f.links[repo], dgst)
		w.WriteHeader(http.StatusAccepted)
		return
	}
	repo, ref, ok := strings.Cut(path, "/manifests/")
	if !ok {
		http.Error(w, "not here", http.StatusNotFound)
		return
	}
	switch r.Method {
	case http.MethodPut:
		body, _ := io.ReadAll(r.Body)
		var m struct {
			Config struct{ Digest string }
			Layers []struct{ Digest string }
		}
		json.Unmarshal(body, &m)
		blobs := []string{m.Config.Digest}
		for _, l := range m.Layers {
			blobs = append(blobs, l.Digest)
		}
		for _, b := range blobs {
			if !f.links[repo][b] {
				http.Error(w, `{"errors":[{"code":"MANIFEST_BLOB_UNKNOWN"}]}`, http.StatusBadRequest)
				return
			}
		}
		if f.manifests[repo] == nil {
			f.manifests[repo] = map[string][]string{}
		}
		d := sha256Digest(body)
		f.manifests[repo][d] = blobs
		w.Header().Set("Docker-Content-Digest", d)
		w.WriteHeader(http.StatusCreated)
	case http.MethodDelete:
		if _, ok := f.manifests[repo][ref]; !ok {
			http.Error(w, `{"errors":[{"code":"MANIFEST_UNKNOWN"}]}`, http.StatusNotFound)
			return
		}
		delete(f.manifests[repo], ref)
		w.WriteHeader(http.StatusAccepted)
	default:
		http.Error(w, "not here", http.StatusMethodNotAllowed)
	}
}

// TestDeleteWholeImages: pushes draw some layers from the shared pool, so
// images share blobs; a whole-image delete sends the manifest's delete,
// then one for each of its blobs, each recorded, takes the image out of
// what is pulled and verified, and leaves every other image's blobs
// linked (the registry refuses to unlink those the workload asks for).
func TestDeleteWholeImages(t *testing.T) {
	reg := newFakeRegistry()
	srv := httptest.NewServer(reg)
	defer srv.Close()
	h := NewHistory()
	w := NewWorkload(WorkloadConfig{Seed: 7, Gateways: []Endpoint{{ID: "gw", URL: srv.URL, ReadConsistency: "strong"}},
		SharedLayers: 2, RequestTimeout: 5 * time.Second}, h)
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(7, 8))
	const repo = "chaos/app0"
	uses := map[string]int{}
	for k := range 20 {
		img, err := w.pushImage(ctx, 0, nil, rng, repo, fmt.Sprintf("v%d", k), 3, false)
		if err != nil {
			t.Fatalf("push %d: %v", k, err)
		}
		for _, b := range img.blobs {
			uses[b.Digest]++
		}
		w.addAcked(img)
	}
	shared := 0
	for _, n := range uses {
		if n > 1 {
			shared++
		}
	}
	if shared == 0 {
		t.Fatal("no blob is shared between the images")
	}

	statuses := map[int]int{}
	for len(w.acked) >= 10 {
		w.deleteOne(ctx, 5, rng)
	}
	ops := h.Ops()
	deleted := 0
	for i, op := range ops {
		if op.Kind != OpDelete {
			continue
		}
		deleted++
		if op.Outcome != OutcomeOK {
			t.Fatalf("manifest delete %+v", op)
		}
		var blobs []Blob
		for _, p := range ops {
			if p.Kind == OpPush && p.Digest == op.Digest {
				blobs = p.Blobs
			}
		}
		for j, b := range blobs {
			d := ops[i+1+j]
			if d.Kind != OpDeleteBlob || d.Repo != repo || d.Digest != b.Digest || (d.Status == 403) != (d.Outcome == OutcomeFail) {
				t.Fatalf("after deleting %s, op %+v, want the delete of blob %s", op.Digest, d, b.Digest)
			}
			statuses[d.Status]++
		}
	}
	if deleted != 11 || statuses[http.StatusAccepted] == 0 || statuses[http.StatusForbidden] == 0 {
		t.Fatalf("%d images deleted, blob deletes answered %v; want some of each of 202 and 403", deleted, statuses)
	}
	// What is left is what Verify expects, and the registry still links
	// all of it.
	for _, img := range w.acked {
		if w.deleted[img.repo+"@"+img.digest] {
			t.Fatalf("deleted image %s still in the pull pool", img.digest)
		}
		for _, b := range img.blobs {
			if !reg.links[repo][b.Digest] {
				t.Fatalf("blob %s of live image %s unlinked", b.Digest, img.tag)
			}
		}
	}
}
