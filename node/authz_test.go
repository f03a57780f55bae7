package node_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/meridian-registry/meridian/gateway"
	"github.com/meridian-registry/meridian/gateway/auth"
	"github.com/meridian-registry/meridian/node"
	"github.com/meridian-registry/meridian/node/clustertest"
	"github.com/meridian-registry/meridian/node/clustertest/admin"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// The authorization matrix: every /v2/ endpoint, called by every kind of
// caller, against a node and against a standalone gateway. Each cell is
// the status and OCI error code the caller must get.

// matrixCaller is one caller of the matrix: how it authenticates, and
// what it may do on the repository its cells target.
type matrixCaller struct {
	name string
	// repo is the repository the caller's cells act on.
	repo string
	// auth returns the Authorization header ("" for none).
	auth func() string
	// may lists the actions the caller holds on repo; invalid callers
	// hold nothing and get 401 everywhere.
	may     []string
	invalid bool
	// anonymous callers are asked to log in (401) where they lack access.
	anonymous bool
	// reauth: a token narrower than its account; a 401 asks for a
	// token with the scope (insufficient_scope) instead of a 403.
	reauth []string
	// pullAll: may pull every repository (mounts without from).
	pullAll bool
	// pullFrom: may pull the mount source.
	pullFrom bool
	// base: /v2/ answers 200 (any valid, non-anonymous caller).
	base bool
}

func (c matrixCaller) can(action string) bool { return slices.Contains(c.may, action) }

// refusal is the status and code when the caller lacks action.
func (c matrixCaller) refusal(action string) (int, string) {
	switch {
	case c.invalid || c.anonymous || slices.Contains(c.reauth, action):
		return http.StatusUnauthorized, "UNAUTHORIZED"
	}
	return http.StatusForbidden, "DENIED"
}

func basicAuth(user, pass string) func() string {
	return func() string {
		return "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+pass))
	}
}

func bearer(tok string) func() string { return func() string { return "Bearer " + tok } }

// accessSetup creates the users, team, robots and grants of the matrix
// through the admin API of node 0, and returns their secrets.
type accessSetup struct {
	t      *testing.T
	ctx    context.Context
	admin  pb.AdminClient
	robots map[string]string
}

func (a *accessSetup) manage(req *pb.ManageAccessRequest) *pb.ManageAccessResponse {
	a.t.Helper()
	resp, err := a.admin.ManageAccess(a.ctx, req)
	if err != nil {
		a.t.Fatalf("ManageAccess %v: %v", req, err)
	}
	return resp
}

func (a *accessSetup) user(name, password string) {
	a.manage(&pb.ManageAccessRequest{Op: &pb.ManageAccessRequest_AddUser{AddUser: &pb.AddUserOp{Name: name, Password: password}}})
}

func (a *accessSetup) grant(subject, prefix string, actions ...string) {
	a.manage(&pb.ManageAccessRequest{Op: &pb.ManageAccessRequest_Grant{Grant: &pb.Grant{Subject: subject, Prefix: prefix, Actions: actions}}})
}

func (a *accessSetup) robot(name string, expires int64, scopes ...*pb.Scope) string {
	resp := a.manage(&pb.ManageAccessRequest{Op: &pb.ManageAccessRequest_CreateRobot{CreateRobot: &pb.CreateRobotOp{Name: name, Scopes: scopes, ExpiresInSeconds: expires}}})
	return resp.Secret
}

const matrixPassword = "matrix-password-1"

// registryToken fetches a token from base's token endpoint.
func registryToken(t *testing.T, base, service, user, pass string, scopes ...string) string {
	t.Helper()
	q := "service=" + service
	for _, s := range scopes {
		q += "&scope=" + s
	}
	req, _ := http.NewRequest(http.MethodGet, base+"/auth/token?"+q, nil)
	if user != "" {
		req.SetBasicAuth(user, pass)
	}
	resp, err := rawClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body struct {
		Token string `json:"token"`
	}
	if resp.StatusCode != http.StatusOK || json.NewDecoder(resp.Body).Decode(&body) != nil || body.Token == "" {
		t.Fatalf("token for %s: %s", user, resp.Status)
	}
	return body.Token
}

// rawClient carries no credentials but those a request sets itself.
var rawClient = &http.Client{Transport: &http.Transport{}, Timeout: 30 * time.Second}

// forge signs claims with key (nil: a fresh key the cluster never saw)
// under kid, with ES256.
func forge(t *testing.T, key *ecdsa.PrivateKey, kid string, claims jwt.MapClaims) string {
	t.Helper()
	if key == nil {
		var err error
		if key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
			t.Fatal(err)
		}
	}
	tok := jwt.NewWithClaims(jwt.SigningMethodES256, claims)
	tok.Header["kid"] = kid
	s, err := tok.SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestAuthorizationMatrix(t *testing.T) {
	// The matrix makes dozens of failed logins from one address on
	// purpose; TestFailedLoginsLockOut checks the default limit.
	const failures = 1000
	g := newDirGeo(t, 1, clustertest.WithConfig(func(_ int, c *node.Config) { c.Auth.MaxFailedLogins = failures }))
	c := g.c
	ctx := within(t, 4*time.Minute)
	gw := startGateway(t, g, "gw-authz", "us-east", nil, func(sc *gateway.StandaloneConfig) {
		sc.Access = auth.New(auth.Config{Via: sc.ID, MaxFailures: failures})
	})
	g.waitTopology(t, ctx)

	a := &accessSetup{t: t, ctx: ctx, admin: adminClient(t, c, 0)}
	for _, u := range []string{"reader", "writer", "deleter", "mounter", "teamer", "nobody"} {
		a.user(u, matrixPassword)
	}
	a.grant("user:reader", "mx", "pull")
	a.grant("user:writer", "mx/*", "pull", "push") // a glob
	a.grant("user:deleter", "mx", "pull", "delete")
	a.grant("user:mounter", "mx", "pull", "push")
	a.grant("user:mounter", "src", "pull")
	a.manage(&pb.ManageAccessRequest{Op: &pb.ManageAccessRequest_PutTeam{PutTeam: &pb.Team{Name: "crew", Members: []string{"teamer"}}}})
	a.grant("team:crew", "mx", "pull", "push")
	a.grant("anonymous", "pub", "pull")
	inScope := a.robot("ci", 0, &pb.Scope{Prefix: "mx", Actions: []string{"pull", "push"}})
	expired := a.robot("old", 1, &pb.Scope{Prefix: "mx", Actions: []string{"pull"}})
	revoked := a.robot("gone", 0, &pb.Scope{Prefix: "mx", Actions: []string{"pull"}})
	a.manage(&pb.ManageAccessRequest{Op: &pb.ManageAccessRequest_RevokeRobot{RevokeRobot: "gone"}})

	st, err := pb.NewGatewayClient(adminConn(t, c, 0)).GetAccessState(ctx, &pb.GetAccessStateRequest{})
	if err != nil {
		t.Fatal(err)
	}
	service := st.State.ClusterId
	ring := st.State.TokenKeys.Keys
	signer := ring[len(ring)-1]
	parsed, err := x509.ParsePKCS8PrivateKey(signer.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	clusterKey := parsed.(*ecdsa.PrivateKey)

	// Content the cells act on, pushed by the admin.
	for _, repo := range []string{"mx/app", "pub/app", "src/app", "other/app"} {
		b := pushBlobs(t, ctx, c, 0, repo)
		if _, code, err := putManifest(ctx, c.Client(), c.URL(0), repo, "v1", manifestBody(b, 0)); err != nil || code != http.StatusCreated {
			t.Fatalf("seed %s: %d %v", repo, code, err)
		}
	}
	srcBlob := digestOf([]byte("only in src/app"))
	pushBlob(t, ctx, c.Client(), c.URL(0), "src/app", []byte("only in src/app"))
	time.Sleep(1500 * time.Millisecond) // robot "old" expires

	for _, target := range []struct {
		name string
		base string
	}{{"node", c.URL(0)}, {"gateway", "http://" + gw.HTTPAddr()}} {
		t.Run(target.name, func(t *testing.T) {
			base := target.base
			// The gateway follows the access state: wait until it has the
			// revocation above (the last change).
			waitFor(t, ctx, "the access state on "+target.name, func() bool {
				return httpStatus(t, base, "GET", "/v2/mx/app/tags/list", basicAuth("robot+gone", revoked)(), nil) == http.StatusUnauthorized &&
					httpStatus(t, base, "GET", "/v2/mx/app/tags/list", basicAuth("robot+ci", inScope)(), nil) == http.StatusOK
			})
			now := time.Now()
			claims := func(sub string, access []map[string]any, mutate func(jwt.MapClaims)) jwt.MapClaims {
				m := jwt.MapClaims{"iss": "meridian/" + service, "sub": sub, "aud": service,
					"exp": now.Add(time.Minute).Unix(), "nbf": now.Add(-time.Minute).Unix(), "iat": now.Unix(), "access": access}
				if mutate != nil {
					mutate(m)
				}
				return m
			}
			pullPush := []map[string]any{{"type": "repository", "name": "mx/app", "actions": []string{"pull", "push", "delete"}}}
			writerPull := registryToken(t, base, service, "writer", matrixPassword, "repository:mx/app:pull")
			readerPull := registryToken(t, base, service, "reader", matrixPassword, "repository:mx/app:pull,push")
			writerAll := registryToken(t, base, service, "writer", matrixPassword, "repository:mx/app:pull,push")
			// Tampered: the reader's token with push added to its claims,
			// signature kept.
			parts := strings.Split(readerPull, ".")
			payload, _ := base64.RawURLEncoding.DecodeString(parts[1])
			payload = bytes.Replace(payload, []byte(`"actions":["pull"]`), []byte(`"actions":["pull","push","delete"]`), 1)
			tampered := parts[0] + "." + base64.RawURLEncoding.EncodeToString(payload) + "." + parts[2]
			none := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"none","typ":"JWT"}`)) + "." +
				base64.RawURLEncoding.EncodeToString(mustJSON(t, claims("user:writer", pullPush, nil))) + "."

			full := []string{"pull", "push", "delete"}
			callers := []matrixCaller{
				{name: "anonymous", repo: "mx/app", auth: func() string { return "" }, anonymous: true},
				{name: "anonymous on a public prefix", repo: "pub/app", auth: func() string { return "" }, anonymous: true, may: []string{"pull"}},
				{name: "reader", repo: "mx/app", auth: basicAuth("reader", matrixPassword), may: []string{"pull"}, base: true},
				{name: "writer (glob grant)", repo: "mx/app", auth: basicAuth("writer", matrixPassword), may: []string{"pull", "push"}, base: true},
				{name: "deleter", repo: "mx/app", auth: basicAuth("deleter", matrixPassword), may: []string{"pull", "delete"}, base: true},
				{name: "admin", repo: "mx/app", auth: basicAuth("admin", admin.AdminPassword), may: full, pullAll: true, pullFrom: true, base: true},
				{name: "mounter", repo: "mx/app", auth: basicAuth("mounter", matrixPassword), may: []string{"pull", "push"}, pullFrom: true, base: true},
				{name: "team member", repo: "mx/app", auth: basicAuth("teamer", matrixPassword), may: []string{"pull", "push"}, base: true},
				{name: "user without grants", repo: "mx/app", auth: basicAuth("nobody", matrixPassword), base: true},
				{name: "wrong password", repo: "mx/app", auth: basicAuth("writer", "not-the-password"), invalid: true},
				{name: "robot in scope", repo: "mx/app", auth: basicAuth("robot+ci", inScope), may: []string{"pull", "push"}, base: true},
				{name: "robot out of scope", repo: "other/app", auth: basicAuth("robot+ci", inScope), base: true},
				{name: "expired robot", repo: "mx/app", auth: basicAuth("robot+old", expired), invalid: true},
				{name: "revoked robot", repo: "mx/app", auth: basicAuth("robot+gone", revoked), invalid: true},
				{name: "token", repo: "mx/app", auth: bearer(writerAll), may: []string{"pull", "push"}, base: true},
				{name: "pull-only token of a reader", repo: "mx/app", auth: bearer(readerPull), may: []string{"pull"}, base: true},
				{name: "pull-only token of a writer", repo: "mx/app", auth: bearer(writerPull), may: []string{"pull"}, reauth: []string{"push"}, base: true},
				{name: "expired token", repo: "mx/app", invalid: true, auth: bearer(forge(t, clusterKey, signer.Id, claims("user:writer", pullPush, func(m jwt.MapClaims) {
					m["exp"] = now.Add(-10 * time.Minute).Unix()
				})))},
				{name: "token signed by another key", repo: "mx/app", invalid: true, auth: bearer(forge(t, nil, signer.Id, claims("user:admin", pullPush, nil)))},
				{name: "alg none", repo: "mx/app", invalid: true, auth: bearer(none)},
				{name: "wrong audience", repo: "mx/app", invalid: true, auth: bearer(forge(t, clusterKey, signer.Id, claims("user:writer", pullPush, func(m jwt.MapClaims) {
					m["aud"] = "another-registry"
				})))},
				{name: "tampered claims", repo: "mx/app", invalid: true, auth: bearer(tampered)},
				{name: "another issuer", repo: "mx/app", invalid: true, auth: bearer(forge(t, clusterKey, signer.Id, claims("user:writer", pullPush, func(m jwt.MapClaims) {
					m["iss"] = "meridian/another-cluster"
				})))},
				{name: "unknown kid", repo: "mx/app", invalid: true, auth: bearer(forge(t, clusterKey, "no-such-key", claims("user:writer", pullPush, nil)))},
			}
			for i, cl := range callers {
				t.Run(cl.name, func(t *testing.T) {
					runMatrixRow(t, ctx, c, base, cl, srcBlob, i)
				})
			}
		})
	}
}

// cell is one request of a matrix row.
type cell struct {
	name    string
	method  string
	path    string
	body    []byte
	header  map[string]string
	need    string // action needed on the row's repository ("": none)
	success int
	// pullFrom/pullAll: a mount that needs more than push; without it the
	// answer is a plain upload session (202).
	mountFrom, mountAny bool
}

func runMatrixRow(t *testing.T, ctx context.Context, c *clustertest.Cluster, base string, cl matrixCaller, srcBlob string, row int) {
	repo := cl.repo
	adminHTTP := c.Client()
	adminBase := c.URL(0)
	// Fresh things for the writes of this row, made by the admin.
	k := 1000 + row
	freshManifest, code, err := putManifest(ctx, adminHTTP, adminBase, repo, fmt.Sprintf("del-%d", row), manifestBodyIn(t, ctx, c, repo, k))
	if err != nil || code != http.StatusCreated {
		t.Fatalf("fresh manifest: %d %v", code, err)
	}
	freshBlob := fmt.Appendf(nil, "blob of row %d", row)
	pushBlob(t, ctx, adminHTTP, adminBase, repo, freshBlob)
	// Sessions are the cluster's, not one member's: the admin opens them
	// on node 0, the caller continues them on the target.
	session := func() string { return pathOf(startUpload(t, ctx, adminHTTP, adminBase, repo)) }
	layer := digestOf([]byte("a small layer"))
	data := fmt.Appendf(nil, "upload of row %d", row)

	cells := []cell{
		{name: "base", method: "GET", path: "/v2/", success: 200},
		{name: "catalog", method: "GET", path: "/v2/_catalog", success: 200},
		{name: "tags list", method: "GET", path: "/v2/" + repo + "/tags/list", need: "pull", success: 200},
		{name: "manifest GET", method: "GET", path: "/v2/" + repo + "/manifests/v1", need: "pull", success: 200},
		{name: "manifest HEAD", method: "HEAD", path: "/v2/" + repo + "/manifests/v1", need: "pull", success: 200},
		{name: "manifest PUT", method: "PUT", path: fmt.Sprintf("/v2/%s/manifests/put-%d", repo, row), body: manifestBodyIn(t, ctx, c, repo, k+500),
			header: map[string]string{"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, need: "push", success: 201},
		{name: "manifest DELETE", method: "DELETE", path: "/v2/" + repo + "/manifests/" + freshManifest, need: "delete", success: 202},
		{name: "blob GET", method: "GET", path: "/v2/" + repo + "/blobs/" + layer, need: "pull", success: 200},
		{name: "blob HEAD", method: "HEAD", path: "/v2/" + repo + "/blobs/" + layer, need: "pull", success: 200},
		{name: "blob DELETE", method: "DELETE", path: "/v2/" + repo + "/blobs/" + digestOf(freshBlob), need: "delete", success: 202},
		{name: "upload POST", method: "POST", path: "/v2/" + repo + "/blobs/uploads/", need: "push", success: 202},
		{name: "upload PATCH", method: "PATCH", path: session(), body: data, header: map[string]string{"Content-Type": "application/octet-stream"}, need: "push", success: 202},
		{name: "upload PUT", method: "PUT", path: withDigest(session(), digestOf(data)), body: data, header: map[string]string{"Content-Type": "application/octet-stream"}, need: "push", success: 201},
		{name: "upload GET", method: "GET", path: session(), need: "push", success: 204},
		{name: "upload DELETE", method: "DELETE", path: session(), need: "push", success: 204},
		{name: "mount with from", method: "POST", path: "/v2/" + repo + "/blobs/uploads/?mount=" + srcBlob + "&from=src/app", need: "push", success: 201, mountFrom: true},
		{name: "mount without from", method: "POST", path: "/v2/" + repo + "/blobs/uploads/?mount=" + srcBlob, need: "push", success: 201, mountAny: true},
		{name: "referrers", method: "GET", path: "/v2/" + repo + "/referrers/" + layer, need: "pull", success: 200},
	}
	for _, ce := range cells {
		wantStatus, wantCode := ce.success, ""
		switch {
		case cl.invalid:
			wantStatus, wantCode = http.StatusUnauthorized, "UNAUTHORIZED"
		case ce.name == "base" && !cl.base:
			wantStatus, wantCode = http.StatusUnauthorized, "UNAUTHORIZED"
		case ce.need != "" && !cl.can(ce.need):
			wantStatus, wantCode = cl.refusal(ce.need)
		case ce.mountFrom && !cl.pullFrom, ce.mountAny && !cl.pullAll:
			wantStatus = http.StatusAccepted // a plain upload instead
		}
		hdr := map[string]string{}
		for k, v := range ce.header {
			hdr[k] = v
		}
		if h := cl.auth(); h != "" {
			hdr["Authorization"] = h
		}
		got, code, challenge := call(t, ctx, base, ce.method, ce.path, ce.body, hdr)
		if got != wantStatus || (wantCode != "" && ce.method != "HEAD" && code != wantCode) {
			t.Errorf("%s %s: got %d %s, want %d %s", ce.name, ce.path, got, code, wantStatus, wantCode)
		}
		if got == http.StatusUnauthorized && !strings.HasPrefix(challenge, `Bearer realm="`) {
			t.Errorf("%s: 401 without a Bearer challenge (%q)", ce.name, challenge)
		}
		if got == http.StatusUnauthorized && ce.need != "" && !strings.Contains(challenge, `scope="repository:`+repo+`:`) {
			t.Errorf("%s: challenge %q names no scope for %s", ce.name, challenge, repo)
		}
	}
}

// call makes one request and returns the status, the OCI error code and
// the challenge.
func call(t *testing.T, ctx context.Context, base, method, path string, body []byte, hdr map[string]string) (int, string, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, method, base+path, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := rawClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	var env struct {
		Errors []struct {
			Code string `json:"code"`
		} `json:"errors"`
	}
	b, _ := io.ReadAll(resp.Body)
	json.Unmarshal(b, &env)
	code := ""
	if len(env.Errors) > 0 {
		code = env.Errors[0].Code
	}
	return resp.StatusCode, code, resp.Header.Get("WWW-Authenticate")
}

func httpStatus(t *testing.T, base, method, path, auth string, body []byte) int {
	t.Helper()
	hdr := map[string]string{}
	if auth != "" {
		hdr["Authorization"] = auth
	}
	s, _, _ := call(t, context.Background(), base, method, path, body, hdr)
	return s
}

func mustJSON(t *testing.T, v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// manifestBodyIn is manifestBody over blobs that repo holds.
func manifestBodyIn(t *testing.T, ctx context.Context, c *clustertest.Cluster, repo string, k int) []byte {
	return manifestBody(pushBlobs(t, ctx, c, 0, repo), k)
}

// pushBlob uploads b into repo monolithically (POST then PUT).
func pushBlob(t *testing.T, ctx context.Context, client *http.Client, base, repo string, b []byte) {
	t.Helper()
	loc := startUpload(t, ctx, client, base, repo)
	req, _ := http.NewRequestWithContext(ctx, http.MethodPut, withDigest(loc, digestOf(b)), bytes.NewReader(b))
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("push blob into %s: %s", repo, resp.Status)
	}
}

// startUpload opens an upload session and returns its absolute URL.
func startUpload(t *testing.T, ctx context.Context, client *http.Client, base, repo string) string {
	t.Helper()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v2/"+repo+"/blobs/uploads/", nil)
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("start upload in %s: %s", repo, resp.Status)
	}
	loc := resp.Header.Get("Location")
	if strings.HasPrefix(loc, "/") {
		loc = base + loc
	}
	return loc
}

func withDigest(loc, d string) string {
	if strings.Contains(loc, "?") {
		return loc + "&digest=" + d
	}
	return loc + "?digest=" + d
}

// pathOf is the path and query of an absolute URL.
func pathOf(u string) string {
	if i := strings.Index(u, "://"); i >= 0 {
		if j := strings.Index(u[i+3:], "/"); j >= 0 {
			return u[i+3+j:]
		}
	}
	return u
}
