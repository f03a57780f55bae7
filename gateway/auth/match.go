package auth

import (
	"path"
	"strings"
)

// Matches reports whether a grant's repository pattern covers repo. ""
// and "*" cover every repository; a pattern with '*', '?' or '[' is a
// glob (path.Match: '*' stays within one path component); anything else
// is a prefix of whole path components ("team/app" covers "team/app" and
// "team/app/web", not "team/apple").
func Matches(pattern, repo string) bool {
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

// ValidPattern reports whether pattern is a usable grant pattern.
func ValidPattern(pattern string) bool {
	if strings.ContainsAny(pattern, "*?[") {
		_, err := path.Match(pattern, "")
		return err == nil
	}
	return true
}

// Actions a grant may give.
var Actions = []string{"pull", "push", "delete", "admin"}

// ValidAction reports whether a is one of Actions.
func ValidAction(a string) bool {
	for _, x := range Actions {
		if a == x {
			return true
		}
	}
	return false
}
