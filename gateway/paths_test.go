package gateway

import (
	"math/rand/v2"
	"regexp"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
)

var (
	sha256Sample = digest.FromString("meridian").String()
	sha512Sample = digest.SHA512.FromString("meridian").String()
)

func TestParsePath(t *testing.T) {
	long := strings.Repeat("a", maxNameLength)
	tests := []struct {
		path string
		want route // zero kind: the path must be refused
	}{
		// Every endpoint.
		{"/v2/", route{kind: routeBase}},
		{"/v2", route{kind: routeBase}},
		{"/v2/_catalog", route{kind: routeCatalog}},
		{"/v2/library/alpine/manifests/latest", route{routeManifest, "library/alpine", "latest"}},
		{"/v2/alpine/manifests/" + sha256Sample, route{routeManifest, "alpine", sha256Sample}},
		{"/v2/alpine/blobs/" + sha512Sample, route{routeBlob, "alpine", sha512Sample}},
		{"/v2/alpine/blobs/uploads/", route{routeUploadStart, "alpine", ""}},
		{"/v2/alpine/blobs/uploads", route{routeUploadStart, "alpine", ""}},
		{"/v2/alpine/blobs/uploads/tok.sig", route{routeUpload, "alpine", "tok.sig"}},
		{"/v2/alpine/tags/list", route{routeTags, "alpine", ""}},
		{"/v2/alpine/referrers/" + sha256Sample, route{routeReferrers, "alpine", sha256Sample}},

		// Names whose components are endpoint words: routing reads from the right.
		{"/v2/a/blobs/uploads/blobs/uploads/", route{routeUploadStart, "a/blobs/uploads", ""}},
		{"/v2/a/blobs/uploads/blobs/uploads", route{routeUploadStart, "a/blobs/uploads", ""}},
		{"/v2/a/blobs/uploads/blobs/uploads/tok", route{routeUpload, "a/blobs/uploads", "tok"}},
		{"/v2/blobs/manifests/manifests/latest", route{routeManifest, "blobs/manifests", "latest"}},
		{"/v2/manifests/blobs/" + sha256Sample, route{routeBlob, "manifests", sha256Sample}},
		{"/v2/tags/list/tags/list", route{routeTags, "tags/list", ""}},
		{"/v2/tags/manifests/list", route{routeManifest, "tags", "list"}},
		{"/v2/uploads/referrers/referrers/" + sha256Sample, route{routeReferrers, "uploads/referrers", sha256Sample}},
		{"/v2/blobs/blobs/blobs", route{routeBlob, "blobs", "blobs"}},
		{"/v2/" + long + "/tags/list", route{routeTags, long, ""}},

		// Paths that name no endpoint, or no repository.
		{"", route{}},
		{"/", route{}},
		{"/v1/alpine/manifests/latest", route{}},
		{"/v2x/alpine/manifests/latest", route{}},
		{"/v2/_catalog/", route{}},
		{"/v2/alpine", route{}},
		{"/v2/alpine/", route{}},
		{"/v2/alpine/tags", route{}},
		{"/v2/alpine/tags/list/", route{}},
		{"/v2/alpine/blobs/uploads/tok/extra", route{}},
		{"/v2/blobs/uploads/", route{}},
		{"/v2/blobs/uploads", route{}},
		{"/v2/manifests/latest", route{}},
		{"/v2/tags/list", route{}},

		// Empty references.
		{"/v2/alpine/manifests/", route{}},
		{"/v2/alpine/blobs/", route{}},
		{"/v2/alpine/referrers/", route{}},

		// Hostile input.
		{"/v2/a/../b/manifests/latest", route{}},
		{"/v2/../manifests/latest", route{}},
		{"/v2/a/./b/manifests/latest", route{}},
		{"/v2/a%2Fb/manifests/latest", route{}},
		{"/v2/a%2fb/manifests/latest", route{}},
		{"/v2/a/manifests/lat%65st", route{}},
		{"/v2/a/blobs/sha256%3A" + strings.Repeat("0", 64), route{}},
		{"/v2/a/blobs/uploads/tok%2E", route{}},
		{"/v2/%61/tags/list", route{}},
		{"/v2/a/manifests/%", route{}},
		{"/v2/a//b/manifests/latest", route{}},
		{"/v2//a/manifests/latest", route{}},
		{"/v2/a//manifests/latest", route{}},
		{"/v2/a/manifests//latest", route{}},
		{"/v2/a/blobs/uploads//", route{}},
		{"/v2/Alpine/manifests/latest", route{}},
		{"/v2/library/Alpine/tags/list", route{}},
		{"/v2/" + long + "a/tags/list", route{}},
		{"/v2/" + long + "/" + long + "/tags/list", route{}},
		{"/v2/-a/tags/list", route{}},
		{"/v2/a-/tags/list", route{}},
		{"/v2/a b/tags/list", route{}},
		{"/v2/a\x00b/tags/list", route{}},
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			got, err := parsePath(tt.path)
			if tt.want.kind == 0 {
				if err == nil {
					t.Fatalf("parsePath accepted %q as %+v", tt.path, got)
				}
				if e := asError(err); e.Code != CodeNameInvalid {
					t.Errorf("error code = %s, want NAME_INVALID (400)", e.Code.Value)
				}
				return
			}
			if err != nil {
				t.Fatalf("parsePath(%q): %v", tt.path, err)
			}
			if got != tt.want {
				t.Errorf("parsePath(%q) = %+v, want %+v", tt.path, got, tt.want)
			}
		})
	}
}

func TestValidateName(t *testing.T) {
	tests := []struct {
		name string
		ok   bool
	}{
		{"a", true},
		{"library/alpine", true},
		{"a/b/c/d/e", true},
		{"a.b", true},
		{"a_b", true},
		{"a__b", true},
		{"a-b", true},
		{"a---b", true},
		{"0", true},
		{"blobs/uploads/manifests", true},
		{strings.Repeat("a", 255), true},
		{strings.Repeat("a/", 127) + "a", true},
		{"", false},
		{strings.Repeat("a", 256), false},
		{strings.Repeat("a/", 127) + "ab", false},
		{"A", false},
		{"library/Alpine", false},
		{"a___b", false},
		{"a..b", false},
		{"a._b", false},
		{".a", false},
		{"a.", false},
		{"-a", false},
		{"a-", false},
		{"_a", false},
		{"a/", false},
		{"/a", false},
		{"a//b", false},
		{"a/../b", false},
		{"..", false},
		{"a:b", false},
		{"a@b", false},
		{"a b", false},
		{"ä", false},
		{"a\nb", false},
		{"a\n", false},
	}
	for _, tt := range tests {
		t.Run(truncate(tt.name, 20), func(t *testing.T) {
			err := validateName(tt.name)
			if (err == nil) != tt.ok {
				t.Fatalf("validateName(%q) = %v, want ok=%v", tt.name, err, tt.ok)
			}
			if err != nil && asError(err).Code != CodeNameInvalid {
				t.Errorf("code = %s, want NAME_INVALID", asError(err).Code.Value)
			}
		})
	}
}

func TestValidateTag(t *testing.T) {
	tests := []struct {
		tag string
		ok  bool
	}{
		{"latest", true},
		{"v1.2.3", true},
		{"V1-rc_2", true},
		{"_", true},
		{"0", true},
		{"a..b--c__d", true},
		{strings.Repeat("t", 128), true},
		{"_" + strings.Repeat(".", 127), true},
		{strings.Repeat("t", 129), false},
		{"", false},
		{".hidden", false},
		{"-flag", false},
		{"a:b", false},
		{"a/b", false},
		{"a b", false},
		{"a+b", false},
		{"a@b", false},
		{"ü", false},
		{"latest\n", false},
		{sha256Sample, false},
	}
	for _, tt := range tests {
		t.Run(truncate(tt.tag, 20), func(t *testing.T) {
			err := validateTag(tt.tag)
			if (err == nil) != tt.ok {
				t.Fatalf("validateTag(%q) = %v, want ok=%v", tt.tag, err, tt.ok)
			}
			if err != nil && asError(err).Code.Status != 400 {
				t.Errorf("status = %d, want 400", asError(err).Code.Status)
			}
		})
	}
}

func TestParseDigest(t *testing.T) {
	hex64 := strings.Repeat("ab", 32)
	tests := []struct {
		in string
		ok bool
	}{
		{sha256Sample, true},
		{sha512Sample, true},
		{"sha256:" + hex64, true},
		{"sha256:" + hex64[:63], false},
		{"sha256:" + hex64 + "a", false},
		{"sha256:" + strings.ToUpper(hex64), false},
		{"SHA256:" + hex64, false},
		{"sha512:" + hex64, false},
		{"sha384:" + strings.Repeat("ab", 48), false},
		{"md5:" + strings.Repeat("ab", 16), false},
		{"blake3:" + hex64, false},
		{"sha256:baddigeststring", false},
		{"sha256:" + strings.Repeat("g", 64), false},
		{"sha256:" + hex64 + "\n", false},
		{" sha256:" + hex64, false},
		{"sha256:", false},
		{":" + hex64, false},
		{hex64, false},
		{"", false},
	}
	for _, tt := range tests {
		t.Run(truncate(tt.in, 24), func(t *testing.T) {
			d, err := parseDigest(tt.in)
			if (err == nil) != tt.ok {
				t.Fatalf("parseDigest(%q) = %v, want ok=%v", tt.in, err, tt.ok)
			}
			if err != nil {
				if c := asError(err).Code; c != CodeDigestInvalid {
					t.Errorf("code = %s, want DIGEST_INVALID", c.Value)
				}
				return
			}
			if d.String() != tt.in {
				t.Errorf("parseDigest(%q) = %q, want it unchanged", tt.in, d)
			}
		})
	}
}

func TestIsDigestRef(t *testing.T) {
	for ref, want := range map[string]bool{
		"latest":                 false,
		sha256Sample:             true,
		"sha256:baddigeststring": true,
		"v1.0":                   false,
	} {
		if got := isDigestRef(ref); got != want {
			t.Errorf("isDigestRef(%q) = %v, want %v", ref, got, want)
		}
	}
}

// The hand-written name and tag checks accept exactly what the spec's
// regular expressions accept: random strings over an alphabet of every
// character class the grammar treats apart, and every short one.
func TestNameAndTagGrammar(t *testing.T) {
	nameRE := regexp.MustCompile(`^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*$`)
	tagRE := regexp.MustCompile(`^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$`)
	const alphabet = "a9Z._-/:%"
	check := func(s string) {
		if got, want := validName(s), nameRE.MatchString(s); got != want {
			t.Errorf("validName(%q) = %v, the grammar says %v", s, got, want)
		}
		if got, want := validTag(s), tagRE.MatchString(s); got != want {
			t.Errorf("validTag(%q) = %v, the grammar says %v", s, got, want)
		}
	}
	// Every string of up to 5 characters.
	var all func(prefix string, n int)
	all = func(prefix string, n int) {
		check(prefix)
		if n == 0 {
			return
		}
		for i := range len(alphabet) {
			all(prefix+alphabet[i:i+1], n-1)
		}
	}
	all("", 5)
	rng := rand.New(rand.NewPCG(1, 2))
	for range 50000 {
		b := make([]byte, rng.IntN(140))
		for i := range b {
			b[i] = alphabet[rng.IntN(len(alphabet))]
		}
		check(string(b))
	}
	for _, s := range []string{strings.Repeat("a", 128), strings.Repeat("a", 129), "_" + strings.Repeat("b", 127), "library/ubuntu", "a__b", "a___b", "a--b", "a-.b", "a/", "/a", "a//b"} {
		check(s)
	}
}
