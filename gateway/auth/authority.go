package auth

import (
	"context"
	"crypto/sha256"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/meridian-registry/meridian/gateway"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// Config tunes an Authority. Zero durations take the defaults.
type Config struct {
	// TokenTTL is how long a registry token lives (default 5m).
	TokenTTL time.Duration
	// RefreshTTL is how long a refresh token lives (default 720h).
	RefreshTTL time.Duration
	// Leeway absorbs clock skew between the issuer and this member when
	// checking a token's times (default 30s).
	Leeway time.Duration
	// External lists trusted outside token issuers.
	External []*External
	// MaxFailures failed logins of one user from one client address
	// within FailureWindow, or ten times as many of any users from one
	// address, lock that address out until the window passes (defaults 10
	// and 1m). Counting per address keeps a stranger from locking an
	// account out everywhere.
	MaxFailures   int
	FailureWindow time.Duration
	// Denied records refused requests (nil: not recorded).
	Denied *DeniedLog
	// Via names this member in audit records.
	Via    string
	Logger *slog.Logger
	// Now is the clock (tests); nil: time.Now.
	Now func() time.Time
}

// Authority authenticates and authorizes requests from a copy of the
// cluster's access state. It is safe for concurrent use; Update swaps the
// state atomically.
type Authority struct {
	cfg    Config
	state  atomic.Pointer[state]
	limits *limiter

	// verified caches successful bcrypt checks: a password is checked once
	// per (user, password, hash), not on every request. Keys are SHA-256
	// sums, so the cache holds no password.
	mu       sync.Mutex
	verified map[[32]byte]struct{}
}

// New returns an Authority without state: until the first Update every
// request is refused as unavailable.
func New(cfg Config) *Authority {
	if cfg.TokenTTL <= 0 {
		cfg.TokenTTL = 5 * time.Minute
	}
	if cfg.RefreshTTL <= 0 {
		cfg.RefreshTTL = 720 * time.Hour
	}
	if cfg.Leeway <= 0 {
		cfg.Leeway = 30 * time.Second
	}
	if cfg.MaxFailures <= 0 {
		cfg.MaxFailures = 10
	}
	if cfg.FailureWindow <= 0 {
		cfg.FailureWindow = time.Minute
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Authority{cfg: cfg, limits: newLimiter(cfg.MaxFailures, cfg.FailureWindow), verified: map[[32]byte]struct{}{}}
}

// Update installs a new access state.
// A state older than the one held is ignored: a lagging node must not
// bring back a grant that was revoked.
func (a *Authority) Update(st *pb.AccessState) error {
	s, err := newState(st)
	if err != nil {
		return err
	}
	for {
		old := a.state.Load()
		if old != nil && old.version >= s.version {
			return nil
		}
		if a.state.CompareAndSwap(old, s) {
			return nil
		}
	}
}

// Version is the access version held (0 before the first Update).
func (a *Authority) Version() uint64 {
	if s := a.state.Load(); s != nil {
		return s.version
	}
	return 0
}

// Ready reports whether a state was installed.
func (a *Authority) Ready() bool { return a.state.Load() != nil }

func (a *Authority) current() (*state, error) {
	s := a.state.Load()
	if s == nil {
		return nil, &gateway.Error{Code: gateway.CodeUnavailable, Detail: "access control state not loaded yet"}
	}
	return s, nil
}

// caller is an authenticated principal, optionally narrowed by a token's
// access claim.
type caller struct {
	a         *Authority
	principal string
	anonymous bool
	// token: what the bearer token allows (nil: no token, the principal's
	// grants alone decide).
	token map[string][]string
	// external: a token of an outside issuer, whose claim alone decides.
	external bool
}

func (c *caller) Actor() *pb.Actor { return &pb.Actor{Principal: c.principal} }
func (c *caller) Anonymous() bool  { return c.anonymous }

// Can checks the current state, and the token's claim when there is one:
// a token never grants more than the principal has now.
func (c *caller) Can(repo, action string) bool {
	if c.token != nil && !claimAllows(c.token, repo, action) {
		return false
	}
	if c.external {
		return true
	}
	s := c.a.state.Load()
	return s != nil && s.can(c.principal, repo, action, c.a.cfg.Now())
}

// Lists reports whether repo appears in the caller's catalog: what it may
// pull, and for a token with the catalog scope, what its account may pull.
func (c *caller) Lists(repo string) bool {
	if c.Can(repo, "pull") {
		return true
	}
	_, catalog := c.token[catalogKey]
	return catalog && c.WouldAllow(repo, []string{"pull"})
}

// WouldAllow reports whether the caller's account, whatever its token
// says, may do actions on repo: a client then gets a 401 asking it to
// fetch a token with that scope, not a 403.
func (c *caller) WouldAllow(repo string, actions []string) bool {
	if c.token == nil || c.external {
		return false
	}
	s := c.a.state.Load()
	for _, act := range actions {
		if s == nil || !s.can(c.principal, repo, act, c.a.cfg.Now()) {
			return false
		}
	}
	return true
}

// claimAllows reports whether a token's access claim covers action on
// repo (exact repository names, as the token spec has them).
func claimAllows(claim map[string][]string, repo, action string) bool {
	for _, a := range claim[repo] {
		if a == action || a == "*" {
			return true
		}
	}
	return false
}

// errUnauthorized is a 401 with a reason that names no secret.
func errUnauthorized(detail string) error {
	return &gateway.Error{Code: gateway.CodeUnauthorized, Detail: detail}
}

// Authenticate identifies the caller of r: Basic credentials, a bearer
// token, or no credentials at all (anonymous).
func (a *Authority) Authenticate(r *http.Request) (gateway.Caller, error) {
	s, err := a.current()
	if err != nil {
		return nil, err
	}
	h := r.Header.Get("Authorization")
	switch {
	case h == "":
		return &caller{a: a, principal: Anonymous, anonymous: true}, nil
	case strings.HasPrefix(h, "Bearer "):
		return a.verifyBearer(s, strings.TrimPrefix(h, "Bearer "))
	default:
		user, pass, ok := r.BasicAuth()
		if !ok {
			return nil, errUnauthorized("unsupported Authorization scheme: use Basic or Bearer")
		}
		principal, err := a.Login(r, user, pass)
		if err != nil {
			return nil, err
		}
		return &caller{a: a, principal: principal}, nil
	}
}

// Login checks a user's password or a robot's secret and returns the
// principal ("user:NAME" or "robot:NAME"). Failures are rate-limited per
// login name and per client address, and recorded.
func (a *Authority) Login(r *http.Request, user, pass string) (string, error) {
	s, err := a.current()
	if err != nil {
		return "", err
	}
	addr := clientIP(r)
	if a.limits.blocked(user, addr) {
		a.recordFailure(r, user, "locked out after repeated failed logins")
		return "", &gateway.Error{Code: gateway.CodeTooManyRequests, Detail: "too many failed logins; try again later"}
	}
	principal, ok := a.check(s, user, pass)
	if !ok {
		a.limits.fail(user, addr)
		a.recordFailure(r, user, "failed login")
		return "", errUnauthorized("invalid username or password")
	}
	return principal, nil
}

// check verifies credentials against state s.
func (a *Authority) check(s *state, user, pass string) (string, bool) {
	now := a.cfg.Now()
	if name, ok := strings.CutPrefix(user, RobotPrefix); ok {
		r := s.robots[name]
		if r == nil || !robotUsable(r, now) || !checkRobotSecret(r, pass) {
			return "", false
		}
		return KindRobot + ":" + name, true
	}
	u := s.users[user]
	if u == nil {
		// Spend the time a real check takes, so a missing user does not
		// answer faster than a wrong password.
		bcrypt.CompareHashAndPassword(dummyHash, []byte(pass))
		return "", false
	}
	k := verifiedKey(user, pass, u.PasswordHash)
	a.mu.Lock()
	_, hit := a.verified[k]
	a.mu.Unlock()
	if !hit {
		if bcrypt.CompareHashAndPassword(u.PasswordHash, []byte(pass)) != nil {
			return "", false
		}
		a.mu.Lock()
		if len(a.verified) > 10000 {
			clear(a.verified)
		}
		a.verified[k] = struct{}{}
		a.mu.Unlock()
	}
	return KindUser + ":" + user, true
}

var dummyHash, _ = bcrypt.GenerateFromPassword([]byte("meridian"), bcrypt.DefaultCost)

func verifiedKey(user, pass string, hash []byte) [32]byte {
	h := sha256.New()
	for _, part := range [][]byte{[]byte(user), []byte(pass), hash} {
		h.Write(part)
		h.Write([]byte{0})
	}
	var k [32]byte
	copy(k[:], h.Sum(nil))
	return k
}

// Allowed reports whether principal ("user:NAME", "robot:NAME" or
// "anonymous") may do action on repo in the state held now. Principals of
// other kinds (certificates, external issuers) are not the state's to
// judge: false, with known false.
func (a *Authority) Allowed(principal, repo, action string) (allowed, known bool) {
	kind, _, _ := strings.Cut(principal, ":")
	if kind != KindUser && kind != KindRobot && principal != Anonymous {
		return false, false
	}
	s := a.state.Load()
	return s != nil && s.can(principal, repo, action, a.cfg.Now()), true
}

// IsAdmin reports whether principal may administer the whole cluster:
// admin on every repository.
func (a *Authority) IsAdmin(principal string) bool {
	s := a.state.Load()
	return s != nil && principal != Anonymous && s.can(principal, "", "admin", a.cfg.Now()) &&
		s.coversAll(principal, "admin")
}

// coversAll reports whether principal holds action through a grant (its
// own or a team's) on every repository, not just on some.
func (s *state) coversAll(principal, action string) bool {
	kind, name, _ := strings.Cut(principal, ":")
	subjects := []string{principal}
	if kind == KindUser {
		for _, t := range s.teamsOf[name] {
			subjects = append(subjects, "team:"+t)
		}
	}
	for _, subj := range subjects {
		for _, g := range s.grants[subj] {
			p := strings.TrimSuffix(g.Prefix, "/")
			if (p == "" || p == "*") && slices.Contains(g.Actions, action) {
				return true
			}
		}
	}
	return false
}

// Challenge is the Bearer challenge pointing at this member's token
// endpoint.
func (a *Authority) Challenge(r *http.Request, scope string) string {
	s := a.state.Load()
	service := ""
	if s != nil {
		service = s.service
	}
	ch := `Bearer realm="` + baseURL(r) + `/auth/token",service="` + service + `"`
	if scope != "" {
		ch += `,scope="` + scope + `"`
	}
	return ch
}

// Refused records a request refused for want of access.
func (a *Authority) Refused(r *http.Request, c gateway.Caller, repo string, actions []string) {
	actor := c.Actor()
	actor.Address, actor.Via = r.RemoteAddr, a.cfg.Via
	a.record(&pb.AuditRecord{
		TimeUnixNano: a.cfg.Now().UnixNano(), Actor: actor, Action: "denied",
		Repository: repo, Detail: r.Method + " " + r.URL.Path + " needs " + strings.Join(actions, ","),
	})
}

func (a *Authority) recordFailure(r *http.Request, user, what string) {
	a.record(&pb.AuditRecord{
		TimeUnixNano: a.cfg.Now().UnixNano(),
		Actor:        &pb.Actor{Principal: "login:" + user, Address: r.RemoteAddr, Via: a.cfg.Via},
		Action:       "login_failed", Detail: what,
	})
}

// record keeps a refusal in the denied log, or the log output without one.
func (a *Authority) record(r *pb.AuditRecord) {
	if a.cfg.Denied != nil {
		a.cfg.Denied.Record(r)
		return
	}
	a.cfg.Logger.Info("request refused", "action", r.Action, "principal", r.GetActor().GetPrincipal(),
		"address", r.GetActor().GetAddress(), "repository", r.Repository, "detail", r.Detail)
}

// baseURL is the scheme and host the client used to reach this member.
func baseURL(r *http.Request) string {
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	return scheme + "://" + r.Host
}

func clientIP(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// limiter counts failed logins per name and per address in a window.
type limiter struct {
	max    int
	window time.Duration
	mu     sync.Mutex
	counts map[string]*window
}

type window struct {
	start time.Time
	n     int
}

func newLimiter(max int, w time.Duration) *limiter {
	return &limiter{max: max, window: w, counts: map[string]*window{}}
}

func (l *limiter) blocked(user, addr string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	for k, max := range map[string]int{"u:" + user + "|" + addr: l.max, "a:" + addr: 10 * l.max} {
		if w := l.counts[k]; w != nil && now.Sub(w.start) < l.window && w.n >= max {
			return true
		}
	}
	return false
}

func (l *limiter) fail(user, addr string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	if len(l.counts) > 100000 {
		for k, w := range l.counts {
			if now.Sub(w.start) >= l.window {
				delete(l.counts, k)
			}
		}
	}
	for _, k := range []string{"u:" + user + "|" + addr, "a:" + addr} {
		w := l.counts[k]
		if w == nil || now.Sub(w.start) >= l.window {
			w = &window{start: now}
			l.counts[k] = w
		}
		w.n++
	}
}

var errNoKey = errors.New("the cluster has not installed a token signing key yet")

// FollowInterval is how often a standalone gateway asks the nodes whether
// the access state changed: a revocation holds there within about it.
const FollowInterval = 250 * time.Millisecond

// Follow keeps the state current with fetch (nil, nil: unchanged) until
// ctx ends.
func (a *Authority) Follow(ctx context.Context, fetch func(ctx context.Context, known uint64) (*pb.AccessState, error)) {
	t := time.NewTicker(FollowInterval)
	defer t.Stop()
	var lastErr time.Time
	for {
		fctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		st, err := fetch(fctx, a.Version())
		cancel()
		if err == nil && st != nil {
			err = a.Update(st)
		}
		if err != nil && ctx.Err() == nil && time.Since(lastErr) > 30*time.Second {
			a.cfg.Logger.Warn("fetch the access state", "err", err)
			lastErr = time.Now()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
