package auth

import (
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"fmt"
	"slices"
	"strings"
	"time"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// RobotPrefix starts the login name of a robot account.
const RobotPrefix = "robot+"

// Principal kinds, as they appear in audit records and token subjects.
const (
	KindUser      = "user"
	KindRobot     = "robot"
	KindExternal  = "external"
	Anonymous     = "anonymous"
	anonymousSubj = "anonymous"
)

// state is one version of the access state, indexed for lookups.
type state struct {
	version uint64
	service string
	users   map[string]*pb.User
	robots  map[string]*pb.Robot
	teamsOf map[string][]string    // user → teams
	grants  map[string][]*pb.Grant // subject → grants
	keys    map[string]*signingKey // kid → key
	signing *signingKey            // newest
	tokens  *tokenCache            // tokens verified against this state
}

type signingKey struct {
	id      string
	private *ecdsa.PrivateKey
}

func newState(st *pb.AccessState) (*state, error) {
	s := &state{
		version: st.GetVersion(),
		service: st.GetClusterId(),
		users:   map[string]*pb.User{},
		robots:  map[string]*pb.Robot{},
		teamsOf: map[string][]string{},
		grants:  map[string][]*pb.Grant{},
		keys:    map[string]*signingKey{},
		tokens:  &tokenCache{},
	}
	for _, u := range st.GetUsers() {
		s.users[u.Name] = u
	}
	for _, r := range st.GetRobots() {
		s.robots[r.Name] = r
	}
	for _, t := range st.GetTeams() {
		for _, m := range t.Members {
			s.teamsOf[m] = append(s.teamsOf[m], t.Name)
		}
	}
	for _, g := range st.GetGrants() {
		s.grants[g.Subject] = append(s.grants[g.Subject], g)
	}
	for _, k := range st.GetTokenKeys().GetKeys() {
		priv, err := x509.ParsePKCS8PrivateKey(k.PrivateKey)
		if err != nil {
			return nil, fmt.Errorf("token key %s: %w", k.Id, err)
		}
		ec, ok := priv.(*ecdsa.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("token key %s: not an ECDSA key", k.Id)
		}
		sk := &signingKey{id: k.Id, private: ec}
		s.keys[k.Id] = sk
		s.signing = sk
	}
	return s, nil
}

// granted reports whether any grant of subject covers action on repo.
func (s *state) granted(subject, repo, action string) bool {
	for _, g := range s.grants[subject] {
		if Matches(g.Prefix, repo) && slices.Contains(g.Actions, action) {
			return true
		}
	}
	return false
}

// can reports whether principal may do action on repo now. Everyone may
// do what anonymous may; a user also what its grants and its teams' give;
// a robot what its scopes give while it is neither revoked nor expired.
func (s *state) can(principal, repo, action string, now time.Time) bool {
	if s.granted(anonymousSubj, repo, action) && s.alive(principal, now) {
		return true
	}
	kind, name, _ := strings.Cut(principal, ":")
	switch kind {
	case KindUser:
		if _, ok := s.users[name]; !ok {
			return false
		}
		if s.granted(principal, repo, action) {
			return true
		}
		for _, t := range s.teamsOf[name] {
			if s.granted("team:"+t, repo, action) {
				return true
			}
		}
	case KindRobot:
		r := s.robots[name]
		if r == nil || !robotUsable(r, now) {
			return false
		}
		for _, sc := range r.Scopes {
			if Matches(sc.Prefix, repo) && slices.Contains(sc.Actions, action) {
				return true
			}
		}
	}
	return false
}

// alive reports whether principal still exists (and, for a robot, may log
// in): a deleted user's token grants not even anonymous access beyond what
// anonymous callers get without it.
func (s *state) alive(principal string, now time.Time) bool {
	kind, name, _ := strings.Cut(principal, ":")
	switch kind {
	case KindUser:
		_, ok := s.users[name]
		return ok
	case KindRobot:
		r := s.robots[name]
		return r != nil && robotUsable(r, now)
	}
	return true
}

// issuedBefore reports whether a token issued at iat predates the
// account's current credentials: a password change, or a robot or user
// created again under the same name, ends the tokens issued before.
// Token times have whole seconds, so the comparison is on seconds.
func (s *state) issuedBefore(principal string, iat time.Time) bool {
	kind, name, _ := strings.Cut(principal, ":")
	var since int64
	switch kind {
	case KindUser:
		if u := s.users[name]; u != nil {
			since = u.UpdatedUnixNano
		}
	case KindRobot:
		if r := s.robots[name]; r != nil {
			since = r.CreatedUnixNano
		}
	}
	return iat.Unix() < time.Unix(0, since).Unix()
}

func robotUsable(r *pb.Robot, now time.Time) bool {
	return !r.Revoked && (r.ExpiresUnixNano == 0 || now.UnixNano() < r.ExpiresUnixNano)
}

// checkRobotSecret compares the SHA-256 of secret with the stored hash in
// constant time.
func checkRobotSecret(r *pb.Robot, secret string) bool {
	sum := sha256.Sum256([]byte(secret))
	return subtle.ConstantTimeCompare(sum[:], r.SecretHash) == 1
}

// HashRobotSecret is what the state stores of a robot's secret.
func HashRobotSecret(secret string) []byte {
	sum := sha256.Sum256([]byte(secret))
	return sum[:]
}
