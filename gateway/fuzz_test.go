package gateway

import (
	"bytes"
	"encoding/json"
	"maps"
	"mime"
	"slices"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

// The fuzz targets come in pairs. FuzzParsePath and FuzzParseManifest feed
// arbitrary input and check that whatever is accepted is well formed (the
// parser never accepts garbage). FuzzBuiltPath and FuzzBuiltManifest build
// input from the grammar, driven by the fuzz bytes, and check that every
// valid one is accepted with exactly the parts it was built from and every
// deliberately spoiled one is refused (the parser never refuses the valid,
// nor accepts a known-invalid form). `make fuzz` runs each for a while; the
// corpus under testdata/fuzz is replayed by every plain `go test`.

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
		if !slices.Contains(spellings(rt), path) {
			t.Fatalf("parsePath(%q) = %+v, which is spelled %q", path, rt, spellings(rt))
		}
		checkRoundTrip(t, path, rt)
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

// FuzzBuiltPath builds a path of every route kind from the grammar (names
// per the OCI name regex, including components spelled like the route
// keywords, tags, sha256/sha512 digests, upload tokens), sometimes spoils
// its name in a way the grammar forbids, and checks the verdict both ways.
func FuzzBuiltPath(f *testing.F) {
	// The first byte picks the route kind, so each kind has a seed; the
	// longer seeds reach keyword components, long names and spoils.
	for k := range byte(8) {
		f.Add([]byte{k})
		f.Add([]byte{k, 0, 0, 1, 0, 7, 1, 2, 3, 4, 5, 6})
	}
	f.Add([]byte{2, 1, 1, 0, 3, 0, 0, 0, 1, 5, 0})
	f.Add([]byte{4, 3, 7, 79, 5, 2, 79, 1, 7, 79, 3, 2, 79, 0, 7, 79, 2, 1, 79, 0})
	f.Add(bytes.Repeat([]byte{0xff}, 64))
	f.Fuzz(func(t *testing.T, data []byte) {
		g := &gen{b: data}
		path, want, valid := g.routePath()
		rt, err := parsePath(path)
		if !valid {
			if err == nil {
				t.Fatalf("parsePath(%q) = %+v, want NAME_INVALID", path, rt)
			}
			if c := asError(err).Code; c != CodeNameInvalid {
				t.Fatalf("parsePath(%q) failed with %s, want NAME_INVALID", path, c.Value)
			}
			return
		}
		if err != nil {
			t.Fatalf("parsePath(%q) refused a path built from the grammar (%+v): %v", path, want, err)
		}
		if rt != want {
			t.Fatalf("parsePath(%q) = %+v, want %+v", path, rt, want)
		}
		checkRoundTrip(t, path, rt)
	})
}

// checkRoundTrip formats a parsed route back into a path and parses that:
// it must name the same route.
func checkRoundTrip(t *testing.T, path string, rt route) {
	t.Helper()
	again, err := parsePath(formatRoute(rt))
	if err != nil || again != rt {
		t.Fatalf("parsePath(%q) = %+v, but its path %q parses to %+v, %v", path, rt, formatRoute(rt), again, err)
	}
}

// formatRoute is the canonical path of a route.
func formatRoute(rt route) string {
	return spellings(rt)[0]
}

// spellings are the paths that name rt, canonical first: the base and the
// upload start may be written with or without a trailing slash.
func spellings(rt route) []string {
	base := "/v2/" + rt.name
	switch rt.kind {
	case routeBase:
		return []string{"/v2/", "/v2"}
	case routeCatalog:
		return []string{"/v2/_catalog"}
	case routeManifest:
		return []string{base + "/manifests/" + rt.ref}
	case routeBlob:
		return []string{base + "/blobs/" + rt.ref}
	case routeUploadStart:
		return []string{base + "/blobs/uploads/", base + "/blobs/uploads"}
	case routeUpload:
		return []string{base + "/blobs/uploads/" + rt.ref}
	case routeTags:
		return []string{base + "/tags/list"}
	case routeReferrers:
		return []string{base + "/referrers/" + rt.ref}
	}
	panic("unknown route kind")
}

// gen turns fuzz bytes into choices, so that mutating the bytes walks the
// grammar. When the bytes run out every choice is the first one.
type gen struct{ b []byte }

func (g *gen) intn(n int) int {
	if len(g.b) == 0 {
		return 0
	}
	c := g.b[0]
	g.b = g.b[1:]
	return int(c) % n
}

func (g *gen) oneOf(s ...string) string { return s[g.intn(len(s))] }

// chars returns min to max characters drawn from alphabet.
func (g *gen) chars(alphabet string, min, max int) string {
	b := make([]byte, min+g.intn(max-min+1))
	for i := range b {
		b[i] = alphabet[g.intn(len(alphabet))]
	}
	return string(b)
}

const (
	lowerAlnum = "abcdefghijklmnopqrstuvwxyz0123456789"
	tagFirst   = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"
	tagRest    = tagFirst + ".-"
	tokenChars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_."
)

// nameComponent follows [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*. A quarter are
// route keywords, which a name may hold; now and then the runs are long
// enough to take the name past 255 characters.
func (g *gen) nameComponent() string {
	if g.intn(4) == 0 {
		return g.oneOf("v2", "blobs", "uploads", "manifests", "tags", "list", "referrers", "catalog")
	}
	longest := 8
	if g.intn(8) == 0 {
		longest = 80
	}
	s := g.chars(lowerAlnum, 1, longest)
	for range g.intn(3) {
		s += g.oneOf(".", "_", "__", "-", "--", "---") + g.chars(lowerAlnum, 1, longest)
	}
	return s
}

func (g *gen) name() string {
	parts := make([]string, 1+g.intn(4))
	for i := range parts {
		parts[i] = g.nameComponent()
	}
	return strings.Join(parts, "/")
}

func (g *gen) tag() string {
	return g.chars(tagFirst, 1, 1) + g.chars(tagRest, 0, 127)
}

func (g *gen) digest() digest.Digest {
	alg := digest.SHA256
	if g.intn(3) == 0 {
		alg = digest.SHA512
	}
	return alg.FromString(g.chars(lowerAlnum, 0, 8))
}

// spoilName breaks the name grammar in one of the ways it forbids (a
// third of the time; choice 0, where exhausted bytes lead, spoils nothing),
// and says whether the result is still a valid name.
func (g *gen) spoilName(name string) (string, bool) {
	at := g.intn(len(name) + 1)
	switch g.intn(30) {
	case 1:
		return name[:at] + "A" + name[at:], false // upper case
	case 2:
		return name[:at] + "%2F" + name[at:], false // an escaped slash
	case 3:
		return name[:at] + g.oneOf("%61", "%2e", "%") + name[at:], false // any escape
	case 4:
		if pre, post := g.oneOf("/", ""), g.oneOf("/", ""); pre+post != "" {
			return pre + name + post, false // an empty first or last component
		}
	case 5:
		if strings.Contains(name, "/") {
			return strings.Replace(name, "/", "//", 1), false // an empty inner component
		}
	case 6:
		return g.oneOf(".", "_", "-", "__") + name, false // a component starting with a separator
	case 7:
		return name + g.oneOf(".", "_", "-") + "/x", false // a component ending with one
	case 8:
		return name + "___x", false // three underscores
	case 9:
		return name + "/..", false
	case 10:
		if len(name) < maxNameLength {
			return name + "/x" + strings.Repeat("y", maxNameLength-len(name)-1), false // 256 characters
		}
	}
	return name, len(name) <= maxNameLength
}

// routePath builds the path of a route of any kind and the route it must
// parse to; valid is false when the path was spoiled (or the name is longer
// than the spec allows) and must be refused.
func (g *gen) routePath() (path string, want route, valid bool) {
	want.kind = routeKind(1 + g.intn(8))
	switch want.kind {
	case routeBase:
		return g.oneOf("/v2/", "/v2"), want, true
	case routeCatalog:
		return "/v2/_catalog", want, true
	}
	want.name = g.name()
	var tail string
	switch want.kind {
	case routeManifest:
		want.ref = g.tag()
		if g.intn(2) == 0 {
			want.ref = g.digest().String()
		}
		tail = "manifests/" + want.ref
	case routeBlob:
		want.ref = g.digest().String()
		tail = "blobs/" + want.ref
	case routeUploadStart:
		tail = g.oneOf("blobs/uploads/", "blobs/uploads")
	case routeUpload:
		want.ref = g.chars(tokenChars, 1, 80)
		tail = "blobs/uploads/" + want.ref
	case routeTags:
		tail = "tags/list"
	case routeReferrers:
		want.ref = g.digest().String()
		tail = "referrers/" + want.ref
	}
	name, valid := g.spoilName(want.name)
	return "/v2/" + name + "/" + tail, want, valid
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

// FuzzBuiltManifest builds image manifests and indexes (OCI and Docker)
// from the image-spec's fields, driven by the fuzz bytes: any number of
// layers or children, non-distributable layers, subjects, artifact types,
// annotations, fields the registry does not know, the media type in the
// header, the body or both. A valid one must parse to exactly what it
// refers to; a spoiled one (one rule of the spec broken) must be refused.
func FuzzBuiltManifest(f *testing.F) {
	for k := range byte(4) {
		f.Add([]byte{k})
		f.Add([]byte{k, 1, 2, 3, 1, 0, 1, 2, 3, 4, 0, 1, 1, 2})
		f.Add([]byte{k, 3, 4, 1, 1, 1, 5, 1, 5, 1, 5, 1, 5, 0, 0, 1, 2, 0})
	}
	f.Add(bytes.Repeat([]byte{0xff}, 64))
	f.Fuzz(func(t *testing.T, data []byte) {
		g := &gen{b: data}
		m := g.manifest()
		p, err := parseManifest(m.contentType, m.body)
		if m.spoiled != "" {
			if err == nil {
				t.Fatalf("parseManifest accepted a manifest with %s (Content-Type %q):\n%s", m.spoiled, m.contentType, m.body)
			}
			if c := asError(err).Code; c != CodeManifestInvalid {
				t.Fatalf("parseManifest failed with %s, want MANIFEST_INVALID", c.Value)
			}
			return
		}
		if err != nil {
			t.Fatalf("parseManifest refused a valid manifest (Content-Type %q): %v\n%s", m.contentType, err, m.body)
		}
		w := m.want
		if p.mediaType != w.mediaType || p.subject != w.subject || p.artifactType != w.artifactType ||
			!slices.Equal(p.blobs, w.blobs) || !slices.Equal(p.manifests, w.manifests) || !maps.Equal(p.annotations, w.annotations) {
			t.Fatalf("parseManifest(%q) =\n%+v, want\n%+v\n%s", m.contentType, *p, w, m.body)
		}
	})
}

type builtManifest struct {
	contentType string
	body        []byte
	want        parsedManifest // when valid
	spoiled     string         // the rule broken, "" when valid
}

// Media types spelled out here rather than taken from the gateway's
// constants, so that a wrong constant shows.
var (
	imageTypes = []string{"application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"}
	indexTypes = []string{"application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"}
	layerTypes = []string{
		"application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.v1.tar+gzip",
		"application/vnd.oci.image.layer.v1.tar+zstd", "application/vnd.docker.image.rootfs.diff.tar.gzip",
		"application/octet-stream", "application/vnd.example.data.v1",
	}
	foreignTypes = []string{
		"application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
		"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
	}
	configTypes = []string{
		"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json",
		"application/vnd.oci.empty.v1+json", "application/vnd.example.sbom.v1+json",
	}
)

// descriptor is a JSON descriptor with an optional size, annotations and
// the fields the registry ignores (urls, platform, data).
func (g *gen) descriptor(mediaType string) map[string]any {
	d := map[string]any{"mediaType": mediaType, "digest": g.digest().String(), "size": g.intn(256) * 1021}
	switch g.intn(5) {
	case 1:
		d["annotations"] = g.annotations()
	case 2:
		d["urls"] = []string{"https://example.com/" + g.chars(lowerAlnum, 1, 8)}
	case 3:
		d["platform"] = map[string]any{"architecture": g.oneOf("amd64", "arm64", "s390x"), "os": "linux"}
	case 4:
		d["data"] = "e30=" // "{}"
	}
	return d
}

func (g *gen) annotations() map[string]string {
	a := map[string]string{}
	for range 1 + g.intn(3) {
		a["org.example."+g.chars(lowerAlnum, 1, 6)] = g.chars(tagRest, 0, 12)
	}
	return a
}

func (g *gen) manifest() builtManifest {
	var m builtManifest
	kind := g.intn(4)
	isIndex := kind >= 2
	mt := append(append([]string{}, imageTypes...), indexTypes...)[kind]
	m.want.mediaType = mt
	doc := map[string]any{"schemaVersion": 2}
	var descs []map[string]any // every descriptor, for spoiling one
	if isIndex {
		children := []map[string]any{}
		for range g.intn(5) {
			c := g.descriptor(g.oneOf(append(append([]string{}, imageTypes...), indexTypes...)...))
			children = append(children, c)
			m.want.manifests = append(m.want.manifests, c["digest"].(string))
		}
		doc["manifests"] = children
		descs = append(descs, children...)
	} else {
		config := g.descriptor(g.oneOf(configTypes...))
		doc["config"] = config
		m.want.blobs = []string{config["digest"].(string)}
		m.want.artifactType = config["mediaType"].(string)
		descs = append(descs, config)
		layers := []map[string]any{}
		for range g.intn(5) {
			foreign := g.intn(4) == 0
			l := g.descriptor(g.oneOf(layerTypes...))
			if foreign {
				l = g.descriptor(g.oneOf(foreignTypes...))
			} else {
				m.want.blobs = append(m.want.blobs, l["digest"].(string))
			}
			layers = append(layers, l)
		}
		if len(layers) > 0 || g.intn(2) == 0 {
			doc["layers"] = layers
		}
		descs = append(descs, layers...)
	}
	if g.intn(3) == 0 {
		s := g.descriptor(g.oneOf(imageTypes...))
		doc["subject"] = s
		m.want.subject = s["digest"].(string)
		descs = append(descs, s)
	}
	if g.intn(3) == 0 {
		m.want.artifactType = "application/vnd.example." + g.chars(lowerAlnum, 1, 8) + ".v1"
		doc["artifactType"] = m.want.artifactType
	}
	if g.intn(3) == 0 {
		m.want.annotations = g.annotations()
		doc["annotations"] = m.want.annotations
	}
	if g.intn(4) == 0 {
		doc["org.example.custom"] = map[string]any{"kept": true} // unknown fields are allowed
	}
	// The media type: in the header, the body, or both; a header may carry
	// parameters.
	switch g.intn(4) {
	case 0:
		m.contentType, doc["mediaType"] = mt, mt
	case 1:
		m.contentType = mt
	case 2:
		doc["mediaType"] = mt
	case 3:
		m.contentType, doc["mediaType"] = mt+"; charset=utf-8", mt
	}
	m.spoiled = g.spoilManifest(&m, doc, descs, isIndex)
	body, err := json.Marshal(doc)
	if err != nil {
		panic(err)
	}
	m.body = body
	if m.spoiled == "truncated JSON" {
		m.body = body[:len(body)-1-g.intn(len(body))]
	}
	return m
}

// spoilManifest breaks one rule of the spec (a third of the time; choice 0,
// where exhausted bytes lead, breaks nothing) and says which.
func (g *gen) spoilManifest(m *builtManifest, doc map[string]any, descs []map[string]any, isIndex bool) string {
	var d map[string]any
	if len(descs) > 0 {
		d = descs[g.intn(len(descs))]
	}
	switch g.intn(36) {
	case 1:
		doc["schemaVersion"] = []int{1, 3}[g.intn(2)]
		return "schemaVersion other than 2"
	case 2:
		delete(doc, "schemaVersion")
		return "no schemaVersion"
	case 3:
		if isIndex {
			doc["layers"] = []any{}
			return "an index with layers"
		}
		delete(doc, "config")
		return "an image without config"
	case 4:
		if isIndex {
			doc["config"] = map[string]any{"mediaType": configTypes[0], "digest": digest.FromString("c").String(), "size": 2}
			return "an index with a config"
		}
		doc["manifests"] = []any{}
		return "an image with a manifests list"
	case 5:
		if d != nil {
			d["digest"] = g.oneOf("sha256:abc", "sha256:"+strings.Repeat("G", 64), "md5:d41d8cd98f00b204e9800998ecf8427e", "", digest.FromString("x").Hex())
			return "a descriptor with an invalid digest"
		}
	case 6:
		if d != nil {
			d["size"] = -1 - g.intn(100)
			return "a descriptor with a negative size"
		}
	case 7:
		if d != nil {
			delete(d, "mediaType")
			return "a descriptor without mediaType"
		}
	case 8:
		other := g.oneOf(append(append([]string{}, imageTypes...), indexTypes...)...)
		if other != m.want.mediaType {
			m.contentType, doc["mediaType"] = m.want.mediaType, other
			return "a mediaType that contradicts the Content-Type"
		}
	case 9:
		m.contentType = ""
		delete(doc, "mediaType")
		return "no media type at all"
	case 10:
		m.contentType = g.oneOf("application/json", "application/vnd.oci.image.config.v1+json", "text/plain", "application/vnd.docker.distribution.manifest.v1+json")
		delete(doc, "mediaType")
		return "an unsupported media type"
	case 11:
		m.contentType = g.oneOf("; =", "application/vnd.oci.image.manifest.v1+json; =", "/")
		return "a malformed Content-Type"
	case 12:
		return "truncated JSON"
	}
	return ""
}
