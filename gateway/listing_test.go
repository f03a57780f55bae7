package gateway

import (
	"encoding/json"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

// nextLink returns the target of a Link: <…>; rel="next" header, or "".
func nextLink(t *testing.T, r reply) string {
	t.Helper()
	link := r.header.Get("Link")
	if link == "" {
		return ""
	}
	m := regexp.MustCompile(`^<([^>]+)>; rel="next"$`).FindStringSubmatch(link)
	if m == nil {
		t.Fatalf("malformed Link header %q", link)
	}
	return m[1]
}

func listTags(t *testing.T, h *harness, query string) ([]string, reply) {
	t.Helper()
	r := h.do(t, "GET", "/v2/app/tags/list"+query, nil)
	if r.status != http.StatusOK {
		return nil, r
	}
	var body struct {
		Name string   `json:"name"`
		Tags []string `json:"tags"`
	}
	if err := json.Unmarshal(r.body, &body); err != nil {
		t.Fatalf("tag list %q: %v", r.body, err)
	}
	if body.Name != "app" || body.Tags == nil {
		t.Errorf("tag list = %s, want name app and a tags array", r.body)
	}
	return body.Tags, r
}

func TestTagListPagination(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.ListLimit = 4 })
	body := h.newImage(t, "app").bytes(t)
	all := []string{"Latest", "latest", "v1", "v10", "v2"} // byte order
	q := url.Values{"tag": {"v2", "v10", "latest", "v1", "Latest"}}.Encode()
	h.putManifest(t, "app", digest.FromBytes(body).String()+"?"+q, mediaTypeOCIManifest, body).wantStatus(t, http.StatusCreated)

	tests := []struct {
		query string
		tags  []string
		link  string
	}{
		{"", all[:4], "/v2/app/tags/list?last=v10&n=4"},
		{"?n=2", all[:2], "/v2/app/tags/list?last=latest&n=2"},
		{"?n=2&last=latest", all[2:4], "/v2/app/tags/list?last=v10&n=2"},
		{"?n=2&last=v10", all[4:], ""},
		{"?n=1&last=v2", []string{}, ""},
		{"?last=v1", all[3:], ""},
		{"?last=a", all[1:], ""},
		{"?last=zzz", []string{}, ""},
		{"?last=", all[:4], "/v2/app/tags/list?last=v10&n=4"},
		{"?n=3", all[:3], "/v2/app/tags/list?last=v1&n=3"},
		{"?n=1000", all[:4], "/v2/app/tags/list?last=v10&n=4"},
		{"?n=0", []string{}, ""},
		{"?n=0&last=latest", []string{}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.query, func(t *testing.T) {
			tags, r := listTags(t, h, tt.query)
			r.wantStatus(t, http.StatusOK)
			if !slices.Equal(tags, tt.tags) {
				t.Errorf("tags = %q, want %q", tags, tt.tags)
			}
			if got := nextLink(t, r); got != tt.link {
				t.Errorf("next = %q, want %q", got, tt.link)
			}
			if ct := r.header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type = %q", ct)
			}
		})
	}
	for _, bad := range []string{"?n=-1", "?n=abc", "?n=", "?n=1.5", "?n=99999999999999999999"} {
		t.Run(bad, func(t *testing.T) {
			h.do(t, "GET", "/v2/app/tags/list"+bad, nil).wantError(t, http.StatusBadRequest, "PAGINATION_NUMBER_INVALID")
		})
	}
	t.Run("following links lists every tag once", func(t *testing.T) {
		var got []string
		next := "?n=2"
		for pages := 0; next != ""; pages++ {
			if pages > len(all) {
				t.Fatal("pagination does not end")
			}
			tags, r := listTags(t, h, next)
			got = append(got, tags...)
			next = strings.TrimPrefix(nextLink(t, r), "/v2/app/tags/list")
		}
		if !slices.Equal(got, all) {
			t.Errorf("paged tags = %q, want %q", got, all)
		}
	})
	t.Run("unknown repository", func(t *testing.T) {
		h.do(t, "GET", "/v2/nothing/tags/list", nil).wantError(t, http.StatusNotFound, "NAME_UNKNOWN")
	})
}

func TestCatalogPagination(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.ListLimit = 3 })
	all := []string{"a", "b", "b/c", "b-c", "z"}
	for _, repo := range []string{"z", "b-c", "b/c", "a", "b"} {
		h.pushBlob(t, repo, []byte(repo))
	}
	slices.Sort(all)
	list := func(t *testing.T, query string) ([]string, reply) {
		t.Helper()
		r := h.do(t, "GET", "/v2/_catalog"+query, nil)
		r.wantStatus(t, http.StatusOK)
		var body struct {
			Repositories []string `json:"repositories"`
		}
		if err := json.Unmarshal(r.body, &body); err != nil || body.Repositories == nil {
			t.Fatalf("catalog %q: %v", r.body, err)
		}
		return body.Repositories, r
	}
	tests := []struct {
		query string
		repos []string
		link  string
	}{
		{"", all[:3], "/v2/_catalog?last=" + url.QueryEscape(all[2]) + "&n=3"},
		{"?n=2", all[:2], "/v2/_catalog?last=" + url.QueryEscape(all[1]) + "&n=2"},
		{"?n=5", all[:3], "/v2/_catalog?last=" + url.QueryEscape(all[2]) + "&n=3"},
		{"?last=" + url.QueryEscape(all[2]), all[3:], ""},
		{"?n=0", []string{}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.query, func(t *testing.T) {
			repos, r := list(t, tt.query)
			if !slices.Equal(repos, tt.repos) {
				t.Errorf("repositories = %q, want %q", repos, tt.repos)
			}
			if got := nextLink(t, r); got != tt.link {
				t.Errorf("next = %q, want %q", got, tt.link)
			}
		})
	}
	h.do(t, "GET", "/v2/_catalog?n=-5", nil).wantError(t, http.StatusBadRequest, "PAGINATION_NUMBER_INVALID")

	var got []string
	next := "?n=2"
	for pages := 0; next != ""; pages++ {
		if pages > len(all) {
			t.Fatal("pagination does not end")
		}
		repos, r := list(t, next)
		got = append(got, repos...)
		next = strings.TrimPrefix(nextLink(t, r), "/v2/_catalog")
	}
	if !slices.Equal(got, all) {
		t.Errorf("paged catalog = %q, want %q", got, all)
	}
}

// referrerIndex is the body of a referrers response.
type referrerIndex struct {
	SchemaVersion int          `json:"schemaVersion"`
	MediaType     string       `json:"mediaType"`
	Manifests     []descriptor `json:"manifests"`
}

// referrersOf fetches the referrers of subject, filtered when artifactType is
// set, and checks the response's form.
func referrersOf(t *testing.T, h *harness, repo, subject, artifactType string) referrerIndex {
	t.Helper()
	path := "/v2/" + repo + "/referrers/" + subject
	if artifactType != "" {
		path += "?artifactType=" + url.QueryEscape(artifactType)
	}
	r := h.do(t, "GET", path, nil)
	r.wantStatus(t, http.StatusOK)
	if ct := r.header.Get("Content-Type"); ct != mediaTypeOCIIndex {
		t.Errorf("Content-Type = %q, want %s", ct, mediaTypeOCIIndex)
	}
	filtered := r.header.Get("OCI-Filters-Applied")
	if (artifactType != "") != (filtered == "artifactType") {
		t.Errorf("OCI-Filters-Applied = %q with artifactType %q", filtered, artifactType)
	}
	var idx referrerIndex
	if err := json.Unmarshal(r.body, &idx); err != nil {
		t.Fatalf("referrers body %q: %v", r.body, err)
	}
	if idx.SchemaVersion != 2 || idx.MediaType != mediaTypeOCIIndex || idx.Manifests == nil {
		t.Errorf("referrers body = %s, want an image index with a manifests array", r.body)
	}
	return idx
}

func TestReferrers(t *testing.T) {
	h := newHarness(t)
	subjectBody := h.newImage(t, "app").bytes(t)
	h.putManifest(t, "app", "v1", mediaTypeOCIManifest, subjectBody).wantStatus(t, http.StatusCreated)
	subject := describe(mediaTypeOCIManifest, subjectBody)

	const sbom, sig = "application/vnd.example.sbom.v1", "application/vnd.example.signature.v1"
	push := func(m testManifest) descriptor {
		t.Helper()
		b := m.bytes(t)
		r := h.putManifest(t, "app", digest.FromBytes(b).String(), m.MediaType, b)
		r.wantStatus(t, http.StatusCreated)
		d := describe(m.MediaType, b)
		d.ArtifactType, d.Annotations = m.ArtifactType, m.Annotations
		return d
	}
	withSBOM := h.newImage(t, "app")
	withSBOM.ArtifactType, withSBOM.Subject = sbom, &subject
	withSBOM.Annotations = map[string]string{"org.example.id": "sbom", "org.opencontainers.image.created": "2026-01-01T00:00:00Z"}
	sbomRef := push(withSBOM)

	plain := h.newImage(t, "app") // no artifactType: the config's media type stands in
	plain.Subject = &subject
	plainRef := push(plain)
	plainRef.ArtifactType = mediaTypeConfig

	sigIndex := testManifest{SchemaVersion: 2, MediaType: mediaTypeOCIIndex, ArtifactType: sig, Subject: &subject,
		Annotations: map[string]string{"org.example.id": "sig"}}
	sigRef := push(sigIndex)
	push(h.newImage(t, "app")) // refers to nothing

	want := []descriptor{sbomRef, plainRef, sigRef}
	slices.SortFunc(want, func(a, b descriptor) int { return strings.Compare(a.Digest, b.Digest) })
	tests := []struct {
		artifactType string
		want         []descriptor
	}{
		{"", want},
		{sbom, []descriptor{sbomRef}},
		{mediaTypeConfig, []descriptor{plainRef}},
		{sig, []descriptor{sigRef}},
		{"application/vnd.example.unknown", nil},
	}
	for _, tt := range tests {
		t.Run("artifactType="+tt.artifactType, func(t *testing.T) {
			got := referrersOf(t, h, "app", subject.Digest, tt.artifactType).Manifests
			if len(got) != len(tt.want) {
				t.Fatalf("referrers = %+v, want %+v", got, tt.want)
			}
			for i := range got {
				g, w := got[i], tt.want[i]
				if g.MediaType != w.MediaType || g.Digest != w.Digest || g.Size != w.Size || g.ArtifactType != w.ArtifactType {
					t.Errorf("referrer %d = %+v, want %+v", i, g, w)
				}
				for k, v := range w.Annotations {
					if g.Annotations[k] != v {
						t.Errorf("referrer %s lacks annotation %s=%s", g.Digest, k, v)
					}
				}
			}
		})
	}
	t.Run("other repository", func(t *testing.T) {
		if got := referrersOf(t, h, "other", subject.Digest, "").Manifests; len(got) != 0 {
			t.Errorf("referrers in a repository that holds none: %+v", got)
		}
	})
	t.Run("unknown subject", func(t *testing.T) {
		if got := referrersOf(t, h, "app", digest.FromString("nobody").String(), "").Manifests; len(got) != 0 {
			t.Errorf("referrers of an unknown subject: %+v", got)
		}
	})
	t.Run("invalid digest", func(t *testing.T) {
		h.do(t, "GET", "/v2/app/referrers/sha256:baddigeststring", nil).wantError(t, http.StatusBadRequest, "DIGEST_INVALID")
		h.do(t, "GET", "/v2/app/referrers/latest", nil).wantError(t, http.StatusBadRequest, "DIGEST_INVALID")
	})
	t.Run("deleted referrer", func(t *testing.T) {
		h.do(t, "DELETE", "/v2/app/manifests/"+sbomRef.Digest, nil).wantStatus(t, http.StatusAccepted)
		for _, d := range referrersOf(t, h, "app", subject.Digest, "").Manifests {
			if d.Digest == sbomRef.Digest {
				t.Error("a deleted referrer is still listed")
			}
		}
		if got := referrersOf(t, h, "app", subject.Digest, sbom).Manifests; len(got) != 0 {
			t.Errorf("filtered referrers after delete: %+v", got)
		}
	})
}
