package admin

import (
	"context"
	"encoding/base64"

	"google.golang.org/grpc/credentials"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Clusters the test harnesses start run with authentication on: the
// bootstrapping node creates the first admin with AdminPassword, and the
// harnesses' HTTP clients log in as that admin unless a request carries
// credentials of its own.
const (
	AdminUser     = "admin"
	AdminPassword = "clustertest-admin-password"
)

// PasswordFile writes AdminPassword to a file of t's and returns its
// path, for Config.Auth.AdminPasswordFile.
func PasswordFile(t testing.TB) string {
	p := filepath.Join(t.TempDir(), "admin-password")
	if err := os.WriteFile(p, []byte(AdminPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// Transport wraps rt so that registry requests (/v2/, /auth/) without an
// Authorization header carry the admin's Basic credentials.
func Transport(rt http.RoundTripper) http.RoundTripper { return adminTransport{rt} }

type adminTransport struct{ base http.RoundTripper }

func (a adminTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Header.Get("Authorization") == "" && (strings.HasPrefix(r.URL.Path, "/v2") || strings.HasPrefix(r.URL.Path, "/auth/")) {
		r = r.Clone(r.Context())
		r.SetBasicAuth(AdminUser, AdminPassword)
	}
	return a.base.RoundTrip(r)
}

func (a adminTransport) CloseIdleConnections() {
	if c, ok := a.base.(interface{ CloseIdleConnections() }); ok {
		c.CloseIdleConnections()
	}
}

func (a adminTransport) Unwrap() http.RoundTripper { return a.base }

// Credentials sends the admin's Basic credentials with each gRPC call
// (grpc.WithPerRPCCredentials): nodes without cluster TLS require them on
// admin methods.
func Credentials() credentials.PerRPCCredentials { return grpcBasic{} }

type grpcBasic struct{}

func (grpcBasic) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Basic " + base64.StdEncoding.EncodeToString([]byte(AdminUser+":"+AdminPassword))}, nil
}

func (grpcBasic) RequireTransportSecurity() bool { return false }
