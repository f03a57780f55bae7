package gateway

import (
	"mime"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

func FuzzParsePath(f *testing.F) {
	d256, d512 := digest.FromString("x").String(), digest.SHA512.FromString("x").String()
	for _, p := range []string{
		"/v2/", "/v2", "/v2/_catalog",
		"/v2/library/alpine/manifests/latest",
		"/v2/library/alpine/manifests/" + d256,
		"/v2/a/blobs/" + d512,
		"/v2/a/blobs/uploads/",
		"/v2/a/blobs/uploads",
		"/v2/a/blobs/uploads/eyJ2IjoxfQ.c2ln",
		"/v2/a/tags/list",
		"/v2/a/referrers/" + d256,
		"/v2/a/blobs/uploads/blobs/uploads/",
		"/v2/blobs/manifests/manifests/latest",
		"/v2/tags/list/tags/list",
		"/v2/a/../b/manifests/latest",
		"/v2/a%2Fb/manifests/latest",
		"/v2/a//b/tags/list",
		"/v2/A/tags/list",
		"/v2/" + strings.Repeat("a", 256) + "/tags/list",
		"/v2/a/manifests/",
		"/v2/a__b.c-d/e/blobs/uploads/x",
	} {
		f.Add(p)
	}
	f.Fuzz(func(t *testing.T, path string) {
		rt, err := parsePath(path)
		if err != nil {
			if c := asError(err).Code; c != CodeNameInvalid {
				t.Fatalf("parsePath(%q) failed with %s, want NAME_INVALID", path, c.Value)
			}
			return
		}
		if strings.Contains(rt.ref, "/") || strings.Contains(rt.ref, "%") {
			t.Fatalf("parsePath(%q): ref %q holds a separator or escape", path, rt.ref)
		}
		var rebuilt []string
		switch rt.kind {
		case routeBase:
			rebuilt = []string{"/v2/", "/v2"}
		case routeCatalog:
			rebuilt = []string{"/v2/_catalog"}
		case routeManifest:
			rebuilt = []string{"/v2/" + rt.name + "/manifests/" + rt.ref}
		case routeBlob:
			rebuilt = []string{"/v2/" + rt.name + "/blobs/" + rt.ref}
		case routeUploadStart:
			rebuilt = []string{"/v2/" + rt.name + "/blobs/uploads/", "/v2/" + rt.name + "/blobs/uploads"}
		case routeUpload:
			rebuilt = []string{"/v2/" + rt.name + "/blobs/uploads/" + rt.ref}
		case routeTags:
			rebuilt = []string{"/v2/" + rt.name + "/tags/list"}
		case routeReferrers:
			rebuilt = []string{"/v2/" + rt.name + "/referrers/" + rt.ref}
		default:
			t.Fatalf("parsePath(%q) = unknown kind %d", path, rt.kind)
		}
		found := false
		for _, r := range rebuilt {
			found = found || r == path
		}
		if !found {
			t.Fatalf("parsePath(%q) = %+v, which names %q", path, rt, rebuilt[0])
		}
		switch rt.kind {
		case routeBase, routeCatalog:
			if rt.name != "" || rt.ref != "" {
				t.Fatalf("parsePath(%q) = %+v, want no name or ref", path, rt)
			}
			return
		case routeUploadStart, routeTags:
			if rt.ref != "" {
				t.Fatalf("parsePath(%q) = %+v, want no ref", path, rt)
			}
		default:
			if rt.ref == "" {
				t.Fatalf("parsePath(%q) = %+v, want a ref", path, rt)
			}
		}
		if err := validateName(rt.name); err != nil {
			t.Fatalf("parsePath(%q) accepted name %q: %v", path, rt.name, err)
		}
	})
}

func FuzzParseManifest(f *testing.F) {
	layer := `{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"` + digest.FromString("layer").String() + `","size":32}`
	config := `{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"` + digest.FromString("config").String() + `","size":7}`
	child := `{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"` + digest.SHA512.FromString("child").String() + `","size":500,"platform":{"architecture":"arm64","os":"linux"}}`
	subject := `{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"` + digest.FromString("missing content").String() + `","size":123}`
	nondist := `{"mediaType":"application/vnd.oci.image.layer.nondistributable.v1.tar+gzip","digest":"` + digest.FromString("nd").String() + `","size":9,"urls":["https://example.com/l"]}`
	seeds := []struct{ ct, body string }{
		{mediaTypeOCIManifest, `{"schemaVersion":2,"mediaType":"` + mediaTypeOCIManifest + `","config":` + config + `,"layers":[` + layer + `]}`},
		{"", `{"schemaVersion":2,"mediaType":"` + mediaTypeOCIManifest + `","config":` + config + `,"layers":[]}`},
		{mediaTypeOCIManifest + "; charset=utf-8", `{"schemaVersion":2,"config":` + config + `,"layers":[` + layer + `,` + nondist + `]}`},
		{mediaTypeOCIManifest, `{"schemaVersion":2,"mediaType":"` + mediaTypeOCIManifest + `","artifactType":"application/vnd.example.sbom.v1","config":` + config + `,"layers":[` + layer + `],"subject":` + subject + `,"annotations":{"a":"b"}}`},
		{mediaTypeOCIIndex, `{"schemaVersion":2,"mediaType":"` + mediaTypeOCIIndex + `","manifests":[` + child + `]}`},
		{mediaTypeOCIIndex, `{"schemaVersion":2,"mediaType":"` + mediaTypeOCIIndex + `","manifests":[],"subject":` + subject + `}`},
		{mediaTypeDockerManifest, `{"schemaVersion":2,"mediaType":"` + mediaTypeDockerManifest + `","config":` + config + `,"layers":[` + layer + `]}`},
		{mediaTypeDockerList, `{"schemaVersion":2,"mediaType":"` + mediaTypeDockerList + `","manifests":[` + child + `]}`},
		{mediaTypeOCIIndex, `{"schemaVersion":2,"mediaType":"` + mediaTypeOCIManifest + `","manifests":[]}`},
		{"application/json", `{"schemaVersion":2}`},
		{mediaTypeOCIManifest, `{"schemaVersion":2,"config":{"digest":"sha256:baddigeststring"}}`},
		{mediaTypeOCIManifest, `{"schemaVersion":1,"config":null,"layers":null}`},
		{"", `null`},
		{mediaTypeOCIManifest, ``},
		{"; =", `{}`},
	}
	for _, s := range seeds {
		f.Add(s.ct, []byte(s.body))
	}
	f.Fuzz(func(t *testing.T, contentType string, body []byte) {
		p, err := parseManifest(contentType, body)
		if err != nil {
			if c := asError(err).Code; c != CodeManifestInvalid {
				t.Fatalf("parseManifest failed with %s, want MANIFEST_INVALID", c.Value)
			}
			return
		}
		isIndex, known := manifestKinds[p.mediaType]
		if !known {
			t.Fatalf("accepted unknown media type %q", p.mediaType)
		}
		if ct, _, err := mime.ParseMediaType(contentType); contentType != "" && (err != nil || ct != p.mediaType) {
			t.Fatalf("accepted Content-Type %q as %q", contentType, p.mediaType)
		}
		if isIndex && len(p.blobs) > 0 {
			t.Fatalf("index %q requires blobs %q", body, p.blobs)
		}
		if !isIndex && (len(p.manifests) > 0 || len(p.blobs) == 0) {
			t.Fatalf("image %q requires manifests %q and blobs %q (no config?)", body, p.manifests, p.blobs)
		}
		refs := append(append([]string{}, p.blobs...), p.manifests...)
		if p.subject != "" {
			refs = append(refs, p.subject)
		}
		for _, d := range refs {
			if _, err := digest.Parse(d); err != nil {
				t.Fatalf("accepted reference %q: %v", d, err)
			}
		}
	})
}
