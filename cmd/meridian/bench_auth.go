package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// How the bench logs in to the node it starts: the first admin's Basic
// credentials for the pushes and pulls, a Bearer token for the manifest
// load, and a grant of anonymous pull for the same load without
// credentials.

// basicAuth adds Basic credentials to the requests to host that carry no
// Authorization of their own. Only to host: a blob GET redirected to
// storage must not take the password along.
type basicAuth struct {
	host, user, password string
	base                 http.RoundTripper
}

func (b basicAuth) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.URL.Host != b.host || r.Header.Get("Authorization") != "" {
		return b.base.RoundTrip(r)
	}
	r = r.Clone(r.Context())
	r.SetBasicAuth(b.user, b.password)
	return b.base.RoundTrip(r)
}

// CloseIdleConnections lets http.Client.CloseIdleConnections reach the
// wrapped transport.
func (b basicAuth) CloseIdleConnections() {
	if c, ok := b.base.(interface{ CloseIdleConnections() }); ok {
		c.CloseIdleConnections()
	}
}

// benchAuth holds the credentials of a Meridian node the bench started.
type benchAuth struct {
	node   *meridianNode
	basic  string // Authorization value with the admin's Basic credentials
	bearer string // "Bearer TOKEN" for the manifest load
	// expires is when bearer stops being valid.
	expires time.Time
}

func newBenchAuth(n *meridianNode) *benchAuth {
	return &benchAuth{node: n, basic: "Basic " + base64.StdEncoding.EncodeToString([]byte(benchAdmin+":"+n.password))}
}

// wrap returns t with the admin's Basic credentials on requests to the node.
func (a *benchAuth) wrap(t http.RoundTripper) http.RoundTripper {
	u, _ := url.Parse(a.node.base)
	return basicAuth{host: u.Host, user: benchAdmin, password: a.node.password, base: t}
}

// tokenURL asks for pull on the bench repository, as a client about to
// pull it would.
func (a *benchAuth) tokenURL() string {
	q := url.Values{"scope": {"repository:" + benchRepo + ":pull"}}
	if a.node.clusterID != "" {
		q.Set("service", a.node.clusterID)
	}
	return a.node.base + "/auth/token?" + q.Encode()
}

// bearerFor returns the Authorization value for a manifest load of d: a
// token fetched once, and again only if it would expire during the load
// (a --duration longer than the token's lifetime).
func (a *benchAuth) bearerFor(ctx context.Context, c *http.Client, d time.Duration) (string, error) {
	if a.bearer != "" && time.Now().Add(d+30*time.Second).Before(a.expires) {
		return a.bearer, nil
	}
	start := time.Now()
	tr, err := fetchToken(ctx, c, a.tokenURL(), a.basic)
	if err != nil {
		return "", err
	}
	ttl := time.Duration(tr.ExpiresIn) * time.Second
	if tr.ExpiresIn <= 0 {
		ttl = 60 * time.Second // the token spec's default
	}
	a.bearer, a.expires = "Bearer "+tr.Token, start.Add(ttl)
	return a.bearer, nil
}

// grantAnonymousPull lets requests without credentials pull the bench
// repository, through the admin gRPC API as `meridian access grant` does.
// The node answers once the grant applies to its own requests.
func (a *benchAuth) grantAnonymousPull(ctx context.Context) error {
	if a.node.grpcAddr == "" {
		return errors.New("the ready file names no grpc_addr, which granting anonymous pull needs")
	}
	conn, err := grpc.NewClient(a.node.grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithPerRPCCredentials(basicCredentials{a.basic}))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	g := &pb.Grant{Subject: "anonymous", Prefix: benchRepo, Actions: []string{"pull"}}
	if _, err := pb.NewAdminClient(conn).ManageAccess(ctx, &pb.ManageAccessRequest{Op: &pb.ManageAccessRequest_Grant{Grant: g}}); err != nil {
		return fmt.Errorf("granting anonymous pull on %s: %w", benchRepo, err)
	}
	return nil
}

// tokenReply is the token endpoint's answer (Docker's token spec; OAuth2
// clients read access_token).
type tokenReply struct {
	Token       string `json:"token"`
	AccessToken string `json:"access_token"`
	ExpiresIn   int    `json:"expires_in"`
}

// fetchToken GETs a token from url with the Authorization value given.
func fetchToken(ctx context.Context, c *http.Client, url, authorization string) (tokenReply, error) {
	var tr tokenReply
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return tr, err
	}
	req.Header.Set("Authorization", authorization)
	resp, err := c.Do(req)
	if err != nil {
		return tr, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return tr, statusError("GET token", resp)
	}
	err = json.NewDecoder(resp.Body).Decode(&tr)
	io.Copy(io.Discard, resp.Body) // for the connection's reuse
	if err != nil {
		return tr, fmt.Errorf("GET token: %w", err)
	}
	if tr.Token == "" {
		tr.Token = tr.AccessToken
	}
	if tr.Token == "" {
		return tr, errors.New("GET token: the answer holds no token")
	}
	return tr, nil
}

// tokenLoad GETs url with authorization from concurrency clients for d.
func tokenLoad(ctx context.Context, c *http.Client, url, authorization string, concurrency int, d time.Duration) loadSample {
	return closedLoop(ctx, concurrency, d, func() func() error {
		return func() error {
			_, err := fetchToken(ctx, c, url, authorization)
			return err
		}
	})
}
