package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/meridian-registry/meridian/gateway"
	"github.com/meridian-registry/meridian/gateway/auth"
	"github.com/meridian-registry/meridian/node"
	"github.com/meridian-registry/meridian/node/membership"
	"github.com/meridian-registry/meridian/node/pki"
)

// gatewayOptions are the settings of `meridian gateway`. Its config file has
// the same format as a node's (nodes and gateways can share one), and keys
// that only concern nodes are ignored.
var gatewayOptions = []option{
	stringOpt("gateway-id", "this gateway's name in gossip and cluster status: its certificate's id, or that id and a -suffix (default: the certificate's id; without TLS gateway-<host>-<random>)", func(c *node.Config) *string { return &c.GatewayID }),
	stringOpt("cluster-id", "cluster identity; must match the nodes'", func(c *node.Config) *string { return &c.ClusterID }),
	stringOpt("region", "region this gateway runs in (uploads go to the nearest of a repository's regions)", func(c *node.Config) *string { return &c.Region }),
	stringOpt("zone", "zone within the region (same-zone nodes win ties)", func(c *node.Config) *string { return &c.Zone }),
	stringOpt("http-addr", "OCI API, /metrics, /healthz and /readyz listen address", func(c *node.Config) *string { return &c.HTTPAddr }),
	stringOpt("gossip-addr", "gossip listen address, UDP and TCP", func(c *node.Config) *string { return &c.GossipAddr }),
	stringOpt("advertise-gossip", "gossip address members dial (default: gossip-addr)", func(c *node.Config) *string { return &c.AdvertiseGossip }),
	listOpt("join", "gossip address of a running member; repeat for more (env: comma-separated)", func(c *node.Config) *[]string { return &c.Join }),
	durationOpt("join-timeout", "how long the gateway tries to reach --join before giving up", func(c *node.Config) *time.Duration { return &c.JoinTimeout }),
	regionStoresOpt,
	stringOpt("read-consistency", "local or strong, as on nodes", func(c *node.Config) *string { return &c.ReadConsistency }),
	stringOpt("gossip-profile", "gossip timings: lan, wan or local", func(c *node.Config) *string { return &c.GossipProfile }),
	stringOpt("ready-file", "write JSON with the gateway's id and actual addresses here once serving", func(c *node.Config) *string { return &c.ReadyFile }),
	sizeOpt("blob-cache", "bytes of hot blobs from file:// regions kept on local disk, one upstream read shared by concurrent readers (0: off)", func(c *node.Config) *node.ByteSize { return &c.GatewayBlobCache }),
	stringOpt("blob-cache-dir", "directory of the blob cache, emptied at start (default: a temporary directory)", func(c *node.Config) *string { return &c.GatewayBlobCacheDir }),
	boolOpt("share-region-directory", "this gateway mounts its region's file:// directory as the region's nodes do, and reads and writes it itself instead of through a node", func(c *node.Config) *bool { return &c.GatewayShareRegionDirectory }),
	sizeOpt("max-manifest-size", "largest accepted manifest, bytes", func(c *node.Config) *node.ByteSize { return &c.MaxManifestSize }),
	sizeOpt("max-blob-size", "largest accepted blob, bytes (0: no limit)", func(c *node.Config) *node.ByteSize { return &c.MaxBlobSize }),
	durationOpt("upload-ttl", "how long an upload session stays usable", func(c *node.Config) *time.Duration { return &c.UploadTTL }),
	durationOpt("sync-timeout", "how long a blob PUT waits for a policy's min_regions copies before 503", func(c *node.Config) *time.Duration { return &c.Replication.SyncTimeout }),
	boolOpt("redirect-reads", "answer blob GETs served from S3 with a 307 to a presigned URL", func(c *node.Config) *bool { return &c.Replication.RedirectReads }),
	durationOpt("presign-ttl", "lifetime of presigned blob URLs", func(c *node.Config) *time.Duration { return &c.Replication.PresignTTL }),
	boolOpt("insecure-no-auth", "turn authentication off: anyone who reaches the gateway may push, pull and delete", func(c *node.Config) *bool { return &c.Auth.InsecureNoAuth }),
	stringOpt("username", "a cluster admin, to fetch the access state from nodes without cluster TLS", func(c *node.Config) *string { return &c.Auth.Username }),
	stringOpt("password-file", "file with --username's password (or env MERIDIAN_PASSWORD)", func(c *node.Config) *string { return &c.Auth.PasswordFile }),
	stringOpt("denied-log", "file recording refused requests, rotated at 16 MiB (default: the log output)", func(c *node.Config) *string { return &c.Auth.DeniedLog }),
	durationOpt("token-ttl", "lifetime of registry tokens from /auth/token", func(c *node.Config) *time.Duration { return &c.Auth.TokenTTL }),
	durationOpt("refresh-ttl", "lifetime of refresh tokens (offline_token=true)", func(c *node.Config) *time.Duration { return &c.Auth.RefreshTTL }),
	stringOpt("log-level", "debug, info, warn or error", func(c *node.Config) *string { return &c.LogLevel }),
	stringOpt("log-format", "text or json", func(c *node.Config) *string { return &c.LogFormat }),
}

// gatewayAccess builds the gateway's access control, unless
// insecure_no_auth; the returned close releases its denied log.
func gatewayAccess(c node.Config, sc *gateway.StandaloneConfig, logger *slog.Logger) (func(), error) {
	if c.Auth.InsecureNoAuth {
		logger.Warn("authentication is OFF (--insecure-no-auth): anyone who reaches the gateway may push, pull and delete")
		return func() {}, nil
	}
	ext, err := c.Auth.Externals()
	if err != nil {
		return nil, err
	}
	ac := auth.Config{TokenTTL: c.Auth.TokenTTL, RefreshTTL: c.Auth.RefreshTTL, Leeway: c.Auth.Leeway,
		MaxFailures: c.Auth.MaxFailedLogins, External: ext, Via: sc.ID, Logger: logger.With("component", "auth")}
	closeLog := func() {}
	if c.Auth.DeniedLog != "" {
		d, err := auth.OpenDeniedLog(c.Auth.DeniedLog, 16<<20)
		if err != nil {
			return nil, err
		}
		ac.Denied, closeLog = d, func() { d.Close() }
	}
	sc.Access = auth.New(ac)
	sc.AccessUsername = c.Auth.Username
	if c.Auth.Username != "" {
		pw, err := readPassword(c.Auth.PasswordFile)
		if err != nil {
			closeLog()
			return nil, err
		}
		sc.AccessPassword = pw
	}
	return closeLog, nil
}

// readPassword reads a password file (first line), or MERIDIAN_PASSWORD
// without one.
func readPassword(file string) (string, error) {
	if file == "" {
		if pw, ok := os.LookupEnv("MERIDIAN_PASSWORD"); ok {
			return pw, nil
		}
		return "", errors.New("a username needs --password-file or MERIDIAN_PASSWORD")
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", err
	}
	return strings.TrimRight(strings.SplitN(string(b), "\n", 2)[0], "\r"), nil
}

// gatewayDefaults are a node's defaults with the gateway's own gossip port,
// so a gateway and a node can share a host.
func gatewayDefaults() node.Config {
	c := node.DefaultConfig()
	c.GossipAddr = "127.0.0.1:5004"
	c.GatewayBlobCache = 1 << 30
	return c
}

// standaloneConfig maps the shared configuration onto a gateway's.
func standaloneConfig(c node.Config) (gateway.StandaloneConfig, error) {
	sc := gateway.StandaloneConfig{
		ID: c.GatewayID, ClusterID: c.ClusterID, Region: c.Region, Zone: c.Zone, HTTPAddr: c.HTTPAddr,
		GossipAddr: c.GossipAddr, AdvertiseGossip: c.AdvertiseGossip, Join: c.Join,
		ReadConsistency: c.ReadConsistency, ReadyFile: c.ReadyFile, JoinTimeout: c.JoinTimeout,
		BlobCache:            gateway.BlobCacheConfig{MaxBytes: int64(c.GatewayBlobCache), Dir: c.GatewayBlobCacheDir},
		ShareRegionDirectory: c.GatewayShareRegionDirectory,
	}
	switch c.GossipProfile {
	case "lan":
	case "wan":
		sc.GossipTimings = membership.WANTimings()
	case "local":
		sc.GossipTimings = membership.LocalTimings()
	default:
		return sc, fmt.Errorf("gossip_profile %q: want lan, wan or local", c.GossipProfile)
	}
	if c.ReadConsistency != "local" && c.ReadConsistency != "strong" {
		return sc, fmt.Errorf("read_consistency %q: want local or strong", c.ReadConsistency)
	}
	for _, r := range c.Regions {
		sc.Regions = append(sc.Regions, gateway.RegionStore{Name: r.Name, Store: r.Store, AccessKey: r.AccessKey, SecretKey: r.SecretKey})
	}
	g := gateway.DefaultConfig()
	g.MaxManifestSize = int64(c.MaxManifestSize)
	g.MaxBlobSize = int64(c.MaxBlobSize)
	g.UploadTTL = c.UploadTTL
	g.SyncTimeout = c.Replication.SyncTimeout
	g.RedirectReads = c.Replication.RedirectReads
	g.PresignTTL = c.Replication.PresignTTL
	sc.Gateway = g
	return sc, nil
}

// gatewayCmd runs a standalone gateway until SIGINT or SIGTERM.
func gatewayCmd(args []string) error {
	cfg, err := loadConfig("gateway", args, append(gatewayOptions, trustOptions...), gatewayDefaults())
	if err != nil {
		return err
	}
	sc, err := standaloneConfig(cfg)
	if err != nil {
		return err
	}
	logger := newLogger(cfg.LogLevel, cfg.LogFormat)
	sc.Logger = logger
	if sc.Trust, sc.GossipKeys, err = cfg.LoadTrust(logger); err != nil {
		return err
	}
	sc.InsecureCluster = cfg.InsecureCluster
	if path := cfg.GossipKeyFile; path != "" {
		sc.SaveGossipKeys = func(keys [][]byte) error {
			return pki.WriteFileAtomic(path, membership.FormatKeys(keys), 0o600)
		}
	}
	if sc.HTTPTLS, err = cfg.HTTPTLS(logger); err != nil {
		return err
	}
	if cfg.InsecureCluster {
		logger.Warn("--insecure-cluster: gossip and gRPC to the nodes may run without TLS or a gossip key; anyone on the network can join or impersonate members")
	}
	closeAccess, err := gatewayAccess(cfg, &sc, logger)
	if err != nil {
		return err
	}
	defer closeAccess()
	g, err := gateway.NewStandalone(sc)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := g.Start(ctx); err != nil {
		if ctx.Err() != nil {
			// Stopped while still joining: not a failure.
			logger.Info("stopped before joining the cluster")
			return nil
		}
		return err
	}
	<-ctx.Done()
	logger.Info("shutting down")
	shutdown, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	return g.Close(shutdown)
}
