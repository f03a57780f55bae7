package node

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
)

// A multi-layer image pushed with a real client comes back identical by tag
// and by digest: manifest, config and every layer's bytes.
func TestPushPullImage(t *testing.T) {
	n := startNode(t)
	img, err := random.Image(64<<10, 4)
	if err != nil {
		t.Fatal(err)
	}
	tag := n.ref("library/app:v1")
	if err := remote.Write(tag, img); err != nil {
		t.Fatalf("push: %v", err)
	}
	checkImage(t, tag, img)
	byDigest := tag.Context().Digest(mustDigest(t, img).String())
	checkImage(t, byDigest, img)

	// The manifest bytes served are the bytes pushed.
	desc, err := remote.Get(tag)
	if err != nil {
		t.Fatalf("get manifest: %v", err)
	}
	raw, _ := img.RawManifest()
	if !bytes.Equal(desc.Manifest, raw) {
		t.Error("manifest bytes differ from what was pushed")
	}
	if mt, _ := img.MediaType(); desc.MediaType != mt {
		t.Errorf("manifest media type %s, want %s", desc.MediaType, mt)
	}
}

// An index of two platforms is stored with its children: the index comes
// back identical, each child resolves by digest, and a platform-specific pull
// of the tag picks the right child.
func TestPushPullIndex(t *testing.T) {
	n := startNode(t)
	amd64, err := random.Image(16<<10, 2)
	if err != nil {
		t.Fatal(err)
	}
	arm64, err := random.Image(16<<10, 3)
	if err != nil {
		t.Fatal(err)
	}
	platforms := map[v1.Hash]v1.Platform{
		mustDigest(t, amd64): {OS: "linux", Architecture: "amd64"},
		mustDigest(t, arm64): {OS: "linux", Architecture: "arm64", Variant: "v8"},
	}
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: amd64, Descriptor: v1.Descriptor{Platform: ptr(platforms[mustDigest(t, amd64)])}},
		mutate.IndexAddendum{Add: arm64, Descriptor: v1.Descriptor{Platform: ptr(platforms[mustDigest(t, arm64)])}},
	)
	tag := n.ref("multi/app:latest")
	if err := remote.WriteIndex(tag, idx); err != nil {
		t.Fatalf("push index: %v", err)
	}

	got, err := remote.Index(tag)
	if err != nil {
		t.Fatalf("pull index: %v", err)
	}
	mustEqualDigest(t, "index", idx.Digest, got.Digest)
	gotRaw, err := got.RawManifest()
	if err != nil {
		t.Fatal(err)
	}
	wantRaw, _ := idx.RawManifest()
	if !bytes.Equal(gotRaw, wantRaw) {
		t.Error("index bytes differ from what was pushed")
	}
	im, err := got.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 2 {
		t.Fatalf("index lists %d manifests, want 2", len(im.Manifests))
	}
	for _, d := range im.Manifests {
		want, ok := platforms[d.Digest]
		if !ok || d.Platform == nil || !d.Platform.Equals(want) {
			t.Errorf("child %s has platform %v, want %v", d.Digest, d.Platform, want)
		}
	}
	checkImage(t, tag.Context().Digest(mustDigest(t, amd64).String()), amd64)
	checkImage(t, tag.Context().Digest(mustDigest(t, arm64).String()), arm64)
	checkImage(t, tag, arm64, remote.WithPlatform(v1.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}))
}

// rawManifest is a manifest pushed as given (remote.Taggable).
type rawManifest struct {
	body      []byte
	mediaType types.MediaType
}

func (m rawManifest) RawManifest() ([]byte, error)        { return m.body, nil }
func (m rawManifest) MediaType() (types.MediaType, error) { return m.mediaType, nil }

// artifactManifest builds an OCI artifact manifest (empty config, one layer)
// that refers to subject, and pushes its blobs to repo.
func artifactManifest(t *testing.T, repo name.Repository, artifactType, payload string, subject v1.Descriptor) rawManifest {
	t.Helper()
	cfg := static.NewLayer([]byte("{}"), "application/vnd.oci.empty.v1+json")
	layer := static.NewLayer([]byte(payload), types.MediaType(artifactType+".payload"))
	for _, l := range []v1.Layer{cfg, layer} {
		if err := remote.WriteLayer(repo, l); err != nil {
			t.Fatalf("push artifact blob: %v", err)
		}
	}
	desc := func(l v1.Layer) v1.Descriptor {
		d, err := partial.Descriptor(l)
		if err != nil {
			t.Fatal(err)
		}
		return *d
	}
	body, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     types.OCIManifestSchema1,
		"artifactType":  artifactType,
		"config":        desc(cfg),
		"layers":        []v1.Descriptor{desc(layer)},
		"subject":       subject,
		"annotations":   map[string]string{"org.example.kind": artifactType},
	})
	if err != nil {
		t.Fatal(err)
	}
	return rawManifest{body: body, mediaType: types.OCIManifestSchema1}
}

// Artifacts pushed with a subject are listed by the referrers API, with their
// artifactType and annotations, and the artifactType filter narrows the list.
func TestReferrers(t *testing.T) {
	n := startNode(t)
	repo := n.repo("art/app")
	subjectImg, err := random.Image(1024, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(repo.Tag("v1"), subjectImg); err != nil {
		t.Fatalf("push subject: %v", err)
	}
	subject, err := partial.Descriptor(subjectImg)
	if err != nil {
		t.Fatal(err)
	}
	subjectRef := repo.Digest(subject.Digest.String())

	const sbomType, sigType = "application/vnd.example.sbom.v1+json", "application/vnd.example.signature.v1"
	pushed := map[v1.Hash]string{}
	for _, typ := range []string{sbomType, sigType} {
		m := artifactManifest(t, repo, typ, "payload of "+typ, *subject)
		d, _, err := v1.SHA256(bytes.NewReader(m.body))
		if err != nil {
			t.Fatal(err)
		}
		if err := remote.Put(repo.Digest(d.String()), m); err != nil {
			t.Fatalf("push %s artifact: %v", typ, err)
		}
		pushed[d] = typ
	}

	idx, err := remote.Referrers(subjectRef)
	if err != nil {
		t.Fatalf("referrers: %v", err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 2 {
		t.Fatalf("referrers lists %d manifests, want 2: %+v", len(im.Manifests), im.Manifests)
	}
	for _, d := range im.Manifests {
		typ, ok := pushed[d.Digest]
		if !ok {
			t.Errorf("unexpected referrer %s", d.Digest)
			continue
		}
		if d.ArtifactType != typ || d.MediaType != types.OCIManifestSchema1 || d.Annotations["org.example.kind"] != typ {
			t.Errorf("referrer %s: %+v, want artifactType %s with its annotation", d.Digest, d, typ)
		}
	}

	filtered, err := remote.Referrers(subjectRef, remote.WithFilter("artifactType", sbomType))
	if err != nil {
		t.Fatalf("filtered referrers: %v", err)
	}
	fm, err := filtered.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(fm.Manifests) != 1 || fm.Manifests[0].ArtifactType != sbomType {
		t.Errorf("filtered referrers: %+v, want only the %s artifact", fm.Manifests, sbomType)
	}

	// go-containerregistry filters on the client too, so check the server's
	// own filtering with a raw request.
	resp, body := n.do("GET", "/v2/art/app/referrers/"+subject.Digest.String()+"?artifactType="+url.QueryEscape(sigType), nil, nil)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("raw filtered referrers: %s %s", resp.Status, body)
	}
	if got := resp.Header.Get("OCI-Filters-Applied"); got != "artifactType" {
		t.Errorf("OCI-Filters-Applied = %q, want artifactType", got)
	}
	var raw v1.IndexManifest
	if err := json.Unmarshal(body, &raw); err != nil {
		t.Fatal(err)
	}
	if len(raw.Manifests) != 1 || raw.Manifests[0].ArtifactType != sigType {
		t.Errorf("server-filtered referrers: %+v, want only the %s artifact", raw.Manifests, sigType)
	}

	// A subject may be pushed after its referrers: the registry answers with
	// OCI-Subject and lists the referrer at once.
	absent := v1.Descriptor{MediaType: types.OCIManifestSchema1, Size: 123, Digest: v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("ab", 32)}}
	m := artifactManifest(t, repo, sigType, "early signature", absent)
	resp, body = n.do("PUT", "/v2/art/app/manifests/early", m.body, http.Header{"Content-Type": {string(m.mediaType)}})
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("push referrer of an absent subject: %s %s", resp.Status, body)
	}
	if got := resp.Header.Get("OCI-Subject"); got != absent.Digest.String() {
		t.Errorf("OCI-Subject = %q, want %s", got, absent.Digest)
	}
	early, err := remote.Referrers(repo.Digest(absent.Digest.String()))
	if err != nil {
		t.Fatalf("referrers of an absent subject: %v", err)
	}
	if em, _ := early.IndexManifest(); len(em.Manifests) != 1 {
		t.Errorf("referrers of an absent subject: %+v, want one", em.Manifests)
	}
}

// requestLog records the blob-upload requests a client makes.
type requestLog struct {
	next    http.RoundTripper
	patches atomic.Int32
	puts    atomic.Int32
	mounted atomic.Int32
}

func (l *requestLog) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := l.next.RoundTrip(r)
	if err != nil {
		return resp, err
	}
	switch {
	case r.Method == http.MethodPatch:
		l.patches.Add(1)
	case r.Method == http.MethodPut && strings.Contains(r.URL.Path, "/blobs/uploads/"):
		l.puts.Add(1)
	case r.Method == http.MethodPost && r.URL.Query().Get("mount") != "" && resp.StatusCode == http.StatusCreated:
		l.mounted.Add(1)
	}
	return resp, nil
}

// A blob in one repository can be mounted into another without sending its
// bytes; a mount that cannot be honoured opens an upload session instead.
func TestCrossRepositoryMount(t *testing.T) {
	n := startNode(t)
	img, err := random.Image(32<<10, 3)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(n.ref("mount/a:v1"), img); err != nil {
		t.Fatalf("push: %v", err)
	}
	layers, _ := img.Layers()
	first := mustDigest(t, layers[0]).String()
	size, _ := layers[0].Size()

	if resp, _ := n.do("HEAD", "/v2/mount/b/blobs/"+first, nil, nil); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("HEAD before mount: %s, want 404", resp.Status)
	}
	resp, body := n.do("POST", "/v2/mount/b/blobs/uploads/?mount="+first+"&from=mount/a", nil, nil)
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("mount: %s %s, want 201", resp.Status, body)
	}
	if loc := resp.Header.Get("Location"); loc != "/v2/mount/b/blobs/"+first {
		t.Errorf("mount Location = %q", loc)
	}
	if got := resp.Header.Get("Docker-Content-Digest"); got != first {
		t.Errorf("mount Docker-Content-Digest = %q, want %s", got, first)
	}
	resp, _ = n.do("HEAD", "/v2/mount/b/blobs/"+first, nil, nil)
	if resp.StatusCode != http.StatusOK || resp.ContentLength != size {
		t.Fatalf("HEAD after mount: %s, %d bytes; want 200, %d bytes", resp.Status, resp.ContentLength, size)
	}

	// From a repository that does not hold the blob: no mount, a session.
	second := mustDigest(t, layers[1]).String()
	resp, body = n.do("POST", "/v2/mount/c/blobs/uploads/?mount="+second+"&from=mount/b", nil, nil)
	if resp.StatusCode != http.StatusAccepted || resp.Header.Get("Location") == "" {
		t.Fatalf("mount from a repository without the blob: %s %s, want 202 with a Location", resp.Status, body)
	}
	if resp, _ := n.do("HEAD", "/v2/mount/c/blobs/"+second, nil, nil); resp.StatusCode != http.StatusNotFound {
		t.Errorf("HEAD after a refused mount: %s, want 404", resp.Status)
	}

	// A real client copying the image between repositories mounts every
	// remaining blob and uploads nothing.
	src, err := remote.Image(n.ref("mount/a:v1"))
	if err != nil {
		t.Fatal(err)
	}
	rec := &requestLog{next: http.DefaultTransport}
	if err := remote.Write(n.ref("mount/b:v1"), src, remote.WithTransport(rec)); err != nil {
		t.Fatalf("copy: %v", err)
	}
	if p, u := rec.patches.Load(), rec.puts.Load(); p != 0 || u != 0 {
		t.Errorf("copy between repositories sent %d PATCH and %d upload PUT requests, want none", p, u)
	}
	if m := rec.mounted.Load(); m != 3 { // two layers and the config
		t.Errorf("copy mounted %d blobs, want 3", m)
	}
	checkImage(t, n.ref("mount/b:v1"), img)
}

// Tag updates are compare-and-swap: If-None-Match: * creates only, If-Match
// moves a tag only from the digest it names, and reads carry the ETag.
func TestTagCompareAndSwap(t *testing.T) {
	n := startNode(t)
	var bodies [2][]byte
	var digests [2]string
	var mediaType string
	for i := range bodies {
		img, err := random.Image(512, 1)
		if err != nil {
			t.Fatal(err)
		}
		d := mustDigest(t, img).String()
		if err := remote.Write(n.ref("cas/app@"+d), img); err != nil {
			t.Fatalf("push: %v", err)
		}
		bodies[i], _ = img.RawManifest()
		digests[i] = d
		mt, _ := img.MediaType()
		mediaType = string(mt)
	}
	put := func(body []byte, cond, value string) (int, string) {
		h := http.Header{"Content-Type": {mediaType}}
		if cond != "" {
			h.Set(cond, value)
		}
		resp, b := n.do("PUT", "/v2/cas/app/manifests/stable", body, h)
		return resp.StatusCode, string(b)
	}
	etag := func() string {
		t.Helper()
		resp, b := n.do("GET", "/v2/cas/app/manifests/stable", nil, http.Header{"Accept": {mediaType}})
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET tag: %s %s", resp.Status, b)
		}
		if resp.Header.Get("Docker-Content-Digest") != strings.Trim(resp.Header.Get("ETag"), `"`) {
			t.Errorf("ETag %s and Docker-Content-Digest %s disagree", resp.Header.Get("ETag"), resp.Header.Get("Docker-Content-Digest"))
		}
		return resp.Header.Get("ETag")
	}
	quoted := func(d string) string { return `"` + d + `"` }

	steps := []struct {
		name        string
		body        []byte
		cond, value string
		wantStatus  int
		wantETag    string
	}{
		{"create with If-None-Match", bodies[0], "If-None-Match", "*", http.StatusCreated, quoted(digests[0])},
		{"create again with If-None-Match", bodies[1], "If-None-Match", "*", http.StatusPreconditionFailed, quoted(digests[0])},
		{"move with the current digest", bodies[1], "If-Match", quoted(digests[0]), http.StatusCreated, quoted(digests[1])},
		{"move with a stale digest", bodies[0], "If-Match", quoted(digests[0]), http.StatusPreconditionFailed, quoted(digests[1])},
		{"move back with the current digest", bodies[0], "If-Match", quoted(digests[1]), http.StatusCreated, quoted(digests[0])},
		{"unconditional move", bodies[1], "", "", http.StatusCreated, quoted(digests[1])},
	}
	for _, s := range steps {
		status, body := put(s.body, s.cond, s.value)
		if status != s.wantStatus {
			t.Fatalf("%s: status %d %s, want %d", s.name, status, body, s.wantStatus)
		}
		if status == http.StatusPreconditionFailed && !strings.Contains(body, `"errors"`) {
			t.Errorf("%s: 412 without an error envelope: %s", s.name, body)
		}
		if got := etag(); got != s.wantETag {
			t.Fatalf("%s: ETag %s, want %s", s.name, got, s.wantETag)
		}
	}

	resp, _ := n.do("HEAD", "/v2/cas/app/manifests/stable", nil, http.Header{"Accept": {mediaType}})
	if got := resp.Header.Get("ETag"); got != quoted(digests[1]) {
		t.Errorf("HEAD ETag %s, want %s", got, quoted(digests[1]))
	}
	resp, _ = n.do("GET", "/v2/cas/app/manifests/stable", nil, http.Header{"If-None-Match": {quoted(digests[1])}})
	if resp.StatusCode != http.StatusNotModified {
		t.Errorf("GET with a matching If-None-Match: %s, want 304", resp.Status)
	}
}

// A blob sent in many small chunks with Content-Range (and one misplaced
// chunk, refused with the session's range) arrives intact.
func TestChunkedUpload(t *testing.T) {
	n := startNode(t)
	rng := rand.New(rand.NewPCG(1, 2))
	sizes := []int{1, 64 << 10}
	for len(sizes) < 200 {
		sizes = append(sizes, 1+rng.IntN(32<<10))
	}
	total := 0
	for _, s := range sizes {
		total += s
	}
	blob := make([]byte, total)
	for i := range blob {
		blob[i] = byte(rng.Uint32())
	}
	want := digest.FromBytes(blob)

	resp, body := n.do("POST", "/v2/chunked/blob/blobs/uploads/", nil, nil)
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("start upload: %s %s", resp.Status, body)
	}
	loc, uuid := resp.Header.Get("Location"), resp.Header.Get("Docker-Upload-UUID")
	offset := 0
	for i, size := range sizes {
		chunk := blob[offset : offset+size]
		if i == 100 {
			// A chunk that does not continue the upload is refused and
			// leaves the session where it was.
			bad := fmt.Sprintf("%d-%d", offset+1, offset+size)
			resp, body := n.do("PATCH", loc, chunk, http.Header{"Content-Range": {bad}, "Content-Type": {"application/octet-stream"}})
			if resp.StatusCode != http.StatusRequestedRangeNotSatisfiable {
				t.Fatalf("misplaced chunk: %s %s, want 416", resp.Status, body)
			}
			if got, want := resp.Header.Get("Range"), fmt.Sprintf("0-%d", offset-1); got != want {
				t.Errorf("misplaced chunk: Range %q, want %q", got, want)
			}
		}
		cr := fmt.Sprintf("%d-%d", offset, offset+size-1)
		resp, body := n.do("PATCH", loc, chunk, http.Header{"Content-Range": {cr}, "Content-Type": {"application/octet-stream"}})
		if resp.StatusCode != http.StatusAccepted {
			t.Fatalf("chunk %d (%s): %s %s", i, cr, resp.Status, body)
		}
		offset += size
		if got, want := resp.Header.Get("Range"), fmt.Sprintf("0-%d", offset-1); got != want {
			t.Fatalf("chunk %d: Range %q, want %q", i, got, want)
		}
		if got := resp.Header.Get("Docker-Upload-UUID"); got != uuid {
			t.Fatalf("chunk %d: upload id changed from %s to %s", i, uuid, got)
		}
		loc = resp.Header.Get("Location")
	}
	resp, _ = n.do("GET", loc, nil, nil)
	if resp.StatusCode != http.StatusNoContent || resp.Header.Get("Range") != fmt.Sprintf("0-%d", total-1) {
		t.Fatalf("upload status: %s Range %q", resp.Status, resp.Header.Get("Range"))
	}
	resp, body = n.do("PUT", withQuery(loc, "digest", want.String()), nil, nil)
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("complete upload: %s %s", resp.Status, body)
	}
	if got := resp.Header.Get("Docker-Content-Digest"); got != want.String() {
		t.Errorf("Docker-Content-Digest = %q, want %s", got, want)
	}

	layer, err := remote.Layer(n.repo("chunked/blob").Digest(want.String()))
	if err != nil {
		t.Fatal(err)
	}
	rc, err := layer.Compressed()
	if err != nil {
		t.Fatalf("pull blob: %v", err)
	}
	defer rc.Close()
	var got bytes.Buffer
	if _, err := got.ReadFrom(rc); err != nil {
		t.Fatalf("pull blob: %v", err)
	}
	if !bytes.Equal(got.Bytes(), blob) {
		t.Errorf("pulled %d bytes that differ from the %d uploaded", got.Len(), len(blob))
	}
	if s, err := layer.Size(); err != nil || s != int64(total) {
		t.Errorf("blob size %d (%v), want %d", s, err, total)
	}
}

// Sixteen clients pushing different images at once all succeed, and every
// image reads back intact.
func TestConcurrentPushes(t *testing.T) {
	n := startNode(t)
	const clients = 16
	imgs := make([]v1.Image, clients)
	for i := range imgs {
		img, err := random.Image(8<<10, 3)
		if err != nil {
			t.Fatal(err)
		}
		imgs[i] = img
	}
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i, img := range imgs {
		wg.Go(func() {
			if err := remote.Write(n.ref(fmt.Sprintf("concurrent/app%d:v%d", i%4, i)), img); err != nil {
				errs <- fmt.Errorf("client %d: %w", i, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}
	for i, img := range imgs {
		checkImage(t, n.ref(fmt.Sprintf("concurrent/app%d:v%d", i%4, i)), img)
	}
	tags, err := remote.List(n.repo("concurrent/app0"))
	if err != nil {
		t.Fatalf("list tags: %v", err)
	}
	if want := []string{"v0", "v12", "v4", "v8"}; strings.Join(tags, ",") != strings.Join(want, ",") {
		t.Errorf("tags of concurrent/app0: %v, want %v", tags, want)
	}
}

// withQuery adds key=value to a Location that may already carry a query.
func withQuery(loc, key, value string) string {
	sep := "?"
	if strings.Contains(loc, "?") {
		sep = "&"
	}
	return loc + sep + key + "=" + url.QueryEscape(value)
}

func ptr[T any](v T) *T { return &v }
