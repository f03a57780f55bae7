package node

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/crypto/bcrypt"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/meridian-registry/meridian/consensus"
	"github.com/meridian-registry/meridian/gateway"
	"github.com/meridian-registry/meridian/gateway/auth"
	"github.com/meridian-registry/meridian/node/pki"
	"github.com/meridian-registry/meridian/node/transport"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// Access control on a node: the Authority that checks HTTP requests (fed
// from the local replica whenever the access state changes), the admin API
// behind `meridian user|team|robot|access|audit`, the first admin of a new
// cluster, and the leader's housekeeping (token key rotation, audit
// retention).

// AuthConfig configures authentication and access control.
type AuthConfig struct {
	// InsecureNoAuth turns authentication off: every request may do
	// everything. For throwaway local setups only.
	InsecureNoAuth bool `yaml:"insecure_no_auth"`
	// AdminPasswordFile holds the first admin's password when a new
	// cluster bootstraps; without it one is generated and written to
	// DATA_DIR/admin-password (mode 0600).
	AdminPasswordFile string `yaml:"admin_password_file"`
	// TokenTTL is the lifetime of registry tokens; RefreshTTL that of
	// refresh tokens (offline_token=true).
	TokenTTL   time.Duration `yaml:"token_ttl"`
	RefreshTTL time.Duration `yaml:"refresh_ttl"`
	// TokenKeyRotation is how often the leader adds a token signing key;
	// keys stay until RefreshTTL after they were replaced.
	TokenKeyRotation time.Duration `yaml:"token_key_rotation"`
	// AuditRetention bounds the audit log: older records are dropped.
	AuditRetention time.Duration `yaml:"audit_retention"`
	// Leeway absorbs clock skew when checking token times.
	Leeway time.Duration `yaml:"leeway"`
	// MaxFailedLogins failed logins of one user in a minute (ten times as
	// many from one address) lock further attempts out for the minute.
	MaxFailedLogins int `yaml:"max_failed_logins"`
	// ExternalIssuers are outside token issuers whose tokens are accepted.
	ExternalIssuers []ExternalIssuer `yaml:"external_issuers"`
	// Username and PasswordFile are a cluster admin's credentials, with
	// which a standalone gateway fetches the access state from a cluster
	// without TLS (with TLS its certificate suffices). The env var
	// MERIDIAN_PASSWORD may hold the password instead of the file.
	Username     string `yaml:"username"`
	PasswordFile string `yaml:"password_file"`
	// DeniedLog is where a standalone gateway records refused requests
	// (rotated at 16 MiB); empty: its log output. Nodes keep theirs in
	// DATA_DIR/denied.log.
	DeniedLog string `yaml:"denied_log"`
}

// Externals loads the configured external issuers.
func (c AuthConfig) Externals() ([]*auth.External, error) {
	var ext []*auth.External
	for _, e := range c.ExternalIssuers {
		x, err := auth.LoadExternal(e.Issuer, e.Audience, e.JWKSFile)
		if err != nil {
			return nil, fmt.Errorf("external issuer %q: %w", e.Issuer, err)
		}
		ext = append(ext, x)
	}
	return ext, nil
}

// ExternalIssuer is an IdP whose JWTs Meridian accepts.
type ExternalIssuer struct {
	Issuer   string `yaml:"issuer"`
	Audience string `yaml:"audience"`
	JWKSFile string `yaml:"jwks_file"`
}

func defaultAuthConfig() AuthConfig {
	return AuthConfig{
		TokenTTL:         5 * time.Minute,
		RefreshTTL:       720 * time.Hour,
		TokenKeyRotation: 720 * time.Hour,
		AuditRetention:   90 * 24 * time.Hour,
		Leeway:           30 * time.Second,
		MaxFailedLogins:  10,
	}
}

// AdminPasswordFileName is where a bootstrapping node writes the first
// admin's generated password, inside its data directory.
const AdminPasswordFileName = "admin-password"

// setupAccess builds the node's Authority from the local replica.
func (n *Node) setupAccess(ctx context.Context) error {
	if n.cfg.Auth.InsecureNoAuth {
		n.logger.Warn("authentication is OFF (insecure_no_auth): anyone who reaches the registry may push, pull and delete")
		return nil
	}
	ext, err := n.cfg.Auth.Externals()
	if err != nil {
		return err
	}
	denied, err := auth.OpenDeniedLog(filepath.Join(n.cfg.DataDir, "denied.log"), 16<<20)
	if err != nil {
		return err
	}
	n.denied = denied
	n.access = auth.New(auth.Config{
		TokenTTL: n.cfg.Auth.TokenTTL, RefreshTTL: n.cfg.Auth.RefreshTTL, Leeway: n.cfg.Auth.Leeway,
		MaxFailures: n.cfg.Auth.MaxFailedLogins, External: ext, Denied: denied, Via: n.cfg.NodeID, Logger: n.logger.With("component", "auth"),
	})
	return n.reloadAccess(ctx)
}

// reloadAccess installs the replica's access state when it changed.
func (n *Node) reloadAccess(ctx context.Context) error {
	store := n.consensus.Store()
	v, err := store.AccessVersion()
	if err != nil {
		return err
	}
	if n.access.Ready() && v == n.access.Version() {
		return nil
	}
	st, err := store.AccessState(ctx)
	if err != nil {
		return err
	}
	st.ClusterId = n.cfg.ClusterID
	return n.access.Update(st)
}

// keepAccessCurrent reloads the access state after each applied entry that
// changed it: a revocation holds on this node as soon as it applies it.
func (n *Node) keepAccessCurrent() {
	defer n.wg.Done()
	for {
		// The channel is taken before the reload: an entry applied during
		// the reload closes it, and the loop reloads again.
		changed := n.consensus.Changed()
		if err := n.reloadAccess(context.Background()); err != nil {
			n.logger.Warn("reload access state", "err", err)
		}
		select {
		case <-n.stop:
			return
		case <-changed:
		}
	}
}

// bootstrapAdmin creates the first admin of the cluster: the leader runs
// it until the state records one (a new cluster's leader is the node that
// bootstrapped it; a cluster from before access control gets one from its
// leader of the moment), so it happens once per cluster, even across
// restarts.
func (n *Node) bootstrapAdmin(ctx context.Context) error {
	if n.cfg.Auth.InsecureNoAuth {
		return nil
	}
	store := n.consensus.Store()
	if done, err := store.AccessBootstrapped(); err != nil || done {
		return err
	}
	password, written, err := n.firstAdminPassword()
	if err != nil {
		return err
	}
	hash, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.DefaultCost)
	if err != nil {
		return err
	}
	cmd := &pb.Command{Intent: &pb.Command_PutUser{PutUser: &pb.PutUser{
		User: &pb.User{Name: "admin", PasswordHash: hash}, Bootstrap: true}}}
	actor := &pb.Actor{Principal: "system", Via: n.cfg.NodeID}
	if _, err := n.consensus.Commit(ctx, cmd, actor); err != nil {
		if pb.CodeOf(err) == pb.Code_CODE_DENIED {
			return nil // another term of this leader got there first
		}
		return err
	}
	if written != "" {
		n.logger.Info("created the first admin user; its password is in the file named here (mode 0600)", "user", "admin", "file", written)
	} else {
		n.logger.Info("created the first admin user with the password of admin_password_file", "user", "admin")
	}
	return nil
}

// firstAdminPassword reads admin_password_file, or generates a password
// and writes it to DATA_DIR/admin-password (keeping one already there
// from an attempt that did not commit).
func (n *Node) firstAdminPassword() (password, written string, err error) {
	if f := n.cfg.Auth.AdminPasswordFile; f != "" {
		b, err := os.ReadFile(f)
		if err != nil {
			return "", "", fmt.Errorf("admin_password_file: %w", err)
		}
		p := strings.TrimRight(string(b), "\r\n")
		if err := checkPassword(p); err != nil {
			return "", "", fmt.Errorf("admin_password_file %s: %w", f, err)
		}
		return p, "", nil
	}
	path := filepath.Join(n.cfg.DataDir, AdminPasswordFileName)
	if b, err := os.ReadFile(path); err == nil && len(b) > 0 {
		return strings.TrimRight(string(b), "\r\n"), path, nil
	}
	p := generateSecret()
	if err := os.WriteFile(path, []byte(p+"\n"), 0o600); err != nil {
		return "", "", err
	}
	return p, path, nil
}

// generateSecret is 256 random bits, URL-safe.
func generateSecret() string {
	b := make([]byte, 32)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// rotateTokenKey adds a signing key when there is none or the newest is
// older than the rotation period; the leader calls it.
func (n *Node) rotateTokenKey(ctx context.Context) error {
	if n.cfg.Auth.InsecureNoAuth {
		return nil
	}
	st, err := n.consensus.Store().AccessState(ctx)
	if err != nil {
		return err
	}
	keys := st.GetTokenKeys().GetKeys()
	now := time.Now()
	every := n.cfg.Auth.TokenKeyRotation
	if len(keys) > 0 && (every <= 0 || now.Sub(time.Unix(0, keys[len(keys)-1].CreatedUnixNano)) < every) {
		return nil
	}
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return err
	}
	kid := make([]byte, 8)
	rand.Read(kid)
	c := &pb.RotateTokenKey{Key: &pb.TokenKey{Id: hex.EncodeToString(kid), PrivateKey: der}}
	if len(keys) > 0 {
		// Refresh tokens signed by a replaced key stay valid for their life.
		c.RetireBeforeUnixNano = now.Add(-n.cfg.Auth.RefreshTTL).UnixNano()
	}
	return n.consensus.Propose(ctx, &pb.LogEntry{Command: &pb.LogEntry_RotateTokenKey{RotateTokenKey: c}})
}

// trimAudit drops audit records past the retention; the leader calls it.
func (n *Node) trimAudit(ctx context.Context) error {
	if n.cfg.Auth.AuditRetention <= 0 {
		return nil
	}
	before := time.Now().Add(-n.cfg.Auth.AuditRetention).UnixNano()
	old, err := n.consensus.Store().Audit(ctx, consensus.AuditFilter{Limit: 1, Oldest: true})
	if err != nil || len(old) == 0 || old[0].TimeUnixNano >= before {
		return err
	}
	return n.consensus.Propose(ctx, &pb.LogEntry{Command: &pb.LogEntry_TrimAudit{TrimAudit: &pb.TrimAudit{BeforeUnixNano: before}}})
}

// accessHousekeeping runs the leader's access duties: the first admin,
// token keys and audit retention.
func (n *Node) accessHousekeeping(ctx context.Context) error {
	return errors.Join(n.bootstrapAdmin(ctx), n.rotateTokenKey(ctx), n.trimAudit(ctx))
}

// Admin RPCs.

// adminMethods need a cluster admin: an admin certificate (or a node
// forwarding for one, memberAccess), or an admin user's credentials in the
// call, with or without cluster TLS. In plaintext the credentials are the
// only proof, so a local process cannot change who may do what. GetAccessState hands out
// password hashes and token signing keys, so it is guarded the same way.
var adminMethods = map[string]bool{
	pb.Admin_TransferLeadership_FullMethodName: true,
	pb.Admin_RemoveServer_FullMethodName:       true,
	pb.Admin_GossipKeyring_FullMethodName:      true,
	pb.Admin_Scrub_FullMethodName:              true,
	pb.Admin_SetPolicy_FullMethodName:          true,
	pb.Admin_DeletePolicy_FullMethodName:       true,
	pb.Admin_ManageAccess_FullMethodName:       true,
	pb.Admin_ListAccess_FullMethodName:         true,
	pb.Admin_ReadAudit_FullMethodName:          true,
	pb.Admin_RunGC_FullMethodName:              true,
	pb.Admin_GCStatus_FullMethodName:           true,
	pb.Admin_ManageLifecycle_FullMethodName:    true,
	pb.Admin_ListLifecycle_FullMethodName:      true,
	pb.Admin_RunRetention_FullMethodName:       true,
	pb.Admin_ManageWebhook_FullMethodName:      true,
	pb.Admin_ListWebhooks_FullMethodName:       true,
	pb.Admin_TestWebhook_FullMethodName:        true,
	pb.Admin_Backup_FullMethodName:             true,
	pb.Gateway_GetAccessState_FullMethodName:   true,
}

// adminInterceptor checks credentials on admin methods in plaintext and
// names the caller for the audit log.
func (n *Node) adminInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if !adminMethods[info.FullMethod] {
		return handler(ctx, req)
	}
	actor, err := n.adminActor(ctx)
	if err != nil {
		return nil, err
	}
	return handler(pb.WithActor(ctx, actor), req)
}

// adminStreamInterceptor is adminInterceptor for streaming methods.
func (n *Node) adminStreamInterceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if !adminMethods[info.FullMethod] {
		return handler(srv, ss)
	}
	actor, err := n.adminActor(ss.Context())
	if err != nil {
		return err
	}
	return handler(srv, actorStream{ServerStream: ss, ctx: pb.WithActor(ss.Context(), actor)})
}

// actorStream is a server stream whose context names the caller.
type actorStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s actorStream) Context() context.Context { return s.ctx }

// adminActor authenticates the caller of an admin method.
func (n *Node) adminActor(ctx context.Context) (*pb.Actor, error) {
	addr := ""
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		addr = p.Addr.String()
	}
	actor := &pb.Actor{Address: addr, Via: n.cfg.NodeID}
	if id, ok := transport.Caller(ctx); ok {
		// The transport admitted an admin or a node certificate. A node
		// forwards for a caller it checked, and says who in the metadata.
		actor.Principal = "cert:" + id.Role + "/" + id.ID
		if id.Role == pki.RoleNode {
			if fwd := forwardedActor(ctx); fwd != nil {
				return fwd, nil
			}
		}
		return actor, nil
	}
	// No certificate (the transport let the call through because the
	// method takes credentials), or plaintext: an admin user's
	// credentials decide.
	if n.access == nil && n.trust.Secure() {
		return nil, status.Error(codes.Unauthenticated, "no verified client certificate")
	}
	if n.access == nil {
		// Authentication is off: the operator chose insecure_no_auth.
		actor.Principal = "anonymous"
		return actor, nil
	}
	user, pass, ok := credentialsFrom(ctx)
	if !ok {
		return nil, status.Error(codes.Unauthenticated, "admin credentials required: set MERIDIAN_USERNAME and MERIDIAN_PASSWORD, or --username and --password-file")
	}
	r := &http.Request{RemoteAddr: addr, Header: http.Header{}}
	principal, err := n.access.Login(r, user, pass)
	var gerr *gateway.Error
	if errors.As(err, &gerr) && gerr.Code == gateway.CodeTooManyRequests {
		return nil, status.Error(codes.ResourceExhausted, "too many failed logins; try again in a minute")
	}
	if err != nil {
		return nil, status.Error(codes.Unauthenticated, "invalid username or password")
	}
	if !n.access.IsAdmin(principal) {
		return nil, status.Errorf(codes.PermissionDenied, "%s is not a cluster admin (admin on every repository)", principal)
	}
	actor.Principal = principal
	return actor, nil
}

// credentialsFrom reads Basic credentials from the call's "authorization"
// metadata.
func credentialsFrom(ctx context.Context) (user, pass string, ok bool) {
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get("authorization") {
		r := &http.Request{Header: http.Header{"Authorization": {v}}}
		if user, pass, ok = r.BasicAuth(); ok {
			return user, pass, true
		}
	}
	return "", "", false
}

// forwardedActor is the actor a forwarding node names in the metadata.
func forwardedActor(ctx context.Context) *pb.Actor {
	md, _ := metadata.FromIncomingContext(ctx)
	v := md.Get("meridian-actor")
	if len(v) == 0 {
		return nil
	}
	b, err := base64.StdEncoding.DecodeString(v[0])
	if err != nil {
		return nil
	}
	a := &pb.Actor{}
	if proto.Unmarshal(b, a) != nil {
		return nil
	}
	return a
}

// forwardContext carries an admin call on to the leader: in plaintext the
// caller's credentials (the leader checks them again), with TLS the actor
// this node authenticated.
func forwardContext(ctx context.Context) context.Context {
	md, _ := metadata.FromIncomingContext(ctx)
	out := metadata.MD{}
	if v := md.Get("authorization"); len(v) > 0 {
		out.Set("authorization", v...)
	}
	if a := pb.ActorFrom(ctx); a != nil {
		if b, err := proto.Marshal(a); err == nil {
			out.Set("meridian-actor", base64.StdEncoding.EncodeToString(b))
		}
	}
	return metadata.NewOutgoingContext(ctx, out)
}

// callerActor names the caller of a Commit: the actor a gateway or node
// vouches for, or the certificate.
func (n *Node) callerActor(ctx context.Context, claimed *pb.Actor) *pb.Actor {
	if claimed != nil {
		if claimed.Via == "" {
			claimed.Via = n.cfg.NodeID
		}
		return claimed
	}
	if id, ok := transport.Caller(ctx); ok {
		return &pb.Actor{Principal: "cert:" + id.Role + "/" + id.ID, Via: n.cfg.NodeID}
	}
	return nil
}

var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$`)

func checkName(kind, name string) error {
	if !nameRE.MatchString(name) {
		return invalid("%s name %q: use 1-64 lowercase letters, digits, '.', '_' or '-', starting and ending with a letter or digit", kind, name)
	}
	return nil
}

func checkPassword(p string) error {
	switch {
	case len(p) < 12:
		return invalid("password too short: at least 12 characters")
	case len(p) > 72:
		return invalid("password too long: at most 72 bytes (bcrypt's limit)")
	}
	return nil
}

func checkGrantPattern(p string) error {
	if len(p) > 255 || !auth.ValidPattern(p) || strings.ContainsAny(p, "\x00\n") {
		return invalid("prefix %q: not a repository prefix or glob", p)
	}
	return nil
}

func checkActions(actions []string) error {
	if len(actions) == 0 {
		return invalid("no actions: give some of %s", strings.Join(auth.Actions, ","))
	}
	for _, a := range actions {
		if !auth.ValidAction(a) {
			return invalid("action %q: use %s", a, strings.Join(auth.Actions, ","))
		}
	}
	return nil
}

func checkSubject(s string) error {
	if s == "anonymous" {
		return nil
	}
	kind, name, _ := strings.Cut(s, ":")
	if kind != "user" && kind != "team" {
		return invalid("subject %q: use user:NAME, team:NAME or anonymous", s)
	}
	return checkName(kind, name)
}

// validateAccess checks an access intent field by field.
func validateAccess(cmd *pb.Command) error {
	switch c := cmd.GetIntent().(type) {
	case *pb.Command_PutUser:
		return checkName("user", c.PutUser.GetUser().GetName())
	case *pb.Command_DeleteUser:
		return checkName("user", c.DeleteUser.GetName())
	case *pb.Command_PutTeam:
		if err := checkName("team", c.PutTeam.GetTeam().GetName()); err != nil {
			return err
		}
		for _, m := range c.PutTeam.GetTeam().GetMembers() {
			if err := checkName("user", m); err != nil {
				return err
			}
		}
		return nil
	case *pb.Command_DeleteTeam:
		return checkName("team", c.DeleteTeam.GetName())
	case *pb.Command_PutRobot:
		r := c.PutRobot.GetRobot()
		if err := checkName("robot", r.GetName()); err != nil {
			return err
		}
		if len(r.Scopes) == 0 {
			return invalid("robot %s: no scopes", r.Name)
		}
		for _, s := range r.Scopes {
			if err := firstErr(checkGrantPattern(s.Prefix), checkActions(s.Actions)); err != nil {
				return err
			}
		}
		return nil
	case *pb.Command_RevokeRobot:
		return checkName("robot", c.RevokeRobot.GetName())
	case *pb.Command_PutGrant:
		g := c.PutGrant.GetGrant()
		return firstErr(checkSubject(g.GetSubject()), checkGrantPattern(g.GetPrefix()), checkActions(g.GetActions()))
	case *pb.Command_DeleteGrant:
		return firstErr(checkSubject(c.DeleteGrant.GetSubject()), checkGrantPattern(c.DeleteGrant.GetPrefix()))
	}
	return invalid("not an access command")
}

// isAccessIntent reports commands that change access control; they are
// committed only through ManageAccess, never through Commit.
func isAccessIntent(cmd *pb.Command) bool {
	switch cmd.GetIntent().(type) {
	case *pb.Command_PutUser, *pb.Command_DeleteUser, *pb.Command_PutTeam, *pb.Command_DeleteTeam,
		*pb.Command_PutRobot, *pb.Command_RevokeRobot, *pb.Command_PutGrant, *pb.Command_DeleteGrant:
		return true
	}
	return false
}

// ManageAccess changes users, teams, robots and grants. The leader does
// the work (a follower forwards the call with its caller's credentials),
// so a password is hashed where it is committed and a secret generated
// once.
func (s adminServer) ManageAccess(ctx context.Context, req *pb.ManageAccessRequest) (*pb.ManageAccessResponse, error) {
	if s.n.access == nil {
		return nil, status.Error(codes.FailedPrecondition, "access control is off on this node (insecure_no_auth)")
	}
	var resp *pb.ManageAccessResponse
	err := s.n.onLeader(ctx, func(ctx context.Context, cc grpc.ClientConnInterface) error {
		r, err := pb.NewAdminClient(cc).ManageAccess(forwardContext(ctx), req)
		if err != nil {
			return fromGRPC(err)
		}
		resp = r
		return nil
	}, func(ctx context.Context) (err error) {
		resp, err = s.n.manageAccess(ctx, req)
		return err
	})
	if err != nil {
		return nil, pb.ToStatus(err)
	}
	// The caller's next request through this node sees the change.
	wctx, cancel := context.WithTimeout(ctx, s.n.cfg.ApplyTimeout)
	defer cancel()
	if werr := s.n.consensus.WaitApplied(wctx, resp.Index); werr == nil {
		s.n.reloadAccess(wctx)
	}
	return resp, nil
}

// manageAccess runs on the leader.
func (n *Node) manageAccess(ctx context.Context, req *pb.ManageAccessRequest) (*pb.ManageAccessResponse, error) {
	resp := &pb.ManageAccessResponse{}
	var cmd *pb.Command
	switch op := req.GetOp().(type) {
	case *pb.ManageAccessRequest_AddUser:
		name, password := op.AddUser.GetName(), op.AddUser.GetPassword()
		if err := checkName("user", name); err != nil {
			return nil, err
		}
		st, err := n.consensus.Store().AccessState(ctx)
		if err != nil {
			return nil, err
		}
		if slices.ContainsFunc(st.Users, func(u *pb.User) bool { return u.Name == name }) {
			return nil, pb.Errorf(pb.Code_CODE_DENIED, "user %q exists; use passwd to change its password", name)
		}
		if password == "" {
			password = generateSecret()
			resp.Secret = password
		}
		if cmd, err = userCommand(name, password); err != nil {
			return nil, err
		}
	case *pb.ManageAccessRequest_SetPassword:
		st, err := n.consensus.Store().AccessState(ctx)
		if err != nil {
			return nil, err
		}
		if !slices.ContainsFunc(st.Users, func(u *pb.User) bool { return u.Name == op.SetPassword.GetName() }) {
			return nil, pb.Errorf(pb.Code_CODE_NAME_UNKNOWN, "user %q does not exist", op.SetPassword.GetName())
		}
		if cmd, err = userCommand(op.SetPassword.GetName(), op.SetPassword.GetPassword()); err != nil {
			return nil, err
		}
	case *pb.ManageAccessRequest_DeleteUser:
		cmd = &pb.Command{Intent: &pb.Command_DeleteUser{DeleteUser: &pb.DeleteUser{Name: op.DeleteUser}}}
	case *pb.ManageAccessRequest_PutTeam:
		cmd = &pb.Command{Intent: &pb.Command_PutTeam{PutTeam: &pb.PutTeam{Team: op.PutTeam}}}
	case *pb.ManageAccessRequest_DeleteTeam:
		cmd = &pb.Command{Intent: &pb.Command_DeleteTeam{DeleteTeam: &pb.DeleteTeam{Name: op.DeleteTeam}}}
	case *pb.ManageAccessRequest_CreateRobot:
		c := op.CreateRobot
		if c.GetExpiresInSeconds() < 0 {
			return nil, invalid("robot expiry must not be negative")
		}
		secret := generateSecret()
		r := &pb.Robot{Name: c.GetName(), SecretHash: auth.HashRobotSecret(secret), Scopes: c.GetScopes()}
		if c.ExpiresInSeconds > 0 {
			r.ExpiresUnixNano = time.Now().Add(time.Duration(c.ExpiresInSeconds) * time.Second).UnixNano()
		}
		cmd = &pb.Command{Intent: &pb.Command_PutRobot{PutRobot: &pb.PutRobot{Robot: r}}}
		resp.Secret = secret
	case *pb.ManageAccessRequest_RevokeRobot:
		cmd = &pb.Command{Intent: &pb.Command_RevokeRobot{RevokeRobot: &pb.RevokeRobot{Name: op.RevokeRobot}}}
	case *pb.ManageAccessRequest_Grant:
		cmd = &pb.Command{Intent: &pb.Command_PutGrant{PutGrant: &pb.PutGrant{Grant: op.Grant}}}
	case *pb.ManageAccessRequest_Revoke:
		cmd = &pb.Command{Intent: &pb.Command_DeleteGrant{DeleteGrant: op.Revoke}}
	default:
		return nil, invalid("no access operation given")
	}
	if err := validateAccess(cmd); err != nil {
		return nil, err
	}
	if err := n.keepsAnAdmin(ctx, cmd); err != nil {
		return nil, err
	}
	index, err := n.consensus.Commit(ctx, cmd, pb.ActorFrom(ctx))
	if err != nil {
		return nil, err
	}
	// The leader judges writes (mayWrite) from the new state before the
	// caller hears that the change is made.
	if err := n.reloadAccess(ctx); err != nil {
		n.logger.Warn("reload access state", "err", err)
	}
	resp.Index = index
	return resp, nil
}

func userCommand(name, password string) (*pb.Command, error) {
	if err := checkPassword(password); err != nil {
		return nil, err
	}
	hash, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.DefaultCost)
	if err != nil {
		return nil, err
	}
	return &pb.Command{Intent: &pb.Command_PutUser{PutUser: &pb.PutUser{User: &pb.User{Name: name, PasswordHash: hash}}}}, nil
}

// ListAccess lists identities and grants, without hashes.
func (s adminServer) ListAccess(ctx context.Context, _ *pb.ListAccessRequest) (*pb.ListAccessResponse, error) {
	st, err := s.n.consensus.Store().AccessState(ctx)
	if err != nil {
		return nil, pb.ToStatus(err)
	}
	for _, u := range st.Users {
		u.PasswordHash = nil
	}
	for _, r := range st.Robots {
		r.SecretHash = nil
	}
	return &pb.ListAccessResponse{Users: st.Users, Teams: st.Teams, Robots: st.Robots, Grants: st.Grants}, nil
}

// maxAuditRecords bounds one audit read (the newest ones), so an answer
// stays well inside gRPC's message size.
const maxAuditRecords = 10000

// ReadAudit reads the replicated audit log from this node's replica, and
// the refusals this node recorded when asked.
func (s adminServer) ReadAudit(ctx context.Context, req *pb.ReadAuditRequest) (*pb.ReadAuditResponse, error) {
	f := consensus.AuditFilter{Since: req.SinceUnixNano, Repository: req.Repository, Principal: req.Principal, Limit: int(req.Limit)}
	if f.Limit <= 0 || f.Limit > maxAuditRecords {
		f.Limit = maxAuditRecords
	}
	recs, err := s.n.consensus.Store().Audit(ctx, f)
	if err != nil {
		return nil, pb.ToStatus(err)
	}
	if req.Denied && s.n.denied != nil {
		denied, err := s.n.denied.Read(f.Match)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "read denied log: %v", err)
		}
		recs = append(recs, denied...)
		slices.SortStableFunc(recs, func(a, b *pb.AuditRecord) int { return int(a.TimeUnixNano - b.TimeUnixNano) })
	}
	return &pb.ReadAuditResponse{Records: recs}, nil
}

// GetAccessState gives a gateway the access state (hashes and signing
// keys included) unless it already holds the current version.
func (s gatewayServer) GetAccessState(ctx context.Context, req *pb.GetAccessStateRequest) (*pb.GetAccessStateResponse, error) {
	store := s.n.consensus.Store()
	v, err := store.AccessVersion()
	if err != nil {
		return nil, pb.ToStatus(err)
	}
	// A replica behind the caller answers "unchanged" too: the caller
	// keeps the newer state it has.
	if req.KnownVersion != 0 && v <= req.KnownVersion {
		return &pb.GetAccessStateResponse{Unchanged: true}, nil
	}
	st, err := store.AccessState(ctx)
	if err != nil {
		return nil, pb.ToStatus(err)
	}
	st.ClusterId = s.n.cfg.ClusterID
	return &pb.GetAccessStateResponse{State: st}, nil
}

// mayWrite checks again, on the node that builds the entry, that the
// actor a gateway named may still make this change. A revocation then
// stops writes as soon as this node has applied it, whatever a gateway
// still holds.
func (n *Node) mayWrite(ctx context.Context, cmd *pb.Command) error {
	a := pb.ActorFrom(ctx)
	if n.access == nil || a == nil {
		return nil
	}
	// Judge from the state this replica has applied, not a copy that the
	// reload loop has yet to refresh (a new leader, say).
	if err := n.reloadAccess(ctx); err != nil {
		return err
	}
	type need struct{ repo, action string }
	var needs []need
	switch c := cmd.GetIntent().(type) {
	case *pb.Command_PutManifest:
		needs = []need{{c.PutManifest.Repository, "push"}}
	case *pb.Command_LinkBlob:
		needs = []need{{c.LinkBlob.Repository, "push"}}
		if c.LinkBlob.MountFrom != "" {
			needs = append(needs, need{c.LinkBlob.MountFrom, "pull"})
		}
	case *pb.Command_DeleteManifest:
		needs = []need{{c.DeleteManifest.Repository, "delete"}}
	case *pb.Command_DeleteTag:
		needs = []need{{c.DeleteTag.Repository, "delete"}}
	case *pb.Command_UnlinkBlob:
		needs = []need{{c.UnlinkBlob.Repository, "delete"}}
	case *pb.Command_DeleteRepository:
		needs = []need{{c.DeleteRepository.Repository, "admin"}}
	}
	for _, nd := range needs {
		if ok, known := n.access.Allowed(a.Principal, nd.repo, nd.action); known && !ok {
			return pb.Errorf(pb.Code_CODE_DENIED, "%s may not %s %s", a.Principal, nd.action, nd.repo)
		}
	}
	return nil
}

// serveAudit is GET /admin/audit: the audit log as JSON lines, mounted for
// cluster admins only (auth.Authority.AdminOnly). Query parameters
// mirror `meridian audit`: since (RFC 3339 or a duration back from now),
// repo, user, limit, denied=true.
func (n *Node) serveAudit(w http.ResponseWriter, r *http.Request) {
	fail := func(code int, msg string) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		json.NewEncoder(w).Encode(map[string]string{"error": msg})
	}
	q := r.URL.Query()
	f := consensus.AuditFilter{Repository: q.Get("repo"), Principal: q.Get("user")}
	if s := q.Get("since"); s != "" {
		if d, err := time.ParseDuration(s); err == nil {
			f.Since = time.Now().Add(-d).UnixNano()
		} else if t, err := time.Parse(time.RFC3339, s); err == nil {
			f.Since = t.UnixNano()
		} else {
			fail(http.StatusBadRequest, "since: want a duration (24h) or an RFC 3339 time")
			return
		}
	}
	if s := q.Get("limit"); s != "" {
		var err error
		if f.Limit, err = strconv.Atoi(s); err != nil || f.Limit < 0 {
			fail(http.StatusBadRequest, "limit: want a non-negative integer")
			return
		}
	}
	resp, err := adminServer{n: n}.ReadAudit(r.Context(), &pb.ReadAuditRequest{
		SinceUnixNano: f.Since, Repository: f.Repository, Principal: f.Principal, Limit: int32(f.Limit), Denied: q.Get("denied") == "true"})
	if err != nil {
		fail(http.StatusInternalServerError, status.Convert(err).Message())
		return
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	for _, rec := range resp.Records {
		b, _ := protojson.Marshal(rec)
		w.Write(append(b, '\n'))
	}
}

// keepsAnAdmin refuses a change that would leave the cluster without a
// user who may administer it: no one could then change access again.
func (n *Node) keepsAnAdmin(ctx context.Context, cmd *pb.Command) error {
	var gone func(g *pb.Grant) bool
	switch c := cmd.GetIntent().(type) {
	case *pb.Command_DeleteUser:
		gone = func(g *pb.Grant) bool { return g.Subject == "user:"+c.DeleteUser.Name }
	case *pb.Command_DeleteTeam:
		gone = func(g *pb.Grant) bool { return g.Subject == "team:"+c.DeleteTeam.Name }
	case *pb.Command_DeleteGrant:
		gone = func(g *pb.Grant) bool {
			return g.Subject == c.DeleteGrant.Subject && g.Prefix == c.DeleteGrant.Prefix
		}
	default:
		return nil
	}
	st, err := n.consensus.Store().AccessState(ctx)
	if err != nil {
		return err
	}
	deletedUser := ""
	if c, ok := cmd.GetIntent().(*pb.Command_DeleteUser); ok {
		deletedUser = c.DeleteUser.Name
	}
	for _, g := range st.Grants {
		p := strings.TrimSuffix(g.Prefix, "/")
		if gone(g) || !(p == "" || p == "*") || !slices.Contains(g.Actions, "admin") {
			continue
		}
		kind, name, _ := strings.Cut(g.Subject, ":")
		switch kind {
		case "user":
			if name != deletedUser && slices.ContainsFunc(st.Users, func(u *pb.User) bool { return u.Name == name }) {
				return nil
			}
		case "team":
			for _, t := range st.Teams {
				if t.Name == name && slices.ContainsFunc(t.Members, func(m string) bool { return m != deletedUser }) {
					return nil
				}
			}
		}
	}
	return pb.Errorf(pb.Code_CODE_DENIED, "refused: the cluster would be left without an admin (a user with admin on every repository); grant one first")
}
