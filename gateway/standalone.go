package gateway

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/meridian-registry/meridian/node/membership"
	"github.com/meridian-registry/meridian/node/pki"
	"github.com/meridian-registry/meridian/node/transport"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
	"github.com/meridian-registry/meridian/replication"
)

// RegionStore is one region of the cluster and its blob store, as every
// member's configuration lists it.
type RegionStore struct {
	Name, Store          string
	AccessKey, SecretKey string
}

// StandaloneConfig configures a gateway process that runs apart from the
// nodes (`meridian gateway`).
type StandaloneConfig struct {
	// ID names the gateway in gossip; empty picks "gateway-<host>-<random>",
	// since a gateway has no state to keep its identity in.
	ID        string
	ClusterID string
	// Region and Zone place the gateway: uploads go to the nearest of a
	// repository's regions, and same-zone nodes win ties.
	Region, Zone string
	// HTTPAddr serves the OCI API, /metrics, /healthz and /readyz.
	HTTPAddr string
	// GossipAddr and AdvertiseGossip are the gateway's gossip listener and
	// the address members reach it at; Join lists members to join through.
	GossipAddr, AdvertiseGossip string
	Join                        []string
	// JoinTimeout bounds the first join; zero means 30s.
	JoinTimeout   time.Duration
	GossipTimings membership.Timings
	// Regions lists every region and its store; it must equal the nodes'.
	Regions []RegionStore
	// ReadConsistency is "local" or "strong", as on nodes.
	ReadConsistency string
	// ReadyFile, when set, receives JSON with the gateway's id and actual
	// addresses once it serves.
	ReadyFile string
	// Gateway tunes the OCI API (limits, timeouts).
	Gateway Config
	// BlobCache shares one upstream read among concurrent readers of a blob
	// and keeps hot blobs on local disk; a zero MaxBytes turns it off. S3
	// regions are read directly, never through it.
	BlobCache BlobCacheConfig
	// ShareRegionDirectory says the gateway sees its own region's file://
	// directory, mounted as the region's nodes mount it (same host, or a
	// shared volume): it then reads and writes that store itself, as a node
	// does, instead of through a node. Other regions are still reached
	// through their nodes.
	ShareRegionDirectory bool
	// Dial, when set, opens the gateway's connections to nodes (tests put
	// TCP proxies in between); nil means plain TCP.
	Dial func(ctx context.Context, addr string) (net.Conn, error)
	// Trust is the gateway's certificate (role gateway, its id the
	// gateway's ID) for mutual TLS to the nodes; nil is plaintext.
	Trust *transport.Trust
	// GossipKeys encrypt gossip, the first the primary; see
	// membership.Config.Keys.
	GossipKeys [][]byte
	// SaveGossipKeys, when set, records the keyring after a cluster-wide
	// change (meridian cluster gossip-key), for the gateway's next start.
	SaveGossipKeys func(keys [][]byte) error
	// HTTPTLS, when set, serves the OCI API over HTTPS.
	HTTPTLS *tls.Config
	// Access authenticates the OCI API's callers from the cluster's access
	// state, which the gateway follows; nil turns authentication off
	// (insecure_no_auth).
	Access AccessControl
	// AccessUsername and AccessPassword are a cluster admin's credentials,
	// for fetching the access state from a cluster without TLS.
	AccessUsername, AccessPassword string
	// InsecureCluster lets the gossip listener bind beyond loopback
	// without Trust and GossipKeys.
	InsecureCluster bool
	Logger          *slog.Logger
}

// Standalone is a running gateway process: gossip membership as a gateway
// member, the cluster's nodes reached over gRPC, the regions' stores read
// and written directly, and the OCI API over HTTP. It keeps no state.
type Standalone struct {
	cfg      StandaloneConfig
	logger   *slog.Logger
	registry *prometheus.Registry
	members  *membership.Membership
	upstream *Upstream
	regions  *replication.Regions
	cache    *blobCache // nil when off
	gateway  *Gateway

	httpLn  net.Listener
	httpSrv *http.Server
	stop    context.CancelFunc
	wg      sync.WaitGroup
}

// gatewayIDRE is what a member id may be, as for nodes.
var gatewayIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// CertificateCovers reports whether a gateway certificate for certID may run
// as gatewayID: the same id, or certID followed by '-' and a suffix. Replicas
// of one gateway deployment share a certificate, yet each needs its own id in
// gossip (an alive member's id is never taken twice), so they run as
// "gw-east-<pod>" with the certificate of "gw-east". Nodes authorize a
// gateway by its certificate's role, not by the gossip id, so the suffix
// grants nothing.
func CertificateCovers(certID, gatewayID string) bool {
	suffix, ok := strings.CutPrefix(gatewayID, certID)
	return ok && (suffix == "" || len(suffix) > 1 && suffix[0] == '-')
}

// NewStandalone checks cfg; Start runs the gateway.
func NewStandalone(cfg StandaloneConfig) (*Standalone, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.ID == "" && cfg.Trust.Secure() {
		cfg.ID = cfg.Trust.Identity().ID // the certificate names the gateway
	}
	if cfg.ID == "" {
		host, _ := os.Hostname()
		b := make([]byte, 3)
		rand.Read(b)
		cfg.ID = "gateway-" + strings.ToLower(host) + "-" + hex.EncodeToString(b)
	}
	var errs []error
	if !gatewayIDRE.MatchString(cfg.ID) {
		errs = append(errs, fmt.Errorf("gateway_id %q: use 1-63 letters, digits, '.', '_' or '-'", cfg.ID))
	}
	if len(cfg.Join) == 0 {
		errs = append(errs, errors.New("join: a gateway needs at least one member's gossip address"))
	}
	if id := cfg.Trust.Identity(); cfg.Trust.Secure() && (id.Role != pki.RoleGateway || !CertificateCovers(id.ID, cfg.ID)) {
		errs = append(errs, fmt.Errorf("tls_cert is %s: a gateway's certificate must have role gateway and name its gateway_id %q (the same id, or the id and a '-suffix')", id, cfg.ID))
	}
	if err := transport.CheckListeners(map[string]string{"gossip_addr": cfg.GossipAddr}, cfg.Trust.Secure(), len(cfg.GossipKeys) > 0, cfg.InsecureCluster); err != nil {
		errs = append(errs, err)
	}
	if len(cfg.Regions) == 0 {
		errs = append(errs, errors.New("regions: a gateway needs the cluster's regions and their stores"))
	}
	found := false
	for _, r := range cfg.Regions {
		found = found || r.Name == cfg.Region
	}
	if !found && cfg.Region != "" {
		errs = append(errs, fmt.Errorf("region %q is not among the configured regions", cfg.Region))
	}
	if cfg.BlobCache.MaxBytes < 0 {
		errs = append(errs, errors.New("blob_cache: the size cannot be negative"))
	}
	if err := cfg.Gateway.Validate(); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("invalid gateway configuration:\n%w", err)
	}
	return &Standalone{cfg: cfg, logger: cfg.Logger.With("gateway_id", cfg.ID)}, nil
}

// openBlobCache puts the blob cache in front of every region it serves
// (those reached through nodes). There is none when it is off or no region
// would use it (S3 stores only), and none, with a warning, when the default
// temporary directory cannot be made (an image without /tmp): the cache
// speeds reads up but is not needed to serve them. A cache directory the
// operator named must work.
func (s *Standalone) openBlobCache() error {
	if s.cfg.BlobCache.MaxBytes <= 0 {
		return nil
	}
	cached := false
	for _, name := range s.regions.Names() {
		d, _ := s.regions.Driver(name)
		cached = cached || cacheable(d)
	}
	if !cached {
		return nil
	}
	cache, err := newBlobCache(s.cfg.BlobCache, s.logger, s.registry)
	if errors.Is(err, errNoTempDir) && s.cfg.BlobCache.Dir == "" {
		s.logger.Warn("no blob cache: give it a directory with gateway_blob_cache_dir (--blob-cache-dir), or set gateway_blob_cache to 0", "err", err)
		return nil
	}
	if err != nil {
		return err
	}
	s.cache = cache
	for _, name := range s.regions.Names() {
		d, _ := s.regions.Driver(name)
		s.regions.Add(name, s.cache.wrap(name, d))
	}
	return nil
}

// Start joins the cluster and begins serving; it returns once serving.
func (s *Standalone) Start(ctx context.Context) (err error) {
	defer func() {
		if err != nil {
			s.Close(context.Background())
		}
	}()
	s.registry = prometheus.NewRegistry()
	s.registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if s.httpLn, err = net.Listen("tcp", s.cfg.HTTPAddr); err != nil {
		return fmt.Errorf("http listener: %w", err)
	}

	stores := map[string]string{}
	for _, r := range s.cfg.Regions {
		stores[r.Name] = r.Store
	}
	mc := membership.DefaultConfig()
	mc.Meta = membership.Meta{ID: s.cfg.ID, ClusterID: s.cfg.ClusterID, Region: s.cfg.Region, Zone: s.cfg.Zone,
		Role: membership.RoleGateway, HTTPAddr: s.advertisedHTTP(), Version: membership.ProtocolVersion,
		Topology: replication.TopologyFingerprint(stores)}
	mc.BindAddr = s.cfg.GossipAddr
	mc.AdvertiseAddr = s.cfg.AdvertiseGossip
	mc.Timings = s.cfg.GossipTimings
	mc.Keys = s.cfg.GossipKeys
	mc.OnKeysChanged = s.cfg.SaveGossipKeys
	mc.Logger = s.logger
	if s.members, err = membership.New(mc); err != nil {
		return fmt.Errorf("gossip: %w", err)
	}
	if err := s.members.Start(); err != nil {
		return fmt.Errorf("gossip: %w", err)
	}
	joinTimeout := s.cfg.JoinTimeout
	if joinTimeout <= 0 {
		joinTimeout = 30 * time.Second
	}
	jctx, cancel := context.WithTimeout(ctx, joinTimeout)
	err = s.members.Join(jctx, s.cfg.Join)
	cancel()
	if err != nil {
		return fmt.Errorf("join %v: %w", s.cfg.Join, err)
	}

	if s.upstream, err = NewUpstream(UpstreamConfig{
		ID: s.cfg.ID, Region: s.cfg.Region, Zone: s.cfg.Zone, Members: s.members.Members, NetDial: s.cfg.Dial,
		Trust: s.cfg.Trust, ReadConsistency: s.cfg.ReadConsistency, Logger: s.logger, Registerer: s.registry,
	}); err != nil {
		return err
	}
	// Every file:// store, this region's included unless it is shared with
	// the gateway, is a directory only that region's nodes see: the gateway
	// reaches it through them.
	var regionStores []replication.StoreConfig
	for _, r := range s.cfg.Regions {
		regionStores = append(regionStores, replication.StoreConfig{Region: r.Name, URL: r.Store, AccessKey: r.AccessKey, SecretKey: r.SecretKey})
	}
	if s.regions, err = replication.OpenRegions(ctx, replication.OpenRegionsConfig{
		Local: s.cfg.Region, Stores: regionStores, Remote: s.upstream.RegionConn, Logger: s.logger,
		OwnDirectory: s.cfg.ShareRegionDirectory,
	}); err != nil {
		return err
	}
	if err := s.openBlobCache(); err != nil {
		return err
	}
	gc := s.cfg.Gateway
	gc.Logger = s.logger
	gc.Registerer = s.registry
	gc.MemberID = s.cfg.ID
	if s.cfg.Access != nil {
		gc.Authorizer = s.cfg.Access
	}
	if s.gateway, err = New(gc, s.upstream.Metadata(), s.regions); err != nil {
		return err
	}

	runCtx, cancel := context.WithCancel(context.Background())
	s.stop = cancel
	s.wg.Add(3)
	if a := s.cfg.Access; a != nil {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			a.Follow(runCtx, func(ctx context.Context, known uint64) (*pb.AccessState, error) {
				return s.upstream.AccessState(ctx, known, s.cfg.AccessUsername, s.cfg.AccessPassword)
			})
		}()
	}
	go func() { defer s.wg.Done(); s.upstream.Run(runCtx) }()
	go func() { defer s.wg.Done(); s.keepJoined(runCtx) }()
	go func() { defer s.wg.Done(); s.gateway.RunPullLog(runCtx) }()

	s.httpSrv = &http.Server{
		Handler:           s.routes(),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(s.logger.Handler(), slog.LevelDebug),
	}
	if s.cfg.HTTPTLS != nil {
		s.httpSrv.TLSConfig = s.cfg.HTTPTLS
		go s.httpSrv.ServeTLS(s.httpLn, "", "")
	} else {
		go s.httpSrv.Serve(s.httpLn)
	}
	if err := s.writeReadyFile(); err != nil {
		return err
	}
	s.logger.Info("gateway serving", "http", s.HTTPAddr(), "gossip", s.members.Addr(), "region", s.cfg.Region)
	return nil
}

func (s *Standalone) routes() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/v2/", s.gateway.Handler())
	mux.Handle("/v2", s.gateway.Handler())
	if s.cfg.Access != nil {
		mux.Handle("/auth/token", s.cfg.Access.TokenHandler())
		mux.Handle("/debug/pprof/", s.cfg.Access.AdminOnly(ProfileHandler()))
	}
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, _ *http.Request) {
		b, _ := protojson.Marshal(s.Status())
		w.Header().Set("Content-Type", "application/json")
		w.Write(b)
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if s.cfg.Access != nil && !s.cfg.Access.Ready() {
			http.Error(w, "access control state not fetched yet", http.StatusServiceUnavailable)
			return
		}
		for _, n := range s.upstream.Nodes() {
			if n.Healthy {
				w.Write([]byte("ready\n"))
				return
			}
		}
		http.Error(w, "no healthy node known", http.StatusServiceUnavailable)
	})
	return WithBodyIdleTimeout(mux, time.Minute)
}

// keepJoined rejoins through the seeds whenever no node is alive in the
// gateway's view (a partition healed, or every node restarted).
func (s *Standalone) keepJoined(ctx context.Context) {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		alive := false
		for _, m := range s.members.Members() {
			alive = alive || (m.Role == membership.RoleServer && m.State == membership.StateAlive)
		}
		if !alive {
			jctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			if err := s.members.Join(jctx, s.cfg.Join); err != nil {
				s.logger.Warn("rejoining the cluster", "seeds", s.cfg.Join, "err", err)
			}
			cancel()
		}
	}
}

// Status is the gateway's view of the nodes, nearest first.
func (s *Standalone) Status() *pb.GatewayStatus {
	gs := &pb.GatewayStatus{Id: s.cfg.ID, Region: s.cfg.Region, Zone: s.cfg.Zone}
	for _, n := range s.upstream.Nodes() {
		if gs.PreferredNode == "" && n.Healthy {
			gs.PreferredNode = n.ID
		}
		gs.Nodes = append(gs.Nodes, &pb.UpstreamNode{Id: n.ID, Region: n.Region, Zone: n.Zone,
			RttSeconds: n.RTT.Seconds(), RttKnown: n.Known, Healthy: n.Healthy})
	}
	return gs
}

// advertisedHTTP is the OCI API address other members are told about: a
// wildcard listener is advertised on the gossip host.
func (s *Standalone) advertisedHTTP() string {
	addr := s.httpLn.Addr().String()
	host, port, err := net.SplitHostPort(addr)
	if ip := net.ParseIP(host); err == nil && ip != nil && ip.IsUnspecified() {
		gossip := s.cfg.AdvertiseGossip
		if gossip == "" {
			gossip = s.cfg.GossipAddr
		}
		if ghost, _, gerr := net.SplitHostPort(gossip); gerr == nil && ghost != "" {
			return net.JoinHostPort(ghost, port)
		}
	}
	return addr
}

// HTTPAddr is the address the OCI API listens on.
func (s *Standalone) HTTPAddr() string { return s.httpLn.Addr().String() }

// ID is the gateway's gossip identity.
func (s *Standalone) ID() string { return s.cfg.ID }

// Upstream exposes the gateway's view of the nodes.
func (s *Standalone) Upstream() *Upstream { return s.upstream }

func (s *Standalone) writeReadyFile() error {
	if s.cfg.ReadyFile == "" {
		return nil
	}
	return transport.WriteReadyFile(s.cfg.ReadyFile, map[string]any{
		"gateway_id": s.cfg.ID, "cluster_id": s.cfg.ClusterID, "region": s.cfg.Region,
		"http_addr": s.HTTPAddr(), "gossip_addr": s.members.Addr(), "pid": os.Getpid(),
	})
}

// Close stops serving (in-flight requests get until ctx ends), leaves
// gossip and closes connections.
func (s *Standalone) Close(ctx context.Context) error {
	var errs []error
	if s.httpSrv != nil {
		if err := s.httpSrv.Shutdown(ctx); err != nil {
			errs = append(errs, err, s.httpSrv.Close())
		}
	} else if s.httpLn != nil {
		s.httpLn.Close()
	}
	if s.stop != nil {
		s.stop()
		s.wg.Wait()
	}
	if s.members != nil {
		errs = append(errs, s.members.Close())
	}
	if s.cache != nil {
		errs = append(errs, s.cache.close())
	}
	if s.upstream != nil {
		errs = append(errs, s.upstream.Close())
	}
	return errors.Join(errs...)
}
