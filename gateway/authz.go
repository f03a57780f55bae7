package gateway

import (
	"context"
	"net/http"
	"strings"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// Repository actions a grant can give.
const (
	ActionPull   = "pull"
	ActionPush   = "push"
	ActionDelete = "delete"
	ActionAdmin  = "admin"
)

// Caller is the authenticated client of a request.
type Caller interface {
	// Actor names the caller in the audit log.
	Actor() *pb.Actor
	// Anonymous reports a caller without credentials: a refusal asks it
	// to authenticate (401) rather than denying it (403).
	Anonymous() bool
	// Can reports whether the caller may do action on repo.
	Can(repo, action string) bool
}

// Authorizer authenticates the callers of the OCI API. The gateway asks
// it who called, then checks each action the route needs with Can.
type Authorizer interface {
	// Authenticate returns the caller of r: an anonymous caller when r
	// carries no credentials, an error (401 UNAUTHORIZED) when they are
	// wrong or expired.
	Authenticate(r *http.Request) (Caller, error)
	// Challenge is the WWW-Authenticate value sent with a 401 on scope
	// ("repository:NAME:pull,push"; empty for /v2/ itself).
	Challenge(r *http.Request, scope string) string
	// Refused records a request refused for want of access.
	Refused(r *http.Request, c Caller, repo string, actions []string)
}

// AllowAll is the Authorizer of a registry that checks no one: every
// request passes as anonymous with every action. Only an explicitly
// insecure configuration uses it.
func AllowAll() Authorizer { return allowAll{} }

type allowAll struct{}

func (allowAll) Authenticate(r *http.Request) (Caller, error)    { return everyone{}, nil }
func (allowAll) Challenge(*http.Request, string) string          { return "" }
func (allowAll) Refused(*http.Request, Caller, string, []string) {}

type everyone struct{}

// Its writes are recorded as "unauthenticated": no one was asked who they
// are (and a node does not judge such a principal's grants).
func (everyone) Actor() *pb.Actor        { return &pb.Actor{Principal: "unauthenticated"} }
func (everyone) Anonymous() bool         { return false }
func (everyone) Can(string, string) bool { return true }

// scoped is a caller whose token grants less than its account may do.
type scoped interface {
	// WouldAllow reports whether the account (not the token) may do
	// actions on repo.
	WouldAllow(repo string, actions []string) bool
}

type callerKey struct{}

// CallerFrom returns the caller the gateway authenticated for ctx's
// request, or nil outside one.
func CallerFrom(ctx context.Context) Caller {
	c, _ := ctx.Value(callerKey{}).(Caller)
	return c
}

// need is one action a request needs on one repository.
type need struct {
	repo   string
	action string
}

// needs lists what the route and method need. The catalog and mounts are
// checked further by their handlers (a filtered list; pull on the source).
func needs(r *http.Request, rt route) []need {
	read := r.Method == http.MethodGet || r.Method == http.MethodHead
	switch rt.kind {
	case routeManifest, routeBlob:
		switch {
		case read:
			return []need{{rt.name, ActionPull}}
		case r.Method == http.MethodDelete:
			return []need{{rt.name, ActionDelete}}
		default:
			return []need{{rt.name, ActionPush}}
		}
	case routeTags, routeReferrers:
		return []need{{rt.name, ActionPull}}
	case routeUploadStart, routeUpload:
		return []need{{rt.name, ActionPush}}
	}
	return nil
}

// authorize authenticates r and checks what the route needs. It returns
// r carrying the caller (and its actor, for the audit log of commits).
func (g *Gateway) authorize(r *http.Request, rt route) (*http.Request, error) {
	a := g.cfg.Authorizer
	c, err := a.Authenticate(r)
	if err != nil {
		switch e := asError(err); e.Code {
		case CodeInternal, CodeUnavailable, CodeTooManyRequests:
			return r, err
		}
		e := asError(err)
		return r, g.unauthorized(r, rt, e.Detail)
	}
	actor := c.Actor()
	if actor != nil {
		actor.Address = clientAddress(r)
		actor.Via = g.cfg.MemberID
	}
	ctx := pb.WithActor(context.WithValue(r.Context(), callerKey{}, c), actor)
	r = r.WithContext(ctx)
	// /v2/ answers 401 to the anonymous: that is how clients learn where
	// to log in (docker login probes it).
	if rt.kind == routeBase && c.Anonymous() {
		return r, g.unauthorized(r, rt, "")
	}
	var missing []string
	for _, n := range needs(r, rt) {
		if !c.Can(n.repo, n.action) {
			missing = append(missing, n.action)
		}
	}
	if len(missing) == 0 {
		return r, nil
	}
	a.Refused(r, c, rt.name, missing)
	if c.Anonymous() {
		return r, g.unauthorized(r, rt, "")
	}
	if s, ok := c.(scoped); ok && s.WouldAllow(rt.name, missing) {
		// The token lacks a scope its holder has: a new token for the
		// scope in the challenge would do (the token spec's
		// insufficient_scope).
		return r, g.unauthorized(r, rt, "the token does not grant "+strings.Join(missing, ","))
	}
	return r, errorf(CodeDenied, "%s may not %s %s", actor.GetPrincipal(), strings.Join(missing, ","), rt.name)
}

// unauthorized is a 401 with the challenge that tells the client where to
// get a token for what the request needs.
func (g *Gateway) unauthorized(r *http.Request, rt route, detail string) error {
	scope := ""
	if rt.name != "" {
		var actions []string
		for _, n := range needs(r, rt) {
			actions = append(actions, n.action)
		}
		if len(actions) == 1 && actions[0] == ActionPush {
			// Clients that push also read back what they pushed.
			actions = []string{ActionPull, ActionPush}
		}
		if len(actions) > 0 {
			scope = "repository:" + rt.name + ":" + strings.Join(actions, ",")
		}
	}
	e := errorf(CodeUnauthorized, "%s", detail)
	if ch := g.cfg.Authorizer.Challenge(r, scope); ch != "" {
		e.Headers = map[string]string{"WWW-Authenticate": ch}
	}
	return e
}

// mayMountFrom reports whether the caller may take a blob from repository
// from into a mount: it needs pull there. A mount without a source needs
// pull on every repository (the blob may be linked anywhere); others get
// a plain upload session instead, which never reveals what is stored.
//
// The account decides, not just its token: clients ask for a token
// scoped to the target repository and rarely add the source.
func mayMountFrom(ctx context.Context, from string) bool {
	c := CallerFrom(ctx)
	if c == nil {
		return true
	}
	can := func(repo string) bool {
		if c.Can(repo, ActionPull) {
			return true
		}
		s, ok := c.(scoped)
		return ok && s.WouldAllow(repo, []string{ActionPull})
	}
	if from == "" {
		return can("")
	}
	return can(from)
}

// clientAddress is the request's client address as this member sees it.
func clientAddress(r *http.Request) string {
	return r.RemoteAddr
}
