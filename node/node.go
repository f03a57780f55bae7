package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"google.golang.org/grpc"

	"github.com/meridian-registry/meridian/consensus"
	"github.com/meridian-registry/meridian/gateway"
	"github.com/meridian-registry/meridian/gateway/auth"
	"github.com/meridian-registry/meridian/node/membership"
	"github.com/meridian-registry/meridian/node/pki"
	"github.com/meridian-registry/meridian/node/transport"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
	"github.com/meridian-registry/meridian/replication"
)

// Node is one running Meridian server.
type Node struct {
	cfg    Config
	logger *slog.Logger

	consensus      *consensus.Node
	membership     *membership.Membership
	regions        *replication.Regions
	localStore     replication.Driver
	replicator     *replication.Replicator
	scrubber       *replication.Scrubber
	rtt            *membership.RTT
	gateway        *gateway.Gateway
	registry       *prometheus.Registry
	gc             gcRunner
	gcMetrics      *gcMetrics
	webhookMetrics *webhookMetrics
	peers          *peers
	trust          *transport.Trust
	// access checks HTTP requests and admin credentials; nil when
	// authentication is off (insecure_no_auth).
	access      *auth.Authority
	denied      *auth.DeniedLog
	gossipKeys  [][]byte
	readIndexes *consensus.ReadIndexBatcher
	// caughtUp is set once this replica has applied a read index from the
	// leader since it started; before that its reads wait for one.
	caughtUp atomic.Bool
	// acked is the highest log index of a write this node acknowledged.
	// Local reads wait until the replica has applied it, so a client reads
	// its own writes through the node that took them (a follower learns of
	// a commit up to a heartbeat after the leader answered).
	acked atomic.Uint64
	// skipReadIndex turns catchUp into a no-op: every read answers from
	// the replica as it stands, misses and strong reads unconfirmed. Only
	// tests set it (export_test.go), to show what the read index guards.
	skipReadIndex atomic.Bool
	started       time.Time

	httpListener net.Listener
	httpServer   *http.Server
	grpcListener net.Listener
	grpcServer   *grpc.Server
	serveErr     chan error

	stop      chan struct{}
	wg        sync.WaitGroup
	closeOnce sync.Once
	closeErr  error
}

// New checks cfg and returns a node; Start runs it.
func New(cfg Config, logger *slog.Logger) (*Node, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("invalid configuration:\n%w", err)
	}
	if logger == nil {
		logger = slog.Default()
	}
	return &Node{cfg: cfg, logger: logger.With("node_id", cfg.NodeID)}, nil
}

// Start opens the stores, starts Raft and gossip, joins the cluster when
// asked to, and begins serving. It returns once the node serves; a leader
// may still be being elected (see /readyz and WaitReady).
func (n *Node) Start(ctx context.Context) (err error) {
	defer func() {
		if err != nil {
			n.Close(context.Background())
		}
	}()
	n.started = time.Now()
	n.stop = make(chan struct{})
	if n.trust, n.gossipKeys, err = n.cfg.LoadTrust(n.logger); err != nil {
		return err
	}
	if id := n.trust.Identity(); n.trust.Secure() && (id.Role != pki.RoleNode || id.ID != n.cfg.NodeID) {
		return fmt.Errorf("tls_cert is %s: a node's certificate must have role node and its node_id %q", id, n.cfg.NodeID)
	}
	if n.cfg.InsecureCluster {
		n.logger.Warn("--insecure-cluster: gRPC, Raft and gossip may run beyond loopback without TLS or a gossip key; anyone on the network can join, read and write the cluster")
	}
	n.peers = newPeers(n.trust, n.cfg.Dial)
	n.rtt = membership.NewRTT()
	// The data directory holds the upload key and every tag: no other
	// user may enter it (0700 also mends directories of older versions).
	if err := os.MkdirAll(n.cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	if err := os.Chmod(n.cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	n.registry = prometheus.NewRegistry()
	n.registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if n.webhookMetrics, err = newWebhookMetrics(n.registry); err != nil {
		return err
	}
	if n.gcMetrics, err = newGCMetrics(n.registry); err != nil {
		return err
	}

	// Listen first, so every advertised address is known before gossip.
	if n.httpListener, err = net.Listen("tcp", n.cfg.HTTPAddr); err != nil {
		return fmt.Errorf("http listener: %w", err)
	}
	if n.grpcListener, err = net.Listen("tcp", n.cfg.GRPCAddr); err != nil {
		return fmt.Errorf("grpc listener: %w", err)
	}
	raftLn, err := net.Listen("tcp", n.cfg.RaftAddr)
	if err != nil {
		return fmt.Errorf("raft listener: %w", err)
	}

	hasState, err := consensus.HasState(n.cfg.DataDir)
	if err != nil {
		raftLn.Close()
		return err
	}
	cc := consensus.DefaultConfig()
	cc.NodeID = n.cfg.NodeID
	cc.DataDir = n.cfg.DataDir
	cc.RaftListener = n.trust.RaftListener(raftLn)
	cc.AdvertiseRaft = n.cfg.AdvertiseRaft
	cc.Bootstrap = len(n.cfg.Join) == 0
	cc.SnapshotThreshold = n.cfg.SnapshotThreshold
	cc.SnapshotInterval = n.cfg.SnapshotInterval
	cc.TrailingLogs = n.cfg.TrailingLogs
	cc.ApplyTimeout = n.cfg.ApplyTimeout
	cc.HeartbeatTimeout = n.cfg.RaftHeartbeatTimeout
	cc.ElectionTimeout = n.cfg.RaftElectionTimeout
	cc.Logger = n.logger
	cc.Dial = n.trust.RaftDial(n.cfg.Dial)
	cc.LogVersionOf = n.logVersionOf
	n.consensus = consensus.NewNode(cc)
	if err := n.consensus.Open(ctx); err != nil {
		raftLn.Close()
		return err
	}
	n.readIndexes = consensus.NewReadIndexBatcher(n.readIndex, n.cfg.ApplyTimeout)

	if err := n.startMembership(); err != nil {
		return err
	}
	if err := n.openStores(ctx); err != nil {
		return err
	}

	if err := n.setupAccess(ctx); err != nil {
		return err
	}
	n.grpcServer = grpc.NewServer(slices.Concat(n.trust.MemberServerOptions(memberAccess), replication.RemoteServerOptions(),
		[]grpc.ServerOption{grpc.ChainUnaryInterceptor(n.adminInterceptor), grpc.ChainStreamInterceptor(n.adminStreamInterceptor)})...)
	pb.RegisterMemberServer(n.grpcServer, memberServer{n: n})
	pb.RegisterGatewayServer(n.grpcServer, gatewayServer{n: n})
	pb.RegisterAdminServer(n.grpcServer, adminServer{n: n})
	// Other regions reach this region's store through its nodes.
	pb.RegisterBlobStoreServer(n.grpcServer, replication.NewBlobStoreServer(map[string]replication.Driver{n.cfg.Region: n.localStore}))
	go n.grpcServer.Serve(n.grpcListener)

	if n.replicator, err = replication.NewReplicator(replication.ReplicatorConfig{
		Region: n.cfg.Region, Regions: n.regions, Source: placementSource{n},
		Workers: n.cfg.Replication.Workers, Logger: n.logger, Registerer: n.registry,
	}); err != nil {
		return err
	}
	if err := n.registerLagMetrics(); err != nil {
		return err
	}
	if n.scrubber, err = replication.NewScrubber(replication.ScrubConfig{
		Regions: n.regions, Source: n.consensus.Store(), Logger: n.logger.With("component", "scrub"), Registerer: n.registry,
		Owns: func(region, digest string) bool {
			return region == n.cfg.Region && replication.Owner(digest, n.regionNodes()) == n.cfg.NodeID
		},
	}); err != nil {
		return err
	}

	gc := gateway.DefaultConfig()
	gc.SyncTimeout = n.cfg.Replication.SyncTimeout
	gc.RedirectReads = n.cfg.Replication.RedirectReads
	gc.PresignTTL = n.cfg.Replication.PresignTTL
	gc.MaxManifestSize = int64(n.cfg.MaxManifestSize)
	gc.MaxBlobSize = int64(n.cfg.MaxBlobSize)
	gc.UploadTTL = n.cfg.UploadTTL
	gc.Logger = n.logger
	gc.Registerer = n.registry
	gc.MemberID = n.cfg.NodeID
	gc.PullResolution = n.cfg.GC.PullResolution
	if n.access != nil {
		gc.Authorizer = n.access
	}
	if n.gateway, err = gateway.New(gc, n.metadata(false), n.regions); err != nil {
		return err
	}
	n.httpServer = &http.Server{
		Handler:           n.routes(),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(n.logger.Handler(), slog.LevelDebug),
	}
	n.serveErr = make(chan error, 1)
	if n.httpServer.TLSConfig, err = n.cfg.HTTPTLS(n.logger); err != nil {
		return err
	}
	if n.httpServer.TLSConfig != nil {
		// The certificate comes from TLSConfig.GetCertificate (reloaded
		// when its files change), hence no file names here.
		go func() { n.serveErr <- n.httpServer.ServeTLS(n.httpListener, "", "") }()
	} else {
		go func() { n.serveErr <- n.httpServer.Serve(n.httpListener) }()
	}

	if err := n.joinCluster(ctx, hasState); err != nil {
		return err
	}
	n.wg.Add(11)
	if n.access != nil {
		n.wg.Add(1)
		go n.keepAccessCurrent()
	}
	go n.runScrubber()
	go n.pingPeers()
	go n.purgeAbandonedUploads()
	go n.reconcileMembers()
	go n.keepGossiping()
	go n.catchUpAfterStart()
	go n.maintainTopology()
	go n.runReplicator()
	go n.scheduleGC()
	go n.runPullLog()
	go n.runWebhooks()

	if err := n.writeReadyFile(); err != nil {
		return err
	}
	n.logger.Info("serving", "http", n.HTTPAddr(), "grpc", n.GRPCAddr(), "raft", n.consensus.Addr(),
		"gossip", n.membership.Addr(), "region", n.cfg.Region, "data_dir", n.cfg.DataDir)
	return nil
}

// routes mounts the OCI API and the operational endpoints.
func (n *Node) routes() http.Handler {
	mux := http.NewServeMux()
	api := withRequestCatchUp(n.gateway.Handler())
	mux.Handle("/v2/", api)
	mux.Handle("/v2", api)
	if n.access != nil {
		mux.Handle("/auth/token", n.access.TokenHandler())
		mux.Handle("GET /admin/audit", n.access.AdminOnly(http.HandlerFunc(n.serveAudit)))
		mux.Handle("/debug/pprof/", n.access.AdminOnly(gateway.ProfileHandler()))
	}
	mux.Handle("GET /metrics", promhttp.HandlerFor(n.registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if err := n.ready(r.Context()); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ready\n"))
	})
	return gateway.WithBodyIdleTimeout(mux, time.Minute)
}

// ready reports whether the node can serve writes: a leader is known and the
// upload key is installed.
func (n *Node) ready(ctx context.Context) error {
	if leader, _ := n.consensus.Raft().LeaderWithID(); leader == "" {
		return errors.New("no raft leader")
	}
	if k, err := n.consensus.Store().UploadKey(ctx); err != nil || k == nil {
		return errors.New("cluster upload key not installed yet")
	}
	// Until the cluster's regions are recorded, policies resolve to no
	// region and a push would be acknowledged with none of its copies
	// wanted anywhere else.
	if regions, err := n.consensus.Store().Regions(ctx); err != nil || len(regions) == 0 {
		return errors.New("cluster regions not recorded yet")
	}
	if n.access != nil {
		if st, err := n.consensus.Store().AccessState(ctx); err != nil || len(st.GetTokenKeys().GetKeys()) == 0 {
			return errors.New("token signing key not installed yet")
		}
		// Scripts log in right after /readyz: the first admin must exist.
		if done, err := n.consensus.Store().AccessBootstrapped(); err != nil || !done {
			return errors.New("first admin not created yet")
		}
	}
	if !n.caughtUp.Load() {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		if err := n.catchUp(cctx); err != nil {
			return fmt.Errorf("not caught up with the leader yet: %w", err)
		}
	}
	return nil
}

// catchUpAfterStart catches this replica up with the leader once, so it can
// serve local reads without waiting even if nothing asks it before, say, a
// partition.
func (n *Node) catchUpAfterStart() {
	defer n.wg.Done()
	stopped, stop := context.WithCancel(context.Background())
	defer stop()
	go func() {
		select {
		case <-n.stop:
			stop()
		case <-stopped.Done():
		}
	}()
	for !n.caughtUp.Load() {
		ctx, cancel := context.WithTimeout(stopped, n.cfg.ApplyTimeout)
		err := n.catchUp(ctx)
		cancel()
		if err == nil {
			return
		}
		select {
		case <-n.stop:
			return
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// WaitReady blocks until the node is ready or ctx ends.
func (n *Node) WaitReady(ctx context.Context) error {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		err := n.ready(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("node %s not ready: %w", n.cfg.NodeID, err)
		case <-t.C:
		}
	}
}

// HTTPAddr is the address the OCI API listens on.
func (n *Node) HTTPAddr() string { return n.httpListener.Addr().String() }

// GRPCAddr is the gRPC address other members dial.
func (n *Node) GRPCAddr() string {
	if n.cfg.AdvertiseGRPC != "" {
		return n.cfg.AdvertiseGRPC
	}
	return n.grpcListener.Addr().String()
}

// GossipAddr is the advertised gossip address (what --join takes).
func (n *Node) GossipAddr() string { return n.membership.Addr() }

// ID is the node's id.
func (n *Node) ID() string { return n.cfg.NodeID }

// advertisedHTTP is the registry address other members and operators are
// told about. A wildcard listener (":5000") is advertised on the host of the
// gRPC address, which other members already reach.
func (n *Node) advertisedHTTP() string {
	if n.cfg.AdvertiseHTTP != "" {
		return n.cfg.AdvertiseHTTP
	}
	host, port, err := net.SplitHostPort(n.HTTPAddr())
	if ip := net.ParseIP(host); err == nil && ip != nil && ip.IsUnspecified() {
		if ghost, _, gerr := net.SplitHostPort(n.GRPCAddr()); gerr == nil {
			return net.JoinHostPort(ghost, port)
		}
	}
	return n.HTTPAddr()
}

// RaftAddr is the address Raft listens on.
func (n *Node) RaftAddr() string { return n.consensus.Addr() }

// Membership exposes the node's gossip membership, for tests and
// administration.
func (n *Node) Membership() *membership.Membership { return n.membership }

// Consensus exposes the node's Raft member, for tests and administration.
func (n *Node) Consensus() *consensus.Node { return n.consensus }

// Done returns a channel that yields the HTTP server's error if it stops on
// its own.
func (n *Node) Done() <-chan error { return n.serveErr }

// purgeAbandonedUploads removes upload data older than the session TTL: no
// token can complete it any more.
func (n *Node) purgeAbandonedUploads() {
	defer n.wg.Done()
	every := min(n.cfg.UploadTTL/4, 10*time.Minute)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-n.stop:
			return
		case <-t.C:
			removed, err := n.localStore.PurgeUploads(context.Background(), time.Now().Add(-n.cfg.UploadTTL))
			if err != nil {
				n.logger.Warn("purge abandoned uploads", "err", err)
			} else if removed > 0 {
				n.logger.Info("purged abandoned uploads", "count", removed)
			}
		}
	}
}

// readyInfo is what --ready-file receives.
type readyInfo struct {
	NodeID     string `json:"node_id"`
	ClusterID  string `json:"cluster_id"`
	Region     string `json:"region"`
	HTTPAddr   string `json:"http_addr"`
	GRPCAddr   string `json:"grpc_addr"`
	RaftAddr   string `json:"raft_addr"`
	GossipAddr string `json:"gossip_addr"`
	DataDir    string `json:"data_dir"`
	PID        int    `json:"pid"`
}

func (n *Node) writeReadyFile() error {
	if n.cfg.ReadyFile == "" {
		return nil
	}
	return transport.WriteReadyFile(n.cfg.ReadyFile, readyInfo{
		NodeID: n.cfg.NodeID, ClusterID: n.cfg.ClusterID, Region: n.cfg.Region, HTTPAddr: n.HTTPAddr(),
		GRPCAddr: n.GRPCAddr(), RaftAddr: n.RaftAddr(), GossipAddr: n.GossipAddr(),
		DataDir: n.cfg.DataDir, PID: os.Getpid(),
	})
}

// Kill stops the node abruptly, as a crash would, for harnesses that run
// nodes in one process: Raft stops first and hands nothing over, every
// connection drops and in-flight requests fail, and gossip is not left, so
// peers detect a failure. The stores are closed (what was written survives,
// as it does a killed process), so a new Node can start on the same data
// directory. Close after Kill does nothing.
func (n *Node) Kill() {
	n.closeOnce.Do(func() {
		if n.consensus != nil {
			if r := n.consensus.Raft(); r != nil {
				r.Shutdown().Error()
			}
		}
		if n.httpServer != nil {
			n.httpServer.Close()
		}
		if n.grpcServer != nil {
			n.grpcServer.Stop()
		}
		if n.membership != nil {
			n.membership.Shutdown()
		}
		if n.stop != nil {
			close(n.stop)
			n.wg.Wait()
		}
		if n.peers != nil {
			n.peers.close()
		}
		if n.consensus != nil {
			n.consensus.Close()
		}
	})
}

// Close stops serving (letting in-flight requests finish until ctx ends),
// leaves gossip, then stops Raft and closes the stores. The node stays a
// Raft member: stopping is not leaving. Safe to call more than once.
func (n *Node) Close(ctx context.Context) error {
	n.closeOnce.Do(func() {
		var errs []error
		if n.httpServer != nil {
			if err := n.httpServer.Shutdown(ctx); err != nil {
				errs = append(errs, err, n.httpServer.Close())
			}
		} else if n.httpListener != nil {
			n.httpListener.Close()
		}
		if n.stop != nil {
			close(n.stop)
			n.wg.Wait()
		}
		if n.membership != nil {
			errs = append(errs, n.membership.Close())
		}
		if n.grpcServer != nil {
			stopped := make(chan struct{})
			go func() { n.grpcServer.GracefulStop(); close(stopped) }()
			select {
			case <-stopped:
			case <-time.After(5 * time.Second):
				n.grpcServer.Stop()
			}
		} else if n.grpcListener != nil {
			n.grpcListener.Close()
		}
		if n.peers != nil {
			n.peers.close()
		}
		if n.consensus != nil {
			errs = append(errs, n.consensus.Close())
		}
		if n.denied != nil {
			errs = append(errs, n.denied.Close())
		}
		n.closeErr = errors.Join(errs...)
	})
	return n.closeErr
}
