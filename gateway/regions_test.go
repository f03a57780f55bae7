package gateway

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"
	"testing/iotest"
	"time"

	"github.com/opencontainers/go-digest"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
	"github.com/meridian-registry/meridian/replication"
)

// flakyStore fails every call while down is set.
type flakyStore struct {
	replication.Driver
	down bool
}

var errStoreDown = errors.New("store unreachable")

func (f *flakyStore) Open(ctx context.Context, d digest.Digest, off int64) (io.ReadCloser, error) {
	if f.down {
		return nil, errStoreDown
	}
	return f.Driver.Open(ctx, d, off)
}

func (f *flakyStore) StartUpload(ctx context.Context) (string, error) {
	if f.down {
		return "", errStoreDown
	}
	return f.Driver.StartUpload(ctx)
}

// presigning is a store that hands out URLs (a fake of S3's presigning).
type presigning struct{ replication.Driver }

func (presigning) PresignGet(_ context.Context, d digest.Digest, ttl time.Duration) (*url.URL, error) {
	return url.Parse("http://objects.example/" + d.Encoded() + "?ttl=" + ttl.String())
}

// twoRegions is a gateway in region "local" that also reaches region "far".
func twoRegions(t *testing.T, local, far replication.Driver, tweaks ...func(*Config)) *harness {
	t.Helper()
	stores := replication.NewRegions("local")
	stores.Add("local", local)
	stores.Add("far", far)
	meta := newFakeMetadata(t)
	meta.policy = pb.EffectivePolicy{Regions: []string{"far", "local"}, MinRegions: 1}
	cfg := DefaultConfig()
	cfg.Logger = slog.New(slog.DiscardHandler)
	for _, tw := range tweaks {
		tw(&cfg)
	}
	gw, err := New(cfg, meta, stores)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(gw.Handler())
	t.Cleanup(srv.Close)
	return &harness{gw: gw, meta: meta, srv: srv}
}

func newFS(t *testing.T) *replication.Filesystem {
	t.Helper()
	fs, err := replication.NewFilesystem(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return fs
}

// Uploads land in the nearest of the repository's regions (our own), and
// in the next one while ours fails; reads fall back the same way.
func TestNearestRegionWithFallback(t *testing.T) {
	local := &flakyStore{Driver: newFS(t)}
	far := newFS(t)
	h := twoRegions(t, local, far)
	content := randomBytes(5000)
	d := h.pushBlob(t, "app", content)
	if _, err := local.Stat(context.Background(), d); err != nil {
		t.Fatalf("upload did not land in the local region: %v", err)
	}
	// Copy it to far, as a replicator would, then lose the local store.
	rc, _ := local.Open(context.Background(), d, 0)
	id, _ := far.StartUpload(context.Background())
	far.WriteUpload(context.Background(), id, 0, rc)
	rc.Close()
	if err := far.CommitUpload(context.Background(), id, int64(len(content)), d); err != nil {
		t.Fatal(err)
	}
	h.meta.place(d.String(), "far")
	local.down = true
	h.wantBlob(t, "app", content)

	// New uploads go to far while local is down.
	other := randomBytes(300)
	od := h.pushBlob(t, "app", other)
	if _, err := far.Stat(context.Background(), od); err != nil {
		t.Fatalf("upload with the local store down did not land in far: %v", err)
	}
	h.wantBlob(t, "app", other)

	// A blob placed only in the failing region: 503, not a false 404.
	h.meta.mu.Lock()
	h.meta.blobs[d.String()].Regions = []string{"local"}
	h.meta.mu.Unlock()
	h.do(t, "GET", "/v2/app/blobs/"+d.String(), nil).wantError(t, http.StatusServiceUnavailable, "UNAVAILABLE")
}

func TestRedirectReads(t *testing.T) {
	h := twoRegions(t, presigning{newFS(t)}, newFS(t), func(c *Config) { c.RedirectReads = true; c.PresignTTL = time.Minute })
	content := randomBytes(100)
	d := h.pushBlob(t, "app", content)
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := client.Get(h.srv.URL + "/v2/app/blobs/" + d.String())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusTemporaryRedirect || resp.Header.Get("Location") != "http://objects.example/"+d.Encoded()+"?ttl=1m0s" {
		t.Fatalf("GET: %d to %q; want a 307 to the presigned URL", resp.StatusCode, resp.Header.Get("Location"))
	}
	// HEAD never needs the store.
	h.do(t, "HEAD", "/v2/app/blobs/"+d.String(), nil).wantStatus(t, http.StatusOK)
}

// With min_regions 2 the PUT waits for the second copy; without one in time
// it answers 503 with Retry-After, and the same PUT answers 201 later.
func TestMinRegionsWait(t *testing.T) {
	h := twoRegions(t, newFS(t), newFS(t), func(c *Config) { c.SyncTimeout = 300 * time.Millisecond })
	h.meta.policy.MinRegions = 2

	content := randomBytes(64)
	d := digest.FromBytes(content)
	loc := h.startUpload(t, "app")
	put := func() reply {
		return h.do(t, "PUT", loc+"?digest="+d.String(), bytes.NewReader(content))
	}
	r := put()
	r.wantError(t, http.StatusServiceUnavailable, "UNAVAILABLE")
	if r.header.Get("Retry-After") == "" {
		t.Error("503 without Retry-After")
	}
	h.meta.place(d.String(), "far")
	put().wantStatus(t, http.StatusCreated)

	// A copy that arrives while the PUT waits is acknowledged at once.
	other := randomBytes(32)
	od := digest.FromBytes(other)
	h.gw.cfg.SyncTimeout = 10 * time.Second
	go func() {
		time.Sleep(100 * time.Millisecond)
		for {
			h.meta.mu.Lock()
			_, ok := h.meta.blobs[od.String()]
			h.meta.mu.Unlock()
			if ok {
				h.meta.place(od.String(), "far")
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
	h.do(t, "POST", "/v2/app/blobs/uploads/?digest="+od.String(), bytes.NewReader(other)).wantStatus(t, http.StatusCreated)
}

// breakingStore serves reads that fail after limit bytes.
type breakingStore struct {
	replication.Driver
	limit int64
}

func (b breakingStore) Open(ctx context.Context, d digest.Digest, off int64) (io.ReadCloser, error) {
	rc, err := b.Driver.Open(ctx, d, off)
	if err != nil {
		return nil, err
	}
	return struct {
		io.Reader
		io.Closer
	}{io.MultiReader(io.LimitReader(rc, b.limit), iotest.ErrReader(errStoreDown)), rc}, nil
}

// A source that breaks mid-stream is replaced by the next region, resuming
// at the byte the response reached: the client gets the whole blob.
func TestBlobStreamResumes(t *testing.T) {
	localFS, far := newFS(t), newFS(t)
	h := twoRegions(t, breakingStore{Driver: localFS, limit: 100_000}, far)
	content := randomBytes(1 << 20)
	d := h.pushBlob(t, "app", content)
	rc, _ := localFS.Open(context.Background(), d, 0)
	id, _ := far.StartUpload(context.Background())
	far.WriteUpload(context.Background(), id, 0, rc)
	rc.Close()
	if err := far.CommitUpload(context.Background(), id, int64(len(content)), d); err != nil {
		t.Fatal(err)
	}
	h.meta.place(d.String(), "far")
	h.wantBlob(t, "app", content)
	r := h.do(t, "GET", "/v2/app/blobs/"+d.String(), nil, "Range", "bytes=50000-")
	r.wantStatus(t, http.StatusPartialContent)
	if !bytes.Equal(r.body, content[50000:]) {
		t.Fatalf("range after a broken source: %d bytes, want the last %d of the blob", len(r.body), len(content)-50000)
	}
}
