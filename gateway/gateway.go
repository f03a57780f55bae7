package gateway

import (
	"context"
	_ "crypto/sha256" // digest algorithms go-digest looks up
	_ "crypto/sha512"
	"errors"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
	"github.com/meridian-registry/meridian/replication"
)

// Metadata is what the gateway needs from the cluster: committed writes and
// reads of the replicated state. Errors are *meridianpb.Error values where
// they mean something to a client (unknown manifest, failed precondition,
// no leader).
type Metadata interface {
	// Commit asks the cluster to validate and commit a write intent, and
	// returns its result. The node builds the log entry; the gateway never
	// does.
	Commit(ctx context.Context, cmd *pb.Command) error
	Manifest(ctx context.Context, repo, digest string) (*pb.ManifestRecord, error)
	Tag(ctx context.Context, repo, tag string) (string, error)
	Tags(ctx context.Context, repo, after string, limit int) ([]string, error)
	Repositories(ctx context.Context, after string, limit int) ([]string, error)
	Referrers(ctx context.Context, repo, subject string) ([]*pb.Referrer, error)
	LinkedBlob(ctx context.Context, repo, digest string) (*pb.BlobRecord, error)
	// Policy resolves where a repository's blobs live.
	Policy(ctx context.Context, repo string) (pb.EffectivePolicy, error)
	// WaitPlaced blocks until at least regions regions hold the blob, and
	// returns its record; it gives up with ctx.
	WaitPlaced(ctx context.Context, digest string, regions int) (*pb.BlobRecord, error)
	// UploadKeys returns the cluster's upload-token key ring, oldest first;
	// empty until the first key is installed.
	UploadKeys(ctx context.Context) ([]*pb.UploadKey, error)
	// WriteFence returns a log index whose entries were all committed
	// before the call returned, so bytes written after it come after them:
	// an upload's link carries it, and garbage collection refuses the link
	// when it removed the blob later, since that removal may have deleted
	// the new bytes (LinkBlob.written_after_index). An older index is
	// still correct, only more often refused.
	WriteFence(ctx context.Context) (uint64, error)
}

// Config tunes the gateway. DefaultConfig gives working values.
type Config struct {
	// MaxManifestSize bounds a manifest body (413 above it).
	MaxManifestSize int64
	// MaxBlobSize bounds one blob (413 above it); 0 means no limit.
	MaxBlobSize int64
	// UploadTTL is how long an upload session stays usable after it starts.
	UploadTTL time.Duration
	// ChunkMinLength is advertised as OCI-Chunk-Min-Length (0: not sent).
	ChunkMinLength int64
	// ListLimit caps one page of tags or repositories when the client asks
	// for more or for no limit; a Link header leads to the next page.
	ListLimit int
	// SyncTimeout bounds how long a blob PUT waits for a policy's
	// min_regions copies before answering 503 with Retry-After.
	SyncTimeout time.Duration
	// RedirectReads answers a blob GET served from a store that can presign
	// (S3) with a 307 to a URL valid for PresignTTL, instead of streaming.
	RedirectReads bool
	PresignTTL    time.Duration
	// Authorizer authenticates each request; nil allows everything (an
	// insecure configuration only: nodes and gateways set one).
	Authorizer Authorizer
	// MemberID names this gateway or node in the audit log.
	MemberID string
	// PullResolution is how coarsely manifest pulls are recorded for
	// retention (times truncated to it, sent at most once per manifest per
	// period, in batches); 0 records none. See RunPullLog.
	PullResolution time.Duration
	Logger         *slog.Logger
	// Registerer receives the gateway's metrics; nil means none.
	Registerer prometheus.Registerer
}

// DefaultConfig returns the configuration a single node serves with.
func DefaultConfig() Config {
	return Config{
		MaxManifestSize: 4 << 20,
		MaxBlobSize:     0,
		UploadTTL:       24 * time.Hour,
		ListLimit:       10000,
		SyncTimeout:     30 * time.Second,
		PresignTTL:      5 * time.Minute,
		PullResolution:  10 * time.Minute,
	}
}

// Validate reports the first unusable setting.
func (c Config) Validate() error {
	switch {
	case c.MaxManifestSize <= 0:
		return errors.New("gateway: max manifest size must be positive")
	case c.MaxBlobSize < 0:
		return errors.New("gateway: max blob size cannot be negative")
	case c.UploadTTL <= 0:
		return errors.New("gateway: upload TTL must be positive")
	case c.ListLimit <= 0:
		return errors.New("gateway: list limit must be positive")
	case c.SyncTimeout <= 0:
		return errors.New("gateway: sync timeout must be positive")
	case c.RedirectReads && c.PresignTTL <= 0:
		return errors.New("gateway: presign TTL must be positive")
	}
	return nil
}

// Gateway serves the OCI Distribution API.
type Gateway struct {
	cfg     Config
	meta    Metadata
	stores  *replication.Regions
	logger  *slog.Logger
	metrics *metrics

	keyMu   sync.Mutex
	keys    []*pb.UploadKey // the ring as last fetched
	fetched time.Time

	// pulls learns of every manifest GET (nil: pulls are not recorded).
	pulls *PullLog
}

// New returns a gateway that reads and writes blobs through stores, the
// region stores it can reach (its own region is stores.Local()).
func New(cfg Config, meta Metadata, stores *replication.Regions) (*Gateway, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if stores == nil || len(stores.Names()) == 0 {
		return nil, errors.New("gateway: no blob stores")
	}
	if cfg.Authorizer == nil {
		cfg.Authorizer = AllowAll()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	g := &Gateway{cfg: cfg, meta: meta, stores: stores, logger: cfg.Logger.With("component", "gateway")}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	g.metrics = m
	if cfg.PullResolution > 0 {
		g.pulls = NewPullLog(cfg.PullResolution, meta.Commit, g.logger)
	}
	return g, nil
}

// RunPullLog sends the recorded pulls to the cluster until ctx ends;
// without a PullResolution it returns at once.
func (g *Gateway) RunPullLog(ctx context.Context) {
	if g.pulls != nil {
		g.pulls.Run(ctx, min(g.cfg.PullResolution, time.Minute))
	}
}

// Handler returns the HTTP handler for /v2/ and everything below it.
func (g *Gateway) Handler() http.Handler {
	return http.HandlerFunc(g.serve)
}

// serve routes one request and writes the error envelope when a handler fails.
func (g *Gateway) serve(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	sw := &statusWriter{ResponseWriter: w}
	w = sw
	w.Header().Set("Docker-Distribution-API-Version", "registry/2.0")
	rt, err := parsePath(r.URL.EscapedPath())
	if err == nil {
		r, err = g.authorize(r, rt)
	}
	if err == nil {
		err = g.dispatch(w, r, rt)
	}
	if err != nil {
		e := asError(err)
		if e.Code == CodeInternal {
			g.logger.Error("request failed", "method", r.Method, "path", r.URL.Path, "err", err)
		}
		if !sw.wrote {
			writeError(w, r, e)
		}
	}
	g.metrics.observe(rt.kind, r.Method, sw.status(), time.Since(start))
}

type handlerFunc func(g *Gateway, w http.ResponseWriter, r *http.Request, rt route) error

// handlers is the routing table: endpoint kind and method to handler.
var handlers = map[routeKind]map[string]handlerFunc{
	routeBase:        {"GET": (*Gateway).base, "HEAD": (*Gateway).base},
	routeCatalog:     {"GET": (*Gateway).catalog},
	routeManifest:    {"GET": (*Gateway).getManifest, "HEAD": (*Gateway).getManifest, "PUT": (*Gateway).putManifest, "DELETE": (*Gateway).deleteManifest},
	routeBlob:        {"GET": (*Gateway).getBlob, "HEAD": (*Gateway).getBlob, "DELETE": (*Gateway).deleteBlob},
	routeUploadStart: {"POST": (*Gateway).startUpload},
	routeUpload:      {"GET": (*Gateway).uploadStatus, "PATCH": (*Gateway).patchUpload, "PUT": (*Gateway).putUpload, "DELETE": (*Gateway).cancelUpload},
	routeTags:        {"GET": (*Gateway).listTags},
	routeReferrers:   {"GET": (*Gateway).referrers},
}

func (g *Gateway) dispatch(w http.ResponseWriter, r *http.Request, rt route) error {
	h, ok := handlers[rt.kind][r.Method]
	if !ok {
		e := errorf(CodeUnsupported, "%s is not supported on this endpoint", r.Method)
		// A 405 must say what is allowed (RFC 9110, section 15.5.6).
		e.Headers = map[string]string{"Allow": strings.Join(slices.Sorted(maps.Keys(handlers[rt.kind])), ", ")}
		return e
	}
	return h(g, w, r, rt)
}

func (g *Gateway) base(w http.ResponseWriter, r *http.Request, _ route) error {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", "2")
	if r.Method == http.MethodGet {
		w.Write([]byte("{}"))
	}
	return nil
}

// keyRefresh is how old the gateway's copy of the key ring may be when it
// seals a token: after a rotation, new tokens use the new key within it.
const keyRefresh = 30 * time.Second

// sealingKey returns the newest upload-token key.
func (g *Gateway) sealingKey(ctx context.Context) (*pb.UploadKey, error) {
	g.keyMu.Lock()
	defer g.keyMu.Unlock()
	if len(g.keys) == 0 || time.Since(g.fetched) > keyRefresh {
		if err := g.fetchKeysLocked(ctx); err != nil && len(g.keys) == 0 {
			return nil, err
		}
	}
	return g.keys[len(g.keys)-1], nil
}

// openingKey returns the ring key with id, fetching the ring again (at
// most once a second) when the id is not in the copy held: a token sealed
// by another gateway after a rotation names a key this one has not seen.
func (g *Gateway) openingKey(ctx context.Context, id uint32) []byte {
	g.keyMu.Lock()
	defer g.keyMu.Unlock()
	find := func() []byte {
		for _, k := range g.keys {
			if k.Id == id {
				return k.Key
			}
		}
		return nil
	}
	if k := find(); k != nil {
		return k
	}
	if time.Since(g.fetched) > time.Second {
		g.fetchKeysLocked(ctx)
	}
	return find()
}

func (g *Gateway) fetchKeysLocked(ctx context.Context) error {
	keys, err := g.meta.UploadKeys(ctx)
	if err != nil {
		return err
	}
	if len(keys) == 0 {
		return errorf(CodeUnavailable, "the cluster has not installed its upload key yet")
	}
	g.keys, g.fetched = keys, time.Now()
	return nil
}

// statusWriter records the status a handler wrote, and whether it wrote.
type statusWriter struct {
	http.ResponseWriter
	code  int
	wrote bool
}

func (s *statusWriter) WriteHeader(code int) {
	if !s.wrote {
		s.code, s.wrote = code, true
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusWriter) Write(b []byte) (int, error) {
	if !s.wrote {
		s.code, s.wrote = http.StatusOK, true
	}
	return s.ResponseWriter.Write(b)
}

// ReadFrom keeps the sendfile path of the underlying writer for files (the
// filesystem store's blobs, whole or under io.LimitReader). Other sources
// are copied in large writes: a source that buffers (the S3 store's parts)
// writes its buffers straight to the response through its WriteTo, which
// io.LimitReader would hide; any other through a pooled 1 MiB buffer rather
// than net/http's 32 KiB, which costs a syscall and a wakeup of the reader
// every 32 KiB.
func (s *statusWriter) ReadFrom(src io.Reader) (int64, error) {
	if !s.wrote {
		s.code, s.wrote = http.StatusOK, true
	}
	inner := src
	lr, limited := src.(*io.LimitedReader)
	if limited {
		inner = lr.R
	}
	if _, file := inner.(*os.File); file {
		if rf, ok := s.ResponseWriter.(io.ReaderFrom); ok {
			return rf.ReadFrom(src)
		}
		return io.Copy(s.ResponseWriter, src)
	}
	if wt, ok := inner.(io.WriterTo); ok {
		if !limited {
			return wt.WriteTo(s.ResponseWriter)
		}
		lw := &limitedWriter{w: s.ResponseWriter, n: lr.N}
		n, err := wt.WriteTo(lw)
		lr.N -= n
		if errors.Is(err, errLimitReached) {
			err = nil
		}
		return n, err
	}
	bp := copyBuffers.Get().(*[]byte)
	defer copyBuffers.Put(bp)
	return io.CopyBuffer(writerOnly{s.ResponseWriter}, src, *bp)
}

// copyBuffers are statusWriter.ReadFrom's buffers.
var copyBuffers = sync.Pool{New: func() any {
	b := make([]byte, 1<<20)
	return &b
}}

// writerOnly hides a writer's ReadFrom, so io.CopyBuffer uses the buffer.
type writerOnly struct{ io.Writer }

// limitedWriter takes n bytes, then fails with errLimitReached: it bounds a
// WriteTo the way io.LimitedReader bounds reads.
type limitedWriter struct {
	w io.Writer
	n int64
}

var errLimitReached = errors.New("gateway: write limit reached")

func (l *limitedWriter) Write(p []byte) (int, error) {
	if l.n <= 0 {
		return 0, errLimitReached
	}
	short := int64(len(p)) > l.n
	if short {
		p = p[:l.n]
	}
	n, err := l.w.Write(p)
	l.n -= int64(n)
	if err == nil && short {
		err = errLimitReached
	}
	return n, err
}

func (s *statusWriter) Unwrap() http.ResponseWriter { return s.ResponseWriter }

func (s *statusWriter) status() int {
	if !s.wrote {
		return http.StatusOK
	}
	return s.code
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }
