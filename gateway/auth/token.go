package auth

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/meridian-registry/meridian/gateway"
)

// catalogScope asks for a token that lists the catalog (as Distribution
// names it).
const catalogScope = "registry:catalog:*"

// catalogKey marks a token's catalog scope in its access map; no
// repository name contains a space.
const catalogKey = "registry catalog"

// Token kinds, in the "use" claim: access tokens carry none.
const useRefresh = "refresh"

// accessEntry is one element of a token's access claim (distribution
// token spec).
type accessEntry struct {
	Type    string   `json:"type"`
	Name    string   `json:"name"`
	Actions []string `json:"actions"`
}

type claims struct {
	jwt.RegisteredClaims
	Access []accessEntry `json:"access,omitempty"`
	Use    string        `json:"use,omitempty"`
}

// Issuer is the iss claim of tokens the cluster signs.
func issuer(service string) string { return "meridian/" + service }

// scope is one parsed scope parameter.
type scope struct {
	typ, name string
	actions   []string
}

// parseScopes reads "repository:NAME:pull,push" scopes; scopes of other
// types are skipped, as the spec allows for what a server does not know.
func parseScopes(raw []string) []scope {
	var out []scope
	for _, r := range raw {
		for _, one := range strings.Fields(r) {
			typ, rest, ok := strings.Cut(one, ":")
			i := strings.LastIndex(rest, ":")
			if one == catalogScope {
				out = append(out, scope{typ: "registry", name: "catalog", actions: []string{"*"}})
				continue
			}
			if !ok || i <= 0 || typ != "repository" {
				continue
			}
			out = append(out, scope{typ: typ, name: rest[:i], actions: strings.Split(rest[i+1:], ",")})
		}
	}
	return out
}

// grantScopes is the intersection of what was asked and what principal
// may do now.
func (a *Authority) grantScopes(s *state, principal string, asked []scope) []accessEntry {
	now := a.cfg.Now()
	access := []accessEntry{}
	for _, sc := range asked {
		if sc.typ == "registry" {
			// Listing the catalog: it shows only what the account may pull.
			access = append(access, accessEntry{Type: sc.typ, Name: sc.name, Actions: sc.actions})
			continue
		}
		e := accessEntry{Type: sc.typ, Name: sc.name, Actions: []string{}}
		for _, act := range sc.actions {
			if ValidAction(act) && s.can(principal, sc.name, act, now) && !slices.Contains(e.Actions, act) {
				e.Actions = append(e.Actions, act)
			}
		}
		access = append(access, e)
	}
	return access
}

func (a *Authority) sign(s *state, c *claims) (string, error) {
	if s.signing == nil {
		return "", &gateway.Error{Code: gateway.CodeUnavailable, Detail: errNoKey.Error()}
	}
	t := jwt.NewWithClaims(jwt.SigningMethodES256, c)
	t.Header["kid"] = s.signing.id
	return t.SignedString(s.signing.private)
}

func newClaims(s *state, principal string, now time.Time, ttl time.Duration) *claims {
	id := make([]byte, 16)
	rand.Read(id)
	return &claims{RegisteredClaims: jwt.RegisteredClaims{
		Issuer:    issuer(s.service),
		Subject:   principal,
		Audience:  jwt.ClaimStrings{s.service},
		ExpiresAt: jwt.NewNumericDate(now.Add(ttl)),
		NotBefore: jwt.NewNumericDate(now),
		IssuedAt:  jwt.NewNumericDate(now),
		ID:        hex.EncodeToString(id),
	}}
}

// parse verifies a token of the cluster's own ring: ES256 only (no
// "none", no HMAC with a public key), a kid of the ring, this cluster as
// audience and issuer, and its times within the leeway.
func (a *Authority) parse(s *state, raw string) (*claims, error) {
	c := &claims{}
	_, err := jwt.ParseWithClaims(raw, c, func(t *jwt.Token) (any, error) {
		kid, _ := t.Header["kid"].(string)
		k := s.keys[kid]
		if k == nil {
			return nil, fmt.Errorf("unknown signing key %q", kid)
		}
		return &k.private.PublicKey, nil
	},
		jwt.WithValidMethods([]string{jwt.SigningMethodES256.Alg()}),
		jwt.WithAudience(s.service),
		jwt.WithIssuer(issuer(s.service)),
		jwt.WithLeeway(a.cfg.Leeway),
		jwt.WithExpirationRequired(),
		jwt.WithTimeFunc(a.cfg.Now),
	)
	if err != nil {
		return nil, err
	}
	return c, nil
}

// verifyBearer checks a bearer token: the cluster's own, or an external
// issuer's.
func (a *Authority) verifyBearer(s *state, raw string) (gateway.Caller, error) {
	if ext := a.externalFor(raw); ext != nil {
		c, err := ext.verify(raw, a.cfg.Leeway, a.cfg.Now)
		if err != nil {
			return nil, errUnauthorized("invalid token: " + err.Error())
		}
		return &caller{a: a, principal: KindExternal + ":" + ext.Issuer + "/" + c.Subject, token: accessMap(c.Access), external: true}, nil
	}
	now := a.cfg.Now()
	v, ok := s.tokens.get(raw, now, a.cfg.Leeway)
	if !ok {
		c, err := a.parse(s, raw)
		if err != nil {
			return nil, errUnauthorized("invalid token: " + err.Error())
		}
		if c.Use != "" {
			return nil, errUnauthorized("a refresh token is not an access token")
		}
		if c.IssuedAt == nil {
			return nil, errUnauthorized("invalid token: no iat")
		}
		v = verifiedToken{principal: c.Subject, access: accessMap(c.Access), expires: c.ExpiresAt.Time, issued: c.IssuedAt.Time}
		s.tokens.put(raw, v)
	}
	if !s.alive(v.principal, now) || s.issuedBefore(v.principal, v.issued) {
		return nil, errUnauthorized("the token's account no longer exists, was revoked or changed its credentials")
	}
	return &caller{a: a, principal: v.principal, anonymous: v.principal == Anonymous, token: v.access}, nil
}

// verifiedToken is what a checked token says, kept so that the signature
// of a token used on every request is checked once. The account's grants
// are still checked on every request.
type verifiedToken struct {
	principal string
	access    map[string][]string
	expires   time.Time
	issued    time.Time
}

// tokenCache holds verified tokens of one access state: a new state (a new
// key ring among other things) starts with an empty cache. Keys are SHA-256
// sums of the tokens.
type tokenCache struct {
	mu sync.RWMutex
	m  map[[32]byte]verifiedToken
}

// maxCachedTokens bounds the cache; when full it starts over.
const maxCachedTokens = 16384

func (c *tokenCache) get(raw string, now time.Time, leeway time.Duration) (verifiedToken, bool) {
	k := sha256.Sum256([]byte(raw))
	c.mu.RLock()
	v, ok := c.m[k]
	c.mu.RUnlock()
	if ok && now.After(v.expires.Add(leeway)) {
		return verifiedToken{}, false // expired: parse says why
	}
	return v, ok
}

func (c *tokenCache) put(raw string, v verifiedToken) {
	k := sha256.Sum256([]byte(raw))
	c.mu.Lock()
	if c.m == nil || len(c.m) >= maxCachedTokens {
		c.m = make(map[[32]byte]verifiedToken)
	}
	c.m[k] = v
	c.mu.Unlock()
}

func accessMap(entries []accessEntry) map[string][]string {
	m := map[string][]string{}
	for _, e := range entries {
		switch {
		case e.Type == "repository":
			m[e.Name] = append(m[e.Name], e.Actions...)
		case e.Type == "registry" && e.Name == "catalog":
			m[catalogKey] = e.Actions
		}
	}
	return m
}

// tokenResponse is the token endpoint's answer (both the Docker token
// spec's and OAuth2's field names).
type tokenResponse struct {
	Token        string `json:"token"`
	AccessToken  string `json:"access_token"`
	ExpiresIn    int    `json:"expires_in"`
	IssuedAt     string `json:"issued_at"`
	RefreshToken string `json:"refresh_token,omitempty"`
}

// TokenHandler serves /auth/token: GET with optional Basic credentials
// (the Docker token flow; offline_token=true adds a refresh token), and
// POST with the OAuth2 password and refresh_token grants (containerd).
func (a *Authority) TokenHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-store")
		var resp *tokenResponse
		var err error
		switch r.Method {
		case http.MethodGet:
			resp, err = a.tokenGet(r)
		case http.MethodPost:
			resp, err = a.tokenPost(r)
		default:
			err = &gateway.Error{Code: gateway.CodeUnsupported, Detail: "use GET or POST"}
		}
		if err != nil {
			writeTokenError(w, r, a, err)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(resp)
	})
}

func (a *Authority) tokenGet(r *http.Request) (*tokenResponse, error) {
	s, err := a.current()
	if err != nil {
		return nil, err
	}
	q := r.URL.Query()
	if err := checkService(s, q.Get("service")); err != nil {
		return nil, err
	}
	principal := Anonymous
	if r.Header.Get("Authorization") != "" {
		user, pass, ok := r.BasicAuth()
		if !ok {
			return nil, errUnauthorized("the token endpoint takes Basic credentials")
		}
		if principal, err = a.Login(r, user, pass); err != nil {
			return nil, err
		}
	}
	offline := q.Get("offline_token") == "true" && principal != Anonymous
	return a.issue(s, principal, parseScopes(q["scope"]), offline)
}

func (a *Authority) tokenPost(r *http.Request) (*tokenResponse, error) {
	s, err := a.current()
	if err != nil {
		return nil, err
	}
	if err := r.ParseForm(); err != nil {
		return nil, &gateway.Error{Code: gateway.CodeUnsupported, Detail: "unreadable form: " + err.Error()}
	}
	f := r.PostForm
	if err := checkService(s, f.Get("service")); err != nil {
		return nil, err
	}
	offline := f.Get("access_type") == "offline"
	var principal string
	switch f.Get("grant_type") {
	case "password":
		if principal, err = a.Login(r, f.Get("username"), f.Get("password")); err != nil {
			return nil, err
		}
	case "refresh_token":
		c, err := a.parse(s, f.Get("refresh_token"))
		if err != nil || c.Use != useRefresh {
			return nil, errUnauthorized("invalid refresh token")
		}
		principal = c.Subject
		if c.IssuedAt == nil || !s.alive(principal, a.cfg.Now()) || s.issuedBefore(principal, c.IssuedAt.Time) {
			return nil, errUnauthorized("the refresh token's account no longer exists, was revoked or changed its credentials")
		}
		offline = false // the client keeps the refresh token it has
	default:
		return nil, &gateway.Error{Code: gateway.CodeUnsupported, Detail: fmt.Sprintf("grant_type %q: use password or refresh_token", f.Get("grant_type"))}
	}
	return a.issue(s, principal, parseScopes(f["scope"]), offline)
}

func checkService(s *state, service string) error {
	if service != "" && service != s.service {
		return &gateway.Error{Code: gateway.CodeDenied, Detail: fmt.Sprintf("service %q: this registry is %q", service, s.service)}
	}
	return nil
}

// issue signs an access token for principal (and a refresh token when
// offline).
func (a *Authority) issue(s *state, principal string, asked []scope, offline bool) (*tokenResponse, error) {
	now := a.cfg.Now()
	c := newClaims(s, principal, now, a.cfg.TokenTTL)
	c.Access = a.grantScopes(s, principal, asked)
	tok, err := a.sign(s, c)
	if err != nil {
		return nil, err
	}
	resp := &tokenResponse{Token: tok, AccessToken: tok, ExpiresIn: int(a.cfg.TokenTTL / time.Second), IssuedAt: now.UTC().Format(time.RFC3339)}
	if offline {
		rc := newClaims(s, principal, now, a.cfg.RefreshTTL)
		rc.Use = useRefresh
		if resp.RefreshToken, err = a.sign(s, rc); err != nil {
			return nil, err
		}
	}
	return resp, nil
}

func writeTokenError(w http.ResponseWriter, r *http.Request, a *Authority, err error) {
	var e *gateway.Error
	if !errors.As(err, &e) {
		e = &gateway.Error{Code: gateway.CodeInternal}
		a.cfg.Logger.Error("token endpoint", "err", err)
	}
	if e.Code == gateway.CodeUnauthorized {
		w.Header().Set("WWW-Authenticate", `Basic realm="`+baseURL(r)+`"`)
	}
	if e.Code == gateway.CodeUnavailable {
		w.Header().Set("Retry-After", "1")
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(e.Code.Status)
	json.NewEncoder(w).Encode(map[string]any{"errors": []map[string]string{{
		"code": e.Code.Value, "message": e.Code.Message, "detail": e.Detail}}})
}
