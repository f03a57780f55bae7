package gateway

import (
	"strings"

	"github.com/opencontainers/go-digest"
)

// routeKind says which API endpoint a path addresses.
type routeKind int

const (
	routeBase routeKind = iota + 1
	routeCatalog
	routeManifest
	routeBlob
	routeUploadStart
	routeUpload
	routeTags
	routeReferrers
)

func (k routeKind) String() string {
	return [...]string{"", "base", "catalog", "manifest", "blob", "upload_start", "upload", "tags", "referrers"}[k]
}

// route is a parsed /v2/ path.
type route struct {
	kind routeKind
	name string // repository
	ref  string // tag or digest, blob digest, or upload token
}

const (
	maxNameLength = 255
	maxTagLength  = 128
)

// The spec's grammar, which validName and validTag implement by hand: every
// request checks a name and most a tag, and a regexp costs more than the
// rest of a manifest GET's parsing (paths_test.go checks them against
// these).
//
//	name: ^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*$
//	tag:  ^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$

// validName reports whether name matches the name grammar (length aside).
func validName(name string) bool {
	if name == "" {
		return false
	}
	for len(name) > 0 {
		comp, rest, more := strings.Cut(name, "/")
		if !validNameComponent(comp) || more && rest == "" {
			return false
		}
		name = rest
	}
	return true
}

// validNameComponent: runs of [a-z0-9] joined by ".", "_", "__" or "-+".
func validNameComponent(c string) bool {
	i := 0
	for {
		start := i
		for i < len(c) && (c[i] >= 'a' && c[i] <= 'z' || c[i] >= '0' && c[i] <= '9') {
			i++
		}
		switch {
		case i == start:
			return false
		case i == len(c):
			return true
		}
		switch c[i] {
		case '.':
			i++
		case '_':
			i++
			if i < len(c) && c[i] == '_' {
				i++
			}
		case '-':
			for i < len(c) && c[i] == '-' {
				i++
			}
		default:
			return false
		}
	}
}

func validTag(tag string) bool {
	if len(tag) == 0 || len(tag) > maxTagLength || tag[0] == '.' || tag[0] == '-' {
		return false
	}
	for i := 0; i < len(tag); i++ {
		c := tag[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '.' || c == '-') {
			return false
		}
	}
	return true
}

// parsePath parses the escaped path of a /v2/ request. It works from the
// right end, since names may contain "blobs", "uploads" or "manifests".
// Percent-escapes are never valid in any component (this refuses %2F
// smuggled into a name), nor are empty components.
func parsePath(escaped string) (route, error) {
	if escaped == "/v2/" || escaped == "/v2" {
		return route{kind: routeBase}, nil
	}
	if escaped == "/v2/_catalog" {
		return route{kind: routeCatalog}, nil
	}
	rest, ok := strings.CutPrefix(escaped, "/v2/")
	if !ok {
		return route{}, errorf(CodeNameInvalid, "not an API path")
	}
	if strings.Contains(rest, "%") {
		return route{}, errorf(CodeNameInvalid, "escaped characters are not allowed in the path")
	}
	parts := strings.Split(rest, "/")
	n := len(parts)
	var r route
	var nameParts []string
	switch {
	case n >= 4 && parts[n-3] == "blobs" && parts[n-2] == "uploads" && parts[n-1] == "":
		r, nameParts = route{kind: routeUploadStart}, parts[:n-3]
	case n >= 3 && parts[n-2] == "blobs" && parts[n-1] == "uploads":
		r, nameParts = route{kind: routeUploadStart}, parts[:n-2]
	case n >= 4 && parts[n-3] == "blobs" && parts[n-2] == "uploads":
		r, nameParts = route{kind: routeUpload, ref: parts[n-1]}, parts[:n-3]
	case n >= 3 && parts[n-2] == "blobs":
		r, nameParts = route{kind: routeBlob, ref: parts[n-1]}, parts[:n-2]
	case n >= 3 && parts[n-2] == "manifests":
		r, nameParts = route{kind: routeManifest, ref: parts[n-1]}, parts[:n-2]
	case n >= 3 && parts[n-2] == "tags" && parts[n-1] == "list":
		r, nameParts = route{kind: routeTags}, parts[:n-2]
	case n >= 3 && parts[n-2] == "referrers":
		r, nameParts = route{kind: routeReferrers, ref: parts[n-1]}, parts[:n-2]
	default:
		return route{}, errorf(CodeNameInvalid, "unknown API path")
	}
	r.name = strings.Join(nameParts, "/")
	if err := validateName(r.name); err != nil {
		return route{}, err
	}
	if r.ref == "" && (r.kind == routeUpload || r.kind == routeBlob || r.kind == routeManifest || r.kind == routeReferrers) {
		return route{}, errorf(CodeNameInvalid, "empty reference in path")
	}
	return r, nil
}

// validateName checks a repository name against the spec's grammar.
func validateName(name string) error {
	if name == "" || len(name) > maxNameLength || !validName(name) {
		return errorf(CodeNameInvalid, "invalid repository name %q", truncate(name, 300))
	}
	return nil
}

// validateTag checks a tag against the spec's grammar.
func validateTag(tag string) error {
	if !validTag(tag) {
		return errorf(CodeManifestInvalid, "invalid tag %q", truncate(tag, 200))
	}
	return nil
}

// parseDigest accepts sha256 and sha512 digests in canonical form.
func parseDigest(s string) (digest.Digest, error) {
	d, err := digest.Parse(s)
	if err != nil || (d.Algorithm() != digest.SHA256 && d.Algorithm() != digest.SHA512) {
		return "", errorf(CodeDigestInvalid, "invalid or unsupported digest %q", truncate(s, 200))
	}
	return d, nil
}

// ValidateName, ValidateTag and ParseDigest are the spec's grammar for
// repository names, tags and digests, for nodes that validate the
// commands they commit.
func ValidateName(name string) error { return validateName(name) }

// ValidateTag checks a tag; see ValidateName.
func ValidateTag(tag string) error { return validateTag(tag) }

// ParseDigest accepts canonical sha256 and sha512 digests; see ValidateName.
func ParseDigest(s string) (digest.Digest, error) { return parseDigest(s) }

// isDigestRef tells a manifest reference that is a digest from a tag: tags
// cannot contain ':'.
func isDigestRef(ref string) bool { return strings.Contains(ref, ":") }

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
