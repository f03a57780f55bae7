package meridianpb

import (
	"path"
	"strings"
)

// MatchRepository reports whether a repository pattern (of a grant or an
// immutability rule) covers repo. "" and "*" cover every repository; a
// pattern with '*', '?' or '[' is a glob (path.Match: '*' stays within one
// path component); anything else is a prefix of whole path components
// ("team/app" covers "team/app" and "team/app/web", not "team/apple").
func MatchRepository(pattern, repo string) bool {
	pattern = strings.TrimSuffix(pattern, "/")
	switch {
	case pattern == "" || pattern == "*":
		return true
	case strings.ContainsAny(pattern, "*?["):
		ok, err := path.Match(pattern, repo)
		return err == nil && ok
	default:
		return repo == pattern || strings.HasPrefix(repo, pattern+"/")
	}
}

// ValidGlob reports whether a pattern parses as a path.Match glob.
func ValidGlob(pattern string) bool {
	_, err := path.Match(pattern, "")
	return err == nil
}

// Covers reports whether the rule makes tag of repo immutable.
func (r *ImmutableRule) Covers(repo, tag string) bool {
	if !MatchRepository(r.Repositories, repo) {
		return false
	}
	ok, err := path.Match(r.Tags, tag)
	return err == nil && ok
}

// Describe names the rule in refusals.
func (r *ImmutableRule) Describe() string {
	repos := r.Repositories
	if repos == "" {
		repos = "*"
	}
	return "repositories " + repos + " tags " + r.Tags
}
