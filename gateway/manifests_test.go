package gateway

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

// padTo returns m's body grown to exactly size bytes with an annotation.
func padTo(t *testing.T, m testManifest, size int) []byte {
	t.Helper()
	m.Annotations = map[string]string{"pad": ""}
	m.Annotations["pad"] = strings.Repeat("x", size-len(m.bytes(t)))
	b := m.bytes(t)
	if len(b) != size {
		t.Fatalf("padded manifest has %d bytes, want %d", len(b), size)
	}
	return b
}

func (m *fakeMetadata) manifestCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.manifests)
}

// wantManifest checks that ref in repo serves exactly body as mediaType,
// under its sha256 digest or the digest ref names.
func (h *harness) wantManifest(t *testing.T, repo, ref, mediaType string, body []byte) {
	t.Helper()
	d := digest.FromBytes(body)
	if isDigestRef(ref) {
		d = digest.Digest(ref)
	}
	h.wantManifestDigest(t, repo, ref, mediaType, body, d)
}

// wantManifestDigest is wantManifest for a manifest known under d.
func (h *harness) wantManifestDigest(t *testing.T, repo, ref, mediaType string, body []byte, d digest.Digest) {
	t.Helper()
	for _, method := range []string{"GET", "HEAD"} {
		r := h.do(t, method, "/v2/"+repo+"/manifests/"+ref, nil,
			"Accept", mediaTypeOCIManifest, "Accept", mediaTypeOCIIndex)
		r.wantStatus(t, http.StatusOK)
		if got := r.header.Get("Content-Type"); got != mediaType {
			t.Errorf("%s %s: Content-Type = %q, want %q", method, ref, got, mediaType)
		}
		if got := r.header.Get("Content-Length"); got != strconv.Itoa(len(body)) {
			t.Errorf("%s %s: Content-Length = %q, want %d", method, ref, got, len(body))
		}
		if got := r.header.Get("Docker-Content-Digest"); got != d.String() {
			t.Errorf("%s %s: Docker-Content-Digest = %q, want %s", method, ref, got, d)
		}
		if got := r.header.Get("ETag"); got != `"`+d.String()+`"` {
			t.Errorf("%s %s: ETag = %q", method, ref, got)
		}
		if method == "GET" && !bytes.Equal(r.body, body) {
			t.Errorf("GET %s: body differs from what was pushed", ref)
		}
	}
}

func TestManifestRoundTrip(t *testing.T) {
	h := newHarness(t)
	img := h.newImage(t, "app")
	// Unknown fields and odd spacing must survive: clients verify the digest.
	body := append([]byte(" \n"), img.bytes(t)...)
	body = append(body[:len(body)-1], []byte(`,"x-custom": {"keep": [1, 2]}  }`)...)
	d := digest.FromBytes(body)
	r := h.putManifest(t, "app", "v1", mediaTypeOCIManifest, body)
	r.wantStatus(t, http.StatusCreated)
	if got := r.header.Get("Location"); got != "/v2/app/manifests/"+d.String() {
		t.Errorf("Location = %q", got)
	}
	if got := r.header.Get("Docker-Content-Digest"); got != d.String() {
		t.Errorf("Docker-Content-Digest = %q, want %s", got, d)
	}
	h.wantManifest(t, "app", "v1", mediaTypeOCIManifest, body)
	h.wantManifest(t, "app", d.String(), mediaTypeOCIManifest, body)

	// A re-PUT is 201 again, and a cache revalidation is 304.
	h.putManifest(t, "app", "v1", mediaTypeOCIManifest, body).wantStatus(t, http.StatusCreated)
	h.do(t, "GET", "/v2/app/manifests/v1", nil, "If-None-Match", `"`+d.String()+`"`).wantStatus(t, http.StatusNotModified)

	h.do(t, "GET", "/v2/app/manifests/v2", nil).wantError(t, http.StatusNotFound, "MANIFEST_UNKNOWN")
	h.do(t, "GET", "/v2/app/manifests/"+digest.FromString("x").String(), nil).wantError(t, http.StatusNotFound, "MANIFEST_UNKNOWN")
	h.do(t, "GET", "/v2/other/manifests/v1", nil).wantError(t, http.StatusNotFound, "MANIFEST_UNKNOWN")
	h.do(t, "HEAD", "/v2/app/manifests/v2", nil).wantStatus(t, http.StatusNotFound)
	h.do(t, "GET", "/v2/app/manifests/sha256:baddigeststring", nil).wantError(t, http.StatusBadRequest, "DIGEST_INVALID")
}

// A manifest pushed by its sha512 digest with ?tag= is served under that
// digest, and its tags resolve to it.
func TestManifestSHA512WithTags(t *testing.T) {
	h := newHarness(t)
	body := h.newImage(t, "app").bytes(t)
	d := digest.SHA512.FromBytes(body)
	r := h.putManifest(t, "app", d.String()+"?tag=a&tag=b&tag=a", mediaTypeOCIManifest, body)
	r.wantStatus(t, http.StatusCreated)
	if got := r.header.Values("OCI-Tag"); strings.Join(got, ",") != "a,b" {
		t.Errorf("OCI-Tag = %q, want a and b once each", got)
	}
	for _, ref := range []string{"a", "b", d.String()} {
		h.wantManifestDigest(t, "app", ref, mediaTypeOCIManifest, body, d)
	}
	h.do(t, "GET", "/v2/app/manifests/"+digest.FromBytes(body).String(), nil).wantError(t, http.StatusNotFound, "MANIFEST_UNKNOWN")
}

func TestManifestRejected(t *testing.T) {
	const limit = 4096
	h := newHarness(t, func(c *Config) { c.MaxManifestSize = limit })
	img := h.newImage(t, "app")
	imgBody := img.bytes(t)
	h.putManifest(t, "app", "base", mediaTypeOCIManifest, imgBody).wantStatus(t, http.StatusCreated)
	foreign := h.newImage(t, "elsewhere")

	with := func(edit func(*testManifest)) []byte {
		m := img
		m.Layers = append([]descriptor{}, img.Layers...)
		edit(&m)
		return m.bytes(t)
	}
	index := func(children ...descriptor) []byte {
		return testManifest{SchemaVersion: 2, MediaType: mediaTypeOCIIndex, Manifests: children}.bytes(t)
	}
	tests := []struct {
		name        string
		ref         string
		contentType string // "-": no Content-Type header
		body        []byte
		stream      bool
		status      int
		code        string
	}{
		{"over the limit", "v1", mediaTypeOCIManifest, padTo(t, img, limit+1), false, 413, "SIZE_INVALID"},
		{"over the limit, streamed", "v1", mediaTypeOCIManifest, padTo(t, img, limit+1), true, 413, "SIZE_INVALID"},
		{"far over the limit, streamed", "v1", mediaTypeOCIManifest, padTo(t, img, 64<<10), true, 413, "SIZE_INVALID"},
		{"missing layer", "v1", mediaTypeOCIManifest, with(func(m *testManifest) {
			m.Layers = append(m.Layers, describe(mediaTypeLayer, []byte("never pushed")))
		}), false, 400, "MANIFEST_BLOB_UNKNOWN"},
		{"missing config", "v1", mediaTypeOCIManifest, with(func(m *testManifest) {
			m.Config = new(describe(mediaTypeConfig, []byte("{}")))
		}), false, 400, "MANIFEST_BLOB_UNKNOWN"},
		{"blob only in another repository", "v1", mediaTypeOCIManifest, with(func(m *testManifest) {
			m.Layers = foreign.Layers
		}), false, 400, "MANIFEST_BLOB_UNKNOWN"},
		{"index with a missing child", "v1", mediaTypeOCIIndex,
			index(describe(mediaTypeOCIManifest, imgBody), describe(mediaTypeOCIManifest, []byte("{}"))), false, 400, "MANIFEST_BLOB_UNKNOWN"},
		{"content type says index, body says image", "v1", mediaTypeOCIIndex, imgBody, false, 400, "MANIFEST_INVALID"},
		{"content type says docker, body says oci", "v1", mediaTypeDockerManifest, imgBody, false, 400, "MANIFEST_INVALID"},
		{"content type says image, body is an index", "v1", mediaTypeOCIManifest,
			index(describe(mediaTypeOCIManifest, imgBody)), false, 400, "MANIFEST_INVALID"},
		{"unknown media type", "v1", "application/json", with(func(m *testManifest) { m.MediaType = "" }), false, 400, "MANIFEST_INVALID"},
		{"unknown media type in body", "v1", "-", with(func(m *testManifest) { m.MediaType = "application/vnd.example+json" }), false, 400, "MANIFEST_INVALID"},
		{"no media type at all", "v1", "-", with(func(m *testManifest) { m.MediaType = "" }), false, 400, "MANIFEST_INVALID"},
		{"unparsable content type", "v1", "application/vnd.oci.image.manifest.v1+json; =", imgBody, false, 400, "MANIFEST_INVALID"},
		{"not json", "v1", mediaTypeOCIManifest, []byte("{\"schemaVersion\":2,"), false, 400, "MANIFEST_INVALID"},
		{"json but not an object", "v1", mediaTypeOCIManifest, []byte(`["schemaVersion",2]`), false, 400, "MANIFEST_INVALID"},
		{"empty body", "v1", mediaTypeOCIManifest, nil, false, 400, "MANIFEST_INVALID"},
		{"schema version 1", "v1", mediaTypeOCIManifest, with(func(m *testManifest) { m.SchemaVersion = 1 }), false, 400, "MANIFEST_INVALID"},
		{"image without config", "v1", mediaTypeOCIManifest, with(func(m *testManifest) { m.Config = nil }), false, 400, "MANIFEST_INVALID"},
		{"image with manifests", "v1", mediaTypeOCIManifest, with(func(m *testManifest) {
			m.Manifests = []descriptor{describe(mediaTypeOCIManifest, imgBody)}
		}), false, 400, "MANIFEST_INVALID"},
		{"index with layers", "v1", mediaTypeOCIIndex, testManifest{SchemaVersion: 2, MediaType: mediaTypeOCIIndex,
			Layers: img.Layers}.bytes(t), false, 400, "MANIFEST_INVALID"},
		{"layer with a bad digest", "v1", mediaTypeOCIManifest, with(func(m *testManifest) {
			m.Layers[0].Digest = "sha256:baddigeststring"
		}), false, 400, "MANIFEST_INVALID"},
		{"layer with a negative size", "v1", mediaTypeOCIManifest, with(func(m *testManifest) { m.Layers[0].Size = -1 }), false, 400, "MANIFEST_INVALID"},
		{"layer without media type", "v1", mediaTypeOCIManifest, with(func(m *testManifest) { m.Layers[0].MediaType = "" }), false, 400, "MANIFEST_INVALID"},
		{"subject with a bad digest", "v1", mediaTypeOCIManifest, with(func(m *testManifest) {
			m.Subject = &descriptor{MediaType: mediaTypeOCIManifest, Digest: "sha256:nope", Size: 1}
		}), false, 400, "MANIFEST_INVALID"},
		{"digest does not match body", digest.FromString("other").String(), mediaTypeOCIManifest, imgBody, false, 400, "DIGEST_INVALID"},
		{"sha512 digest does not match body", digest.SHA512.FromString("other").String(), mediaTypeOCIManifest, imgBody, false, 400, "DIGEST_INVALID"},
		{"malformed digest", "sha256:baddigeststring", mediaTypeOCIManifest, imgBody, false, 400, "DIGEST_INVALID"},
		{"unsupported digest algorithm", "sha384:" + strings.Repeat("a", 96), mediaTypeOCIManifest, imgBody, false, 400, "DIGEST_INVALID"},
		{"invalid tag", ".hidden", mediaTypeOCIManifest, imgBody, false, 400, "MANIFEST_INVALID"},
		{"overlong tag", strings.Repeat("t", 129), mediaTypeOCIManifest, imgBody, false, 400, "MANIFEST_INVALID"},
		{"invalid tag parameter", digest.FromBytes(imgBody).String() + "?tag=-x", mediaTypeOCIManifest, imgBody, false, 400, "MANIFEST_INVALID"},
	}
	before := h.meta.manifestCount()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var header []string
			if tt.contentType != "-" {
				header = []string{"Content-Type", tt.contentType}
			}
			var body io.Reader = bytes.NewReader(tt.body)
			if tt.stream {
				body = chunked(tt.body)
			}
			r := h.do(t, "PUT", "/v2/app/manifests/"+tt.ref, body, header...)
			r.wantError(t, tt.status, tt.code)
			if r.header.Get("Location") != "" {
				t.Errorf("a refused manifest has a Location: %q", r.header.Get("Location"))
			}
			if n := h.meta.manifestCount(); n != before {
				t.Errorf("%d manifests stored after a refused PUT, want %d", n, before)
			}
		})
	}
	h.do(t, "GET", "/v2/app/manifests/v1", nil).wantError(t, http.StatusNotFound, "MANIFEST_UNKNOWN")
	h.wantManifest(t, "app", "base", mediaTypeOCIManifest, imgBody)
}

func TestManifestSizeLimitIsInclusive(t *testing.T) {
	const limit = 4096
	h := newHarness(t, func(c *Config) { c.MaxManifestSize = limit })
	body := padTo(t, h.newImage(t, "app"), limit)
	h.putManifest(t, "app", "v1", mediaTypeOCIManifest, body).wantStatus(t, http.StatusCreated)
	h.do(t, "PUT", "/v2/app/manifests/v2", chunked(body), "Content-Type", mediaTypeOCIManifest).wantStatus(t, http.StatusCreated)
	h.wantManifest(t, "app", "v2", mediaTypeOCIManifest, body)
}

// What the spec lets a manifest reference without the registry holding it.
func TestManifestAllowedAbsent(t *testing.T) {
	h := newHarness(t)
	img := h.newImage(t, "app")
	missingSubject := descriptor{MediaType: mediaTypeOCIManifest, Digest: digest.FromString("missing content").String(), Size: 123}
	nondist := img
	nondist.Layers = []descriptor{
		{MediaType: "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", Digest: digest.FromString("windows base").String(), Size: 1 << 30,
			URLs: []string{"https://example.com/layer"}},
		{MediaType: "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", Digest: digest.FromString("foreign").String(), Size: 10},
	}
	referrer := img
	referrer.ArtifactType = "application/vnd.example.sbom.v1"
	referrer.Subject = &missingSubject
	referrer.Annotations = map[string]string{"org.example.id": "1"}
	tests := []struct {
		name        string
		contentType string
		body        []byte
		subject     string
	}{
		{"non-distributable layers", mediaTypeOCIManifest, nondist.bytes(t), ""},
		{"subject that does not exist", mediaTypeOCIManifest, referrer.bytes(t), missingSubject.Digest},
		{"no layers", mediaTypeOCIManifest, testManifest{SchemaVersion: 2, MediaType: mediaTypeOCIManifest, Config: img.Config}.bytes(t), ""},
		{"empty index", mediaTypeOCIIndex, testManifest{SchemaVersion: 2, MediaType: mediaTypeOCIIndex}.bytes(t), ""},
		{"docker manifest", mediaTypeDockerManifest, testManifest{SchemaVersion: 2, MediaType: mediaTypeDockerManifest, Config: img.Config, Layers: img.Layers}.bytes(t), ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := digest.FromBytes(tt.body)
			r := h.putManifest(t, "app", d.String(), tt.contentType, tt.body)
			r.wantStatus(t, http.StatusCreated)
			if got := r.header.Get("OCI-Subject"); got != tt.subject {
				t.Errorf("OCI-Subject = %q, want %q", got, tt.subject)
			}
			h.wantManifest(t, "app", d.String(), tt.contentType, tt.body)
		})
	}
	idx := referrersOf(t, h, "app", missingSubject.Digest, "")
	if len(idx.Manifests) != 1 || idx.Manifests[0].Digest != digest.FromBytes(referrer.bytes(t)).String() {
		t.Errorf("referrers of the missing subject = %+v, want the one referrer", idx.Manifests)
	}
}

// The media type comes from Content-Type without its parameters, or from the
// body when there is no Content-Type; GET serves it back bare.
func TestManifestMediaTypeSource(t *testing.T) {
	h := newHarness(t)
	img := h.newImage(t, "app")
	bare := img
	bare.MediaType = ""
	tests := []struct {
		name   string
		header []string
		body   []byte
	}{
		{"parameters dropped", []string{"Content-Type", mediaTypeOCIManifest + "; charset=utf-8"}, img.bytes(t)},
		{"from the body", nil, img.bytes(t)},
		{"from the header", []string{"Content-Type", mediaTypeOCIManifest}, bare.bytes(t)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := digest.FromBytes(tt.body)
			h.do(t, "PUT", "/v2/app/manifests/"+d.String(), bytes.NewReader(tt.body), tt.header...).wantStatus(t, http.StatusCreated)
			h.wantManifest(t, "app", d.String(), mediaTypeOCIManifest, tt.body)
		})
	}
}

func TestTagCompareAndSwap(t *testing.T) {
	quote := func(d digest.Digest) string { return `"` + d.String() + `"` }
	tests := []struct {
		name   string
		tag    string
		header func(a, b digest.Digest) []string
		status int
		want   string // "a", "b": where tag points afterwards; "": nowhere
	}{
		{"if-match current", "v1", func(a, _ digest.Digest) []string { return []string{"If-Match", quote(a)} }, 201, "b"},
		{"if-match current, weak", "v1", func(a, _ digest.Digest) []string { return []string{"If-Match", "W/" + quote(a)} }, 201, "b"},
		{"if-match current, unquoted", "v1", func(a, _ digest.Digest) []string { return []string{"If-Match", a.String()} }, 201, "b"},
		{"if-match stale", "v1", func(_, b digest.Digest) []string { return []string{"If-Match", quote(b)} }, 412, "a"},
		{"if-match other digest", "v1", func(_, _ digest.Digest) []string { return []string{"If-Match", quote(digest.FromString("x"))} }, 412, "a"},
		{"if-match on a new tag", "v2", func(a, _ digest.Digest) []string { return []string{"If-Match", quote(a)} }, 412, ""},
		{"if-match any, existing", "v1", func(_, _ digest.Digest) []string { return []string{"If-Match", "*"} }, 201, "b"},
		{"if-match any, new", "v2", func(_, _ digest.Digest) []string { return []string{"If-Match", "*"} }, 412, ""},
		{"if-none-match any, existing", "v1", func(_, _ digest.Digest) []string { return []string{"If-None-Match", "*"} }, 412, "a"},
		{"if-none-match any, new", "v2", func(_, _ digest.Digest) []string { return []string{"If-None-Match", "*"} }, 201, "b"},
		{"if-none-match a digest", "v2", func(a, _ digest.Digest) []string { return []string{"If-None-Match", quote(a)} }, 400, ""},
		{"if-match garbage", "v1", func(_, _ digest.Digest) []string { return []string{"If-Match", `"latest"`} }, 400, "a"},
		{"no condition", "v1", func(_, _ digest.Digest) []string { return nil }, 201, "b"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			h := newHarness(t)
			aBody, bBody := h.newImage(t, "app").bytes(t), h.newImage(t, "app").bytes(t)
			a, b := digest.FromBytes(aBody), digest.FromBytes(bBody)
			h.putManifest(t, "app", "v1", mediaTypeOCIManifest, aBody).wantStatus(t, http.StatusCreated)
			r := h.putManifest(t, "app", tt.tag, mediaTypeOCIManifest, bBody, tt.header(a, b)...)
			switch tt.status {
			case 412:
				r.wantError(t, 412, "PRECONDITION_FAILED")
			case 400:
				r.wantError(t, 400, "MANIFEST_INVALID")
			default:
				r.wantStatus(t, tt.status)
			}
			switch tt.want {
			case "a":
				h.wantManifest(t, "app", tt.tag, mediaTypeOCIManifest, aBody)
			case "b":
				h.wantManifest(t, "app", tt.tag, mediaTypeOCIManifest, bBody)
			default:
				h.do(t, "HEAD", "/v2/app/manifests/"+tt.tag, nil).wantStatus(t, http.StatusNotFound)
			}
			if tt.status != 201 {
				h.do(t, "HEAD", "/v2/app/manifests/"+b.String(), nil).wantStatus(t, http.StatusNotFound)
			}
		})
	}
}

// Two writers that read the same ETag: the first swap wins, the second is
// told the tag moved.
func TestTagCompareAndSwapRace(t *testing.T) {
	h := newHarness(t)
	base, mine, theirs := h.newImage(t, "app").bytes(t), h.newImage(t, "app").bytes(t), h.newImage(t, "app").bytes(t)
	h.putManifest(t, "app", "prod", mediaTypeOCIManifest, base).wantStatus(t, http.StatusCreated)
	etag := h.do(t, "HEAD", "/v2/app/manifests/prod", nil).header.Get("ETag")
	h.putManifest(t, "app", "prod", mediaTypeOCIManifest, theirs, "If-Match", etag).wantStatus(t, http.StatusCreated)
	h.putManifest(t, "app", "prod", mediaTypeOCIManifest, mine, "If-Match", etag).wantError(t, 412, "PRECONDITION_FAILED")
	h.wantManifest(t, "app", "prod", mediaTypeOCIManifest, theirs)
}

func TestConditionalPutByDigestWithTags(t *testing.T) {
	h := newHarness(t)
	body := h.newImage(t, "app").bytes(t)
	d := digest.FromBytes(body).String()
	h.putManifest(t, "app", d+"?tag=new", mediaTypeOCIManifest, body, "If-None-Match", "*").wantStatus(t, http.StatusCreated)
	h.putManifest(t, "app", d+"?tag=new", mediaTypeOCIManifest, body, "If-None-Match", "*").wantError(t, 412, "PRECONDITION_FAILED")
	h.putManifest(t, "app", d+"?tag=x&tag=y", mediaTypeOCIManifest, body, "If-None-Match", "*").wantError(t, 400, "MANIFEST_INVALID")
	h.putManifest(t, "app", d, mediaTypeOCIManifest, body, "If-Match", `"`+d+`"`).wantError(t, 400, "MANIFEST_INVALID")
	h.do(t, "HEAD", "/v2/app/manifests/x", nil).wantStatus(t, http.StatusNotFound)
}

func TestManifestDelete(t *testing.T) {
	h := newHarness(t)
	body := h.newImage(t, "app").bytes(t)
	d := digest.FromBytes(body).String()
	h.putManifest(t, "app", d+"?tag=a&tag=b", mediaTypeOCIManifest, body).wantStatus(t, http.StatusCreated)

	h.do(t, "DELETE", "/v2/app/manifests/a", nil).wantStatus(t, http.StatusAccepted)
	h.do(t, "HEAD", "/v2/app/manifests/a", nil).wantStatus(t, http.StatusNotFound)
	h.wantManifest(t, "app", "b", mediaTypeOCIManifest, body)
	h.do(t, "DELETE", "/v2/app/manifests/a", nil).wantError(t, http.StatusNotFound, "MANIFEST_UNKNOWN")

	h.do(t, "DELETE", "/v2/app/manifests/"+d, nil).wantStatus(t, http.StatusAccepted)
	h.do(t, "HEAD", "/v2/app/manifests/"+d, nil).wantStatus(t, http.StatusNotFound)
	h.do(t, "HEAD", "/v2/app/manifests/b", nil).wantStatus(t, http.StatusNotFound)
	h.do(t, "DELETE", "/v2/app/manifests/"+d, nil).wantError(t, http.StatusNotFound, "MANIFEST_UNKNOWN")
	h.do(t, "DELETE", "/v2/app/manifests/sha256:baddigeststring", nil).wantError(t, http.StatusBadRequest, "DIGEST_INVALID")
	h.do(t, "DELETE", "/v2/app/manifests/-bad", nil).wantError(t, http.StatusBadRequest, "MANIFEST_INVALID")

	var tags struct{ Tags []string }
	if err := json.Unmarshal(h.do(t, "GET", "/v2/app/tags/list", nil).body, &tags); err != nil || len(tags.Tags) != 0 {
		t.Errorf("tags after deleting the manifest: %v (%v), want none", tags.Tags, err)
	}
}
