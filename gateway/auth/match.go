package auth

import (
	"path"
	"strings"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// Matches reports whether a grant's repository pattern covers repo; see
// meridianpb.MatchRepository, which immutability rules share.
func Matches(pattern, repo string) bool { return pb.MatchRepository(pattern, repo) }

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
