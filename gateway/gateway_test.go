package gateway

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
	"github.com/meridian-registry/meridian/replication"
)

// harness is a real Gateway over a filesystem blob store and fake metadata,
// served over HTTP.
type harness struct {
	gw    *Gateway
	meta  *fakeMetadata
	store *replication.Filesystem
	srv   *httptest.Server
}

func newHarness(t *testing.T, tweaks ...func(*Config)) *harness {
	t.Helper()
	store, err := replication.NewFilesystem(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	meta := newFakeMetadata(t)
	cfg := DefaultConfig()
	cfg.Logger = slog.New(slog.DiscardHandler)
	for _, tweak := range tweaks {
		tweak(&cfg)
	}
	stores := replication.NewRegions("local")
	stores.Add("local", store)
	gw, err := New(cfg, meta, stores)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(gw.Handler())
	t.Cleanup(srv.Close)
	return &harness{gw: gw, meta: meta, store: store, srv: srv}
}

// reply is a response read in full.
type reply struct {
	status int
	header http.Header
	body   []byte
}

// do sends one request; header holds name, value pairs. A path may carry a
// query.
func (h *harness) do(t *testing.T, method, path string, body io.Reader, header ...string) reply {
	t.Helper()
	req, err := http.NewRequest(method, h.srv.URL+path, body)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Add(header[i], header[i+1])
	}
	resp, err := h.srv.Client().Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading body: %v", method, path, err)
	}
	return reply{resp.StatusCode, resp.Header, b}
}

// raw sends a hand-written request on its own connection: the request line
// and headers, Content-Length declared as length whatever body holds, then
// body, then a half-close, as a client that dies mid-request would.
func (h *harness) raw(t *testing.T, method, path string, length int, body []byte, header ...string) reply {
	t.Helper()
	conn, err := net.Dial("tcp", h.srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: registry.test\r\nContent-Length: %d\r\n", method, path, length)
	for i := 0; i+1 < len(header); i += 2 {
		fmt.Fprintf(&b, "%s: %s\r\n", header[i], header[i+1])
	}
	b.WriteString("\r\n")
	if _, err := conn.Write(append([]byte(b.String()), body...)); err != nil {
		t.Fatal(err)
	}
	conn.(*net.TCPConn).CloseWrite()
	resp, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: method})
	if err != nil {
		t.Fatalf("%s %s: reading response: %v", method, path, err)
	}
	defer resp.Body.Close()
	rb, _ := io.ReadAll(resp.Body)
	return reply{resp.StatusCode, resp.Header, rb}
}

// wantStatus fails the test unless r has status.
func (r reply) wantStatus(t *testing.T, status int) {
	t.Helper()
	if r.status != status {
		t.Fatalf("status = %d, want %d; body %s", r.status, status, truncate(string(r.body), 500))
	}
}

// wantError fails the test unless r is an OCI error envelope with status and
// code.
func (r reply) wantError(t *testing.T, status int, code string) {
	t.Helper()
	r.wantStatus(t, status)
	if ct := r.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("error Content-Type = %q, want application/json", ct)
	}
	if got := decodeEnvelope(t, r.body).Errors[0].Code; got != code {
		t.Errorf("error code = %s, want %s; body %s", got, code, r.body)
	}
}

// chunked hides b's length so the request goes out with chunked encoding and
// no Content-Length, as streaming clients send it.
func chunked(b []byte) io.Reader { return io.MultiReader(bytes.NewReader(b)) }

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// pushBlob uploads content into repo in one POST and returns its digest.
func (h *harness) pushBlob(t *testing.T, repo string, content []byte) digest.Digest {
	t.Helper()
	d := digest.FromBytes(content)
	r := h.do(t, "POST", "/v2/"+repo+"/blobs/uploads/?digest="+d.String(), bytes.NewReader(content))
	r.wantStatus(t, http.StatusCreated)
	return d
}

// startUpload opens an upload session in repo and returns its Location.
func (h *harness) startUpload(t *testing.T, repo string) string {
	t.Helper()
	r := h.do(t, "POST", "/v2/"+repo+"/blobs/uploads/", nil)
	r.wantStatus(t, http.StatusAccepted)
	loc := r.header.Get("Location")
	if !strings.HasPrefix(loc, "/v2/"+repo+"/blobs/uploads/") {
		t.Fatalf("Location = %q", loc)
	}
	return loc
}

// leftoverUploads counts upload data the store still holds (and removes it).
func (h *harness) leftoverUploads(t *testing.T) int {
	t.Helper()
	n, err := h.store.PurgeUploads(context.Background(), time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// testManifest builds manifest bodies; empty fields are left out.
type testManifest struct {
	SchemaVersion int               `json:"schemaVersion"`
	MediaType     string            `json:"mediaType,omitempty"`
	ArtifactType  string            `json:"artifactType,omitempty"`
	Config        *descriptor       `json:"config,omitempty"`
	Layers        []descriptor      `json:"layers,omitempty"`
	Manifests     []descriptor      `json:"manifests,omitempty"`
	Subject       *descriptor       `json:"subject,omitempty"`
	Annotations   map[string]string `json:"annotations,omitempty"`
}

func (m testManifest) bytes(t *testing.T) []byte {
	t.Helper()
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

const (
	mediaTypeConfig = "application/vnd.oci.image.config.v1+json"
	mediaTypeLayer  = "application/vnd.oci.image.layer.v1.tar+gzip"
)

func describe(mediaType string, content []byte) descriptor {
	return descriptor{MediaType: mediaType, Digest: digest.FromBytes(content).String(), Size: int64(len(content))}
}

// newImage pushes a fresh config and layer into repo and returns an image
// manifest that lists them.
func (h *harness) newImage(t *testing.T, repo string) testManifest {
	t.Helper()
	cfg := []byte(fmt.Sprintf(`{"architecture":"amd64","os":"linux","id":"%x"}`, randomBytes(8)))
	layer := randomBytes(256)
	h.pushBlob(t, repo, cfg)
	h.pushBlob(t, repo, layer)
	return testManifest{
		SchemaVersion: 2, MediaType: mediaTypeOCIManifest,
		Config: new(describe(mediaTypeConfig, cfg)),
		Layers: []descriptor{describe(mediaTypeLayer, layer)},
	}
}

// putManifest PUTs body at ref with the given Content-Type.
func (h *harness) putManifest(t *testing.T, repo, ref, contentType string, body []byte, header ...string) reply {
	t.Helper()
	return h.do(t, "PUT", "/v2/"+repo+"/manifests/"+ref, bytes.NewReader(body), append([]string{"Content-Type", contentType}, header...)...)
}

func TestBase(t *testing.T) {
	h := newHarness(t)
	for _, tt := range []struct{ method, path, body string }{
		{"GET", "/v2/", "{}"},
		{"GET", "/v2", "{}"},
		{"HEAD", "/v2/", ""},
	} {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			r := h.do(t, tt.method, tt.path, nil)
			r.wantStatus(t, http.StatusOK)
			if string(r.body) != tt.body {
				t.Errorf("body = %q, want %q", r.body, tt.body)
			}
			if v := r.header.Get("Docker-Distribution-API-Version"); v != "registry/2.0" {
				t.Errorf("Docker-Distribution-API-Version = %q", v)
			}
		})
	}
}

func TestUnsupportedMethods(t *testing.T) {
	h := newHarness(t)
	loc := h.startUpload(t, "app")
	tests := []struct {
		method, path string
		allow        string
	}{
		{"POST", "/v2/", "GET, HEAD"},
		{"DELETE", "/v2/_catalog", "GET"},
		{"POST", "/v2/app/manifests/latest", "DELETE, GET, HEAD, PUT"},
		{"PATCH", "/v2/app/manifests/latest", "DELETE, GET, HEAD, PUT"},
		{"PUT", "/v2/app/blobs/" + sha256Sample, "DELETE, GET, HEAD"},
		{"POST", "/v2/app/blobs/" + sha256Sample, "DELETE, GET, HEAD"},
		{"GET", "/v2/app/blobs/uploads/", "POST"},
		{"PUT", "/v2/app/blobs/uploads/", "POST"},
		{"POST", loc, "DELETE, GET, PATCH, PUT"},
		{"DELETE", "/v2/app/tags/list", "GET"},
		{"PUT", "/v2/app/referrers/" + sha256Sample, "GET"},
		{"OPTIONS", "/v2/app/tags/list", "GET"},
		{"BREW", "/v2/app/tags/list", "GET"},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+truncate(tt.path, 40), func(t *testing.T) {
			r := h.do(t, tt.method, tt.path, nil)
			r.wantError(t, http.StatusMethodNotAllowed, "UNSUPPORTED")
			if got := r.header.Get("Allow"); got != tt.allow {
				t.Errorf("Allow = %q, want %q", got, tt.allow)
			}
		})
	}
	// The session a stray method hit is still usable.
	h.do(t, "GET", loc, nil).wantStatus(t, http.StatusNoContent)
}

// Paths that try to escape the name grammar are refused before any handler
// runs, and leave nothing behind.
func TestHostilePaths(t *testing.T) {
	h := newHarness(t)
	d := h.pushBlob(t, "victim", []byte("secret"))
	tests := []struct{ method, path string }{
		{"GET", "/v2/victim/../attacker/blobs/" + d.String()},
		{"GET", "/v2/attacker%2F..%2Fvictim/blobs/" + d.String()},
		{"GET", "/v2/victim%2fx/blobs/" + d.String()},
		{"GET", "/v2//victim/blobs/" + d.String()},
		{"GET", "/v2/victim//blobs/" + d.String()},
		{"GET", "/v2/Victim/blobs/" + d.String()},
		{"POST", "/v2/" + strings.Repeat("a", 256) + "/blobs/uploads/"},
		{"POST", "/v2/a/b/../../c/blobs/uploads/"},
		{"PUT", "/v2/app/manifests/lat%65st"},
		{"GET", "/v2/app/manifests/"},
		{"GET", "/v2/app/nothing/here"},
	}
	for _, tt := range tests {
		t.Run(tt.method+" "+truncate(tt.path, 50), func(t *testing.T) {
			r := h.do(t, tt.method, tt.path, nil)
			r.wantError(t, http.StatusBadRequest, "NAME_INVALID")
		})
	}
	if n := h.leftoverUploads(t); n != 0 {
		t.Errorf("refused requests started %d uploads", n)
	}
	repos := h.do(t, "GET", "/v2/_catalog", nil)
	if !bytes.Equal(bytes.TrimSpace(repos.body), []byte(`{"repositories":["victim"]}`)) {
		t.Errorf("catalog = %s, want only victim", repos.body)
	}
}

// Request headers above the server's limit never reach the gateway; the node
// serves with MaxHeaderBytes (node/node.go), so the test does too.
func TestHugeRequestHeadersRejected(t *testing.T) {
	h := newHarness(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h.gw.Handler(), MaxHeaderBytes: 64 << 10}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	post := func(header string) int {
		conn, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(30 * time.Second))
		fmt.Fprintf(conn, "POST /v2/app/blobs/uploads/ HTTP/1.1\r\nHost: registry.test\r\nContent-Length: 0\r\nX-Pad: %s\r\n\r\n", header)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatalf("reading response: %v", err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if got := post(strings.Repeat("x", 256<<10)); got != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("256 KiB header: status %d, want 431", got)
	}
	if n := h.leftoverUploads(t); n != 0 {
		t.Errorf("a refused request started %d uploads", n)
	}
	if got := post(strings.Repeat("x", 1<<10)); got != http.StatusAccepted {
		t.Errorf("1 KiB header: status %d, want 202", got)
	}
}

// With no leader, writes answer 503 with Retry-After and change nothing.
func TestNoLeader(t *testing.T) {
	h := newHarness(t)
	img := h.newImage(t, "app")
	body := img.bytes(t)
	h.meta.setFail(fmt.Errorf("%w: %v", pb.ErrNotLeader, "leadership lost"))
	tests := []struct {
		name string
		send func(t *testing.T) reply
	}{
		{"manifest put", func(t *testing.T) reply { return h.putManifest(t, "app", "v1", mediaTypeOCIManifest, body) }},
		{"blob push", func(t *testing.T) reply {
			return h.do(t, "POST", "/v2/app/blobs/uploads/?digest="+digest.FromString("x").String(), strings.NewReader("x"))
		}},
		{"blob delete", func(t *testing.T) reply { return h.do(t, "DELETE", "/v2/app/blobs/"+img.Config.Digest, nil) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := tt.send(t)
			r.wantError(t, http.StatusServiceUnavailable, "UNAVAILABLE")
			if r.header.Get("Retry-After") == "" {
				t.Error("503 without Retry-After")
			}
		})
	}
	h.meta.setFail(nil)
	h.do(t, "GET", "/v2/app/manifests/v1", nil).wantError(t, http.StatusNotFound, "MANIFEST_UNKNOWN")
	h.do(t, "HEAD", "/v2/app/blobs/"+img.Config.Digest, nil).wantStatus(t, http.StatusOK)
	h.putManifest(t, "app", "v1", mediaTypeOCIManifest, body).wantStatus(t, http.StatusCreated)
}

func TestUploadKeyNotInstalled(t *testing.T) {
	h := newHarness(t)
	h.meta.mu.Lock()
	h.meta.key = nil
	h.meta.mu.Unlock()
	r := h.do(t, "POST", "/v2/app/blobs/uploads/", nil)
	r.wantError(t, http.StatusServiceUnavailable, "UNAVAILABLE")
	if r.header.Get("Retry-After") == "" {
		t.Error("503 without Retry-After")
	}
	if n := h.leftoverUploads(t); n != 0 {
		t.Errorf("%d uploads started without a key", n)
	}
}

// readOnly is a caller who may pull team/app and nothing else.
type readOnly struct{}

func (readOnly) Actor() *pb.Actor { return &pb.Actor{Principal: "user:reader"} }
func (readOnly) Anonymous() bool  { return false }
func (readOnly) Can(repo, action string) bool {
	return repo == "team/app" && action == ActionPull
}

type readOnlyAuth struct{ refused []string }

func (a *readOnlyAuth) Authenticate(*http.Request) (Caller, error) { return readOnly{}, nil }
func (a *readOnlyAuth) Challenge(*http.Request, string) string     { return "" }
func (a *readOnlyAuth) Refused(_ *http.Request, _ Caller, repo string, actions []string) {
	a.refused = append(a.refused, repo+":"+strings.Join(actions, ","))
}

func TestAuthorizerChecksEachRouteAction(t *testing.T) {
	auth := &readOnlyAuth{}
	h := newHarness(t, func(c *Config) { c.Authorizer = auth })
	h.do(t, "POST", "/v2/team/app/blobs/uploads/", nil).wantError(t, http.StatusForbidden, "DENIED")
	h.do(t, "PUT", "/v2/team/app/manifests/v1", strings.NewReader("{}")).wantError(t, http.StatusForbidden, "DENIED")
	h.do(t, "DELETE", "/v2/team/app/manifests/v1", nil).wantError(t, http.StatusForbidden, "DENIED")
	h.do(t, "GET", "/v2/team/app/tags/list", nil).wantError(t, http.StatusNotFound, "NAME_UNKNOWN")
	h.do(t, "GET", "/v2/other/tags/list", nil).wantError(t, http.StatusForbidden, "DENIED")
	if want := []string{"team/app:push", "team/app:push", "team/app:delete", "other:pull"}; !slices.Equal(auth.refused, want) {
		t.Errorf("refusals recorded %q, want %q", auth.refused, want)
	}
	if n := h.leftoverUploads(t); n != 0 {
		t.Errorf("a denied request started %d uploads", n)
	}
}
