package auth

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"golang.org/x/crypto/bcrypt"
	"google.golang.org/protobuf/proto"

	"github.com/meridian-registry/meridian/gateway"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

const testService = "unit"

// testAuthority holds alice (pull,push on app), a robot (pull on app) and
// one signing key.
func testAuthority(t *testing.T, cfg Config) *Authority {
	t.Helper()
	hash, err := bcrypt.GenerateFromPassword([]byte("alice-password"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.MarshalPKCS8PrivateKey(key)
	a := New(cfg)
	err = a.Update(&pb.AccessState{
		Version:   1,
		ClusterId: testService,
		Users:     []*pb.User{{Name: "alice", PasswordHash: hash}},
		Robots:    []*pb.Robot{{Name: "ci", SecretHash: HashRobotSecret("robot-secret"), Scopes: []*pb.Scope{{Prefix: "app", Actions: []string{"pull"}}}}},
		Grants:    []*pb.Grant{{Subject: "user:alice", Prefix: "app", Actions: []string{"pull", "push"}}},
		TokenKeys: &pb.TokenKeyRing{Keys: []*pb.TokenKey{{Id: "k1", PrivateKey: der}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func request(method, target string, body string) *http.Request {
	r := httptest.NewRequest(method, target, strings.NewReader(body))
	r.RemoteAddr = "192.0.2.1:1234"
	return r
}

func TestMatches(t *testing.T) {
	for _, c := range []struct {
		pattern, repo string
		want          bool
	}{
		{"", "a/b", true}, {"*", "a", true}, {"team/app", "team/app", true}, {"team/app", "team/app/web", true},
		{"team/app", "team/apple", false}, {"team/app/", "team/app/x", true}, {"team/*", "team/x", true},
		{"team/*", "team/x/y", false}, {"team/?", "team/x", true}, {"other", "team/app", false},
	} {
		if got := Matches(c.pattern, c.repo); got != c.want {
			t.Errorf("Matches(%q, %q) = %v, want %v", c.pattern, c.repo, got, c.want)
		}
	}
}

func TestFailedLoginsLockOut(t *testing.T) {
	a := testAuthority(t, Config{})
	r := request("GET", "/v2/", "")
	for i := 0; i < 10; i++ {
		if _, err := a.Login(r, "alice", "wrong"); codeOf(err) != "UNAUTHORIZED" {
			t.Fatalf("failure %d: %v", i, err)
		}
	}
	// Locked out: even the right password is refused for the window.
	if _, err := a.Login(r, "alice", "alice-password"); codeOf(err) != "TOOMANYREQUESTS" {
		t.Fatalf("after 10 failures: %v, want TOOMANYREQUESTS", err)
	}
	// Another user from another address is not affected.
	r2 := request("GET", "/v2/", "")
	r2.RemoteAddr = "198.51.100.7:1"
	if p, err := a.Login(r2, "robot+ci", "robot-secret"); err != nil || p != "robot:ci" {
		t.Fatalf("robot from elsewhere: %q %v", p, err)
	}
	// One address trying many names is stopped too (ten times the limit).
	b := testAuthority(t, Config{MaxFailures: 2})
	for i := 0; i < 20; i++ {
		b.Login(r, "user"+string(rune('a'+i)), "x")
	}
	if _, err := b.Login(r, "alice", "alice-password"); codeOf(err) != "TOOMANYREQUESTS" {
		t.Fatalf("after 20 failures from one address: %v", err)
	}
}

func codeOf(err error) string {
	if e, ok := err.(*gateway.Error); ok {
		return e.Code.Value
	}
	return ""
}

func TestTokenEndpoint(t *testing.T) {
	a := testAuthority(t, Config{})
	srv := httptest.NewServer(a.TokenHandler())
	defer srv.Close()
	decode := func(resp *http.Response) map[string]any {
		t.Helper()
		defer resp.Body.Close()
		var m map[string]any
		json.NewDecoder(resp.Body).Decode(&m)
		return m
	}
	// GET with Basic: the claim is what was asked and is allowed.
	req, _ := http.NewRequest("GET", srv.URL+"?service="+testService+"&scope=repository:app:pull,push,delete&scope=repository:other:pull&offline_token=true", nil)
	req.SetBasicAuth("alice", "alice-password")
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET token: %v %v", err, resp)
	}
	m := decode(resp)
	tok, refresh := m["token"].(string), m["refresh_token"].(string)
	if tok == "" || refresh == "" || m["access_token"] != tok {
		t.Fatalf("response %v", m)
	}
	c, err := a.parse(a.state.Load(), tok)
	if err != nil {
		t.Fatal(err)
	}
	got := accessMap(c.Access)
	if strings.Join(got["app"], ",") != "pull,push" || len(got["other"]) != 0 {
		t.Errorf("access claim %v, want app:pull,push and nothing on other", got)
	}
	// The refresh token is no access token.
	r := request("GET", "/v2/app/tags/list", "")
	r.Header.Set("Authorization", "Bearer "+refresh)
	if _, err := a.Authenticate(r); codeOf(err) != "UNAUTHORIZED" {
		t.Errorf("refresh token as bearer: %v", err)
	}
	// POST password grant (containerd) and refresh_token grant.
	resp, _ = http.PostForm(srv.URL, url.Values{"grant_type": {"password"}, "username": {"alice"}, "password": {"alice-password"},
		"service": {testService}, "scope": {"repository:app:pull"}, "access_type": {"offline"}})
	if m := decode(resp); resp.StatusCode != 200 || m["access_token"] == "" || m["refresh_token"] == nil {
		t.Errorf("password grant: %d %v", resp.StatusCode, m)
	}
	resp, _ = http.PostForm(srv.URL, url.Values{"grant_type": {"refresh_token"}, "refresh_token": {refresh}, "service": {testService}, "scope": {"repository:app:push"}})
	if m := decode(resp); resp.StatusCode != 200 || m["access_token"] == "" {
		t.Errorf("refresh grant: %d %v", resp.StatusCode, m)
	}
	for name, form := range map[string]url.Values{
		"wrong password":           {"grant_type": {"password"}, "username": {"alice"}, "password": {"nope"}},
		"access token as refresh":  {"grant_type": {"refresh_token"}, "refresh_token": {tok}},
		"tampered refresh":         {"grant_type": {"refresh_token"}, "refresh_token": {refresh[:len(refresh)-4] + "AAAA"}},
		"client_credentials grant": {"grant_type": {"client_credentials"}},
	} {
		resp, _ := http.PostForm(srv.URL, form)
		resp.Body.Close()
		if resp.StatusCode/100 != 4 {
			t.Errorf("%s: %d, want a 4xx", name, resp.StatusCode)
		}
	}
	// Another service name is refused; anonymous gets a token with nothing.
	resp, _ = http.Get(srv.URL + "?service=elsewhere&scope=repository:app:pull")
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("other service: %d", resp.StatusCode)
	}
	resp.Body.Close()
	resp, _ = http.Get(srv.URL + "?service=" + testService + "&scope=repository:app:pull")
	m = decode(resp)
	c, _ = a.parse(a.state.Load(), m["token"].(string))
	if c.Subject != Anonymous || len(accessMap(c.Access)["app"]) != 0 {
		t.Errorf("anonymous token: %v", c)
	}
}

// writeJWKS writes one RSA key as a JWKS file.
func writeJWKS(t *testing.T, key *rsa.PrivateKey, kid string) string {
	t.Helper()
	b64 := func(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }
	jwks := map[string]any{"keys": []map[string]string{{"kty": "RSA", "kid": kid,
		"n": b64(key.N.Bytes()), "e": b64(big.NewInt(int64(key.E)).Bytes())}}}
	p := filepath.Join(t.TempDir(), "jwks.json")
	b, _ := json.Marshal(jwks)
	os.WriteFile(p, b, 0o600)
	return p
}

func TestExternalIssuer(t *testing.T) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ext, err := LoadExternal("https://idp.example", "registry", writeJWKS(t, key, "idp-1"))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	a := testAuthority(t, Config{External: []*External{ext}, Leeway: 30 * time.Second})
	sign := func(method jwt.SigningMethod, signKey any, mutate func(jwt.MapClaims)) string {
		c := jwt.MapClaims{"iss": "https://idp.example", "aud": "registry", "sub": "carol",
			"exp": now.Add(time.Minute).Unix(), "iat": now.Unix(),
			"access": []map[string]any{{"type": "repository", "name": "idp/app", "actions": []string{"pull", "push"}}}}
		if mutate != nil {
			mutate(c)
		}
		tok := jwt.NewWithClaims(method, c)
		tok.Header["kid"] = "idp-1"
		s, err := tok.SignedString(signKey)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	auth := func(tok string) (gateway.Caller, error) {
		r := request("GET", "/v2/idp/app/tags/list", "")
		r.Header.Set("Authorization", "Bearer "+tok)
		return a.Authenticate(r)
	}
	c, err := auth(sign(jwt.SigningMethodRS256, key, nil))
	if err != nil {
		t.Fatalf("valid IdP token: %v", err)
	}
	if !c.Can("idp/app", "push") || c.Can("idp/app", "delete") || c.Can("app", "pull") {
		t.Errorf("IdP token grants the wrong things")
	}
	if c.Actor().Principal != "external:https://idp.example/carol" {
		t.Errorf("principal %q", c.Actor().Principal)
	}
	// Within the leeway an expired token still passes; beyond, not.
	if _, err := auth(sign(jwt.SigningMethodRS256, key, func(m jwt.MapClaims) { m["exp"] = now.Add(-10 * time.Second).Unix() })); err != nil {
		t.Errorf("expired 10s ago, leeway 30s: %v", err)
	}
	pubDER, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
	other, _ := rsa.GenerateKey(rand.Reader, 2048)
	for name, tok := range map[string]string{
		"expired beyond the leeway": sign(jwt.SigningMethodRS256, key, func(m jwt.MapClaims) { m["exp"] = now.Add(-2 * time.Minute).Unix() }),
		"wrong audience":            sign(jwt.SigningMethodRS256, key, func(m jwt.MapClaims) { m["aud"] = "someone-else" }),
		"other key":                 sign(jwt.SigningMethodRS256, other, nil),
		// Algorithm confusion: HMAC keyed with the public key's bytes.
		"HS256 with the public key": sign(jwt.SigningMethodHS256, pubDER, nil),
		"alg none":                  sign(jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, nil),
		"no subject":                sign(jwt.SigningMethodRS256, key, func(m jwt.MapClaims) { delete(m, "sub") }),
	} {
		if _, err := auth(tok); codeOf(err) != "UNAUTHORIZED" {
			t.Errorf("%s: %v, want UNAUTHORIZED", name, err)
		}
	}
}

// A token ends with the credentials it was issued under: a password change
// or an account created again under the same name refuses it, and an older
// state never replaces a newer one. Tokens of another issuer or an
// unknown kid are refused.
func TestTokensFollowTheAccount(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	clock := now
	a := testAuthority(t, Config{Now: func() time.Time { return clock }})
	s := a.state.Load()
	issue := func(principal string) string {
		c := newClaims(s, principal, clock, time.Hour)
		tok, err := a.sign(s, c)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	use := func(tok string) error {
		r := request("GET", "/v2/app/tags/list", "")
		r.Header.Set("Authorization", "Bearer "+tok)
		_, err := a.Authenticate(r)
		return err
	}
	aliceTok, robotTok := issue("user:alice"), issue("robot:ci")
	if use(aliceTok) != nil || use(robotTok) != nil {
		t.Fatal("fresh tokens refused")
	}
	// Another issuer, and a kid the ring does not have.
	other := newClaims(s, "user:alice", clock, time.Hour)
	other.Issuer = "meridian/elsewhere"
	tok, _ := a.sign(s, other)
	if codeOf(use(tok)) != "UNAUTHORIZED" {
		t.Error("a token of another issuer was accepted")
	}
	jt := jwt.NewWithClaims(jwt.SigningMethodES256, newClaims(s, "user:alice", clock, time.Hour))
	jt.Header["kid"] = "k2"
	tok, _ = jt.SignedString(s.signing.private)
	if codeOf(use(tok)) != "UNAUTHORIZED" {
		t.Error("a token with an unknown kid was accepted")
	}

	// Ten seconds later alice changes her password, and ci is revoked and
	// created again under its name.
	clock = now.Add(10 * time.Second)
	st := &pb.AccessState{Version: 2, ClusterId: testService,
		Users:     []*pb.User{{Name: "alice", PasswordHash: s.users["alice"].PasswordHash, UpdatedUnixNano: clock.UnixNano()}},
		Robots:    []*pb.Robot{{Name: "ci", SecretHash: HashRobotSecret("new-secret"), CreatedUnixNano: clock.UnixNano(), Scopes: s.robots["ci"].Scopes}},
		Grants:    []*pb.Grant{{Subject: "user:alice", Prefix: "app", Actions: []string{"pull", "push"}}},
		TokenKeys: &pb.TokenKeyRing{Keys: []*pb.TokenKey{{Id: "k1", PrivateKey: mustPKCS8(t, s.signing.private)}}},
	}
	if err := a.Update(st); err != nil {
		t.Fatal(err)
	}
	if codeOf(use(aliceTok)) != "UNAUTHORIZED" || codeOf(use(robotTok)) != "UNAUTHORIZED" {
		t.Error("tokens issued before the credentials changed are still accepted")
	}
	s = a.state.Load()
	if use(issue("user:alice")) != nil {
		t.Error("a token issued after the change is refused")
	}
	// The old state (version 1) does not come back.
	old := proto.Clone(st).(*pb.AccessState)
	old.Version = 1
	old.Grants = []*pb.Grant{{Subject: "user:alice", Prefix: "", Actions: []string{"admin"}}}
	a.Update(old)
	if a.Version() != 2 || a.IsAdmin("user:alice") {
		t.Errorf("an older state replaced a newer one: version %d", a.Version())
	}
}

func mustPKCS8(t *testing.T, k *ecdsa.PrivateKey) []byte {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return der
}
