package node

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/meridian-registry/meridian/gateway"
	"github.com/meridian-registry/meridian/node/membership"
	"github.com/meridian-registry/meridian/node/pki"
	"github.com/meridian-registry/meridian/node/transport"
)

// Config configures one node. Every field has a YAML key (its tag), a flag
// and a MERIDIAN_ environment variable; DefaultConfig runs with no file.
type Config struct {
	// DataDir holds the node's Raft log, state store, snapshots and, unless
	// BlobDir says otherwise, its blobs.
	DataDir string `yaml:"data_dir"`
	// BlobDir is the filesystem blob store of a cluster that lists no
	// Regions (one region, the node's own). Empty means DataDir/blobs.
	BlobDir string `yaml:"blob_dir"`
	// Regions lists every region of the cluster with its blob store; every
	// node lists the same regions, and a node whose list differs is refused
	// at join. Empty: a single region, Region, stored in BlobDir.
	Regions []RegionConfig `yaml:"regions"`
	// Replication tunes geo-replication and seeds the policies.
	Replication ReplicationConfig `yaml:"replication"`
	// ClusterID must match on every member; a node of another cluster is
	// refused at join.
	ClusterID string `yaml:"cluster_id"`
	// NodeID is the node's stable identity; it defaults to the host name.
	NodeID string `yaml:"node_id"`
	// GatewayID names a standalone gateway (meridian gateway) in gossip;
	// nodes ignore it. Empty: gateway-<host>-<random>.
	GatewayID string `yaml:"gateway_id"`
	// GatewayBlobCache bounds a standalone gateway's on-disk cache of hot
	// blobs read from file:// regions (0: off); GatewayBlobCacheDir holds
	// it (empty: a temporary directory). GatewayShareRegionDirectory says
	// the gateway mounts its region's file:// directory as the nodes do and
	// uses it directly. Nodes ignore all three.
	GatewayBlobCache            ByteSize `yaml:"gateway_blob_cache"`
	GatewayBlobCacheDir         string   `yaml:"gateway_blob_cache_dir"`
	GatewayShareRegionDirectory bool     `yaml:"gateway_share_region_directory"`
	// Region and Zone place the node; its blobs land in its region's store.
	Region string `yaml:"region"`
	Zone   string `yaml:"zone"`
	// Listen addresses: HTTP serves the OCI API, /metrics, /healthz and
	// /readyz; gRPC links nodes, gateways and operator commands; Raft
	// carries consensus; gossip carries membership (UDP and TCP).
	HTTPAddr   string `yaml:"http_addr"`
	GRPCAddr   string `yaml:"grpc_addr"`
	RaftAddr   string `yaml:"raft_addr"`
	GossipAddr string `yaml:"gossip_addr"`
	// Advertised addresses other members dial; empty means the listener's.
	AdvertiseHTTP   string `yaml:"advertise_http"`
	AdvertiseGRPC   string `yaml:"advertise_grpc"`
	AdvertiseRaft   string `yaml:"advertise_raft"`
	AdvertiseGossip string `yaml:"advertise_gossip"`
	// Join lists gossip addresses of running members. A node started without
	// Join and without state bootstraps a new cluster; with Join it never does.
	Join []string `yaml:"join"`
	// JoinTimeout bounds the first join of a node with no state.
	JoinTimeout time.Duration `yaml:"join_timeout"`
	// Voters is how many voters the leader keeps (spread across regions);
	// further servers join as non-voters.
	Voters int `yaml:"voters"`
	// DeadVoterTimeout is how long a voter may be gone before the leader
	// promotes a healthy non-voter in its place.
	DeadVoterTimeout time.Duration `yaml:"dead_voter_timeout"`
	// ReadConsistency is "local" (replica reads; misses confirmed with the
	// leader) or "strong" (every read linearizable through a read index).
	ReadConsistency string `yaml:"read_consistency"`
	// ApplyTimeout bounds a write waiting for a leader and commit.
	ApplyTimeout time.Duration `yaml:"apply_timeout"`
	// RaftHeartbeatTimeout and RaftElectionTimeout tune failure detection;
	// zero keeps hashicorp/raft's defaults (1s each).
	RaftHeartbeatTimeout time.Duration `yaml:"raft_heartbeat_timeout"`
	RaftElectionTimeout  time.Duration `yaml:"raft_election_timeout"`
	// GossipProfile tunes membership timings: lan (default), wan or local.
	GossipProfile string `yaml:"gossip_profile"`
	// ReadyFile, when set, receives JSON with the node's id and actual
	// addresses once it serves (so scripts can use :0 ports).
	ReadyFile string `yaml:"ready_file"`

	// MaxManifestSize and MaxBlobSize bound uploads in bytes (0: no blob limit).
	MaxManifestSize ByteSize `yaml:"max_manifest_size"`
	MaxBlobSize     ByteSize `yaml:"max_blob_size"`
	// UploadTTL is how long an upload session stays usable; abandoned
	// uploads are removed after it.
	UploadTTL time.Duration `yaml:"upload_ttl"`
	// UploadKeyRotation is how often the leader adds a new upload-token
	// key to the ring (0: never); keys stay until UploadTTL after they were
	// replaced, so every session token stays usable for its whole life.
	UploadKeyRotation time.Duration `yaml:"upload_key_rotation"`

	// SnapshotThreshold is how many log entries trigger a snapshot and log
	// compaction; SnapshotInterval is how often Raft checks the threshold.
	SnapshotThreshold uint64        `yaml:"snapshot_threshold"`
	SnapshotInterval  time.Duration `yaml:"snapshot_interval"`
	// TrailingLogs is how many log entries stay behind a snapshot, so a
	// follower that lags by fewer catches up from the log, not a snapshot.
	TrailingLogs uint64 `yaml:"trailing_logs"`

	// Cluster trust (docs/security.md). TLSCA, TLSCert and TLSKey are the
	// member identity for gRPC and Raft: mutual TLS with the cluster CA,
	// the certificate naming this member (role node and NodeID, or role
	// gateway and GatewayID); the CLI uses an admin certificate. The files
	// are re-read when they change. GossipKeyFile holds the gossip
	// keyring, one base64 key per line, the first the primary. A gRPC,
	// Raft or gossip listener beyond loopback refuses to start without
	// them unless InsecureCluster.
	TLSCA string `yaml:"tls_ca"`
	// TLSCRL is a revocation list signed by the cluster CA (meridian ca
	// revoke); peers whose certificate it lists are refused. Re-read when
	// it changes.
	TLSCRL string `yaml:"tls_crl"`
	// HTTPTLSCert and HTTPTLSKey serve the OCI API over HTTPS (HTTP/2 and
	// HTTP/1.1), re-read when they change; without them it is plain HTTP.
	HTTPTLSCert     string `yaml:"http_tls_cert"`
	HTTPTLSKey      string `yaml:"http_tls_key"`
	TLSCert         string `yaml:"tls_cert"`
	TLSKey          string `yaml:"tls_key"`
	GossipKeyFile   string `yaml:"gossip_key_file"`
	InsecureCluster bool   `yaml:"insecure_cluster"`

	// Dial, when set, opens this node's Raft and gRPC connections to other
	// nodes (tests use it to cut nodes off); nil means plain TCP.
	Dial func(ctx context.Context, addr string) (net.Conn, error) `yaml:"-"`

	// Auth configures authentication, access control and the audit log.
	Auth AuthConfig `yaml:"auth"`
	// GC schedules garbage collection.
	GC GCConfig `yaml:"gc"`
	// Webhooks tunes webhook delivery.
	Webhooks WebhookConfig `yaml:"webhooks"`

	// LogLevel is debug, info, warn or error; LogFormat is text or json.
	LogLevel  string `yaml:"log_level"`
	LogFormat string `yaml:"log_format"`
}

// DefaultConfig returns a configuration that starts a working single node.
func DefaultConfig() Config {
	host, _ := os.Hostname()
	g := gateway.DefaultConfig()
	return Config{
		DataDir:           "data",
		ClusterID:         "meridian",
		NodeID:            host,
		Region:            "local",
		HTTPAddr:          ":5000",
		GRPCAddr:          "127.0.0.1:5001",
		RaftAddr:          "127.0.0.1:5002",
		GossipAddr:        "127.0.0.1:5003",
		JoinTimeout:       30 * time.Second,
		Voters:            3,
		DeadVoterTimeout:  10 * time.Minute,
		ReadConsistency:   "local",
		ApplyTimeout:      10 * time.Second,
		GossipProfile:     "lan",
		MaxManifestSize:   ByteSize(g.MaxManifestSize),
		MaxBlobSize:       ByteSize(g.MaxBlobSize),
		UploadTTL:         g.UploadTTL,
		UploadKeyRotation: 24 * time.Hour,
		Replication: ReplicationConfig{
			Workers:       4,
			SyncTimeout:   g.SyncTimeout,
			PresignTTL:    g.PresignTTL,
			ScrubInterval: 24 * time.Hour,
			ScrubRate:     16 << 20,
		},
		SnapshotThreshold: 8192,
		SnapshotInterval:  2 * time.Minute,
		TrailingLogs:      10240,
		LogLevel:          "info",
		LogFormat:         "text",
		Auth:              defaultAuthConfig(),
		GC:                defaultGCConfig(),
		Webhooks:          defaultWebhookConfig(),
	}
}

var idRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// Validate reports every unusable setting at once.
func (c Config) Validate() error {
	var errs []error
	if c.DataDir == "" {
		errs = append(errs, errors.New("data_dir is required"))
	}
	if !idRE.MatchString(c.NodeID) {
		errs = append(errs, fmt.Errorf("node_id %q: use 1-63 letters, digits, '.', '_' or '-'", c.NodeID))
	}
	if !idRE.MatchString(c.Region) {
		errs = append(errs, fmt.Errorf("region %q: use 1-63 letters, digits, '.', '_' or '-'", c.Region))
	}
	if !idRE.MatchString(c.ClusterID) {
		errs = append(errs, fmt.Errorf("cluster_id %q: use 1-63 letters, digits, '.', '_' or '-'", c.ClusterID))
	}
	if c.Zone != "" && !idRE.MatchString(c.Zone) {
		errs = append(errs, fmt.Errorf("zone %q: use 1-63 letters, digits, '.', '_' or '-'", c.Zone))
	}
	listen := map[string]string{"http_addr": c.HTTPAddr, "grpc_addr": c.GRPCAddr, "raft_addr": c.RaftAddr, "gossip_addr": c.GossipAddr}
	for _, name := range sortedKeys(listen) {
		if _, _, err := net.SplitHostPort(listen[name]); err != nil {
			errs = append(errs, fmt.Errorf("%s %q: want host:port", name, listen[name]))
		}
	}
	advertise := map[string]string{"advertise_http": c.AdvertiseHTTP, "advertise_grpc": c.AdvertiseGRPC, "advertise_raft": c.AdvertiseRaft, "advertise_gossip": c.AdvertiseGossip}
	for _, name := range sortedKeys(advertise) {
		if a := advertise[name]; a != "" {
			if host, _, err := net.SplitHostPort(a); err != nil || host == "" {
				errs = append(errs, fmt.Errorf("%s %q: want a dialable host:port", name, a))
			}
		}
	}
	for _, j := range c.Join {
		if _, _, err := net.SplitHostPort(j); err != nil {
			errs = append(errs, fmt.Errorf("join %q: want host:port of a member's gossip address", j))
		}
	}
	if c.Voters < 1 {
		errs = append(errs, errors.New("voters must be at least 1"))
	}
	if c.ReadConsistency != "local" && c.ReadConsistency != "strong" {
		errs = append(errs, fmt.Errorf("read_consistency %q: want local or strong", c.ReadConsistency))
	}
	if c.GossipProfile != "lan" && c.GossipProfile != "wan" && c.GossipProfile != "local" {
		errs = append(errs, fmt.Errorf("gossip_profile %q: want lan, wan or local", c.GossipProfile))
	}
	if c.ApplyTimeout <= 0 || c.JoinTimeout <= 0 || c.DeadVoterTimeout <= 0 {
		errs = append(errs, errors.New("apply_timeout, join_timeout and dead_voter_timeout must be positive"))
	}
	if c.MaxManifestSize <= 0 {
		errs = append(errs, errors.New("max_manifest_size must be positive"))
	}
	if c.MaxBlobSize < 0 {
		errs = append(errs, errors.New("max_blob_size cannot be negative"))
	}
	if err := c.GC.validate(); err != nil {
		errs = append(errs, err)
	}
	if err := c.Webhooks.validate(); err != nil {
		errs = append(errs, err)
	}
	if c.Replication.ScrubInterval < 0 || c.Replication.ScrubRate < 0 {
		errs = append(errs, errors.New("replication.scrub_interval and replication.scrub_rate cannot be negative"))
	}
	if c.UploadTTL <= 0 {
		errs = append(errs, errors.New("upload_ttl must be positive"))
	}
	if c.UploadKeyRotation < 0 {
		errs = append(errs, errors.New("upload_key_rotation cannot be negative"))
	}
	if c.SnapshotThreshold == 0 {
		errs = append(errs, errors.New("snapshot_threshold must be positive"))
	}
	if c.SnapshotInterval < 5*time.Millisecond {
		errs = append(errs, errors.New("snapshot_interval must be at least 5ms"))
	}
	errs = append(errs, c.validateRegions()...)
	if (c.HTTPTLSCert == "") != (c.HTTPTLSKey == "") {
		errs = append(errs, errors.New("http_tls_cert and http_tls_key come together"))
	}
	if err := c.validateTrust(map[string]string{"grpc_addr": c.GRPCAddr, "raft_addr": c.RaftAddr, "gossip_addr": c.GossipAddr}); err != nil {
		errs = append(errs, err)
	}
	switch strings.ToLower(c.LogLevel) {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("log_level %q: want debug, info, warn or error", c.LogLevel))
	}
	if c.LogFormat != "text" && c.LogFormat != "json" {
		errs = append(errs, fmt.Errorf("log_format %q: want text or json", c.LogFormat))
	}
	return errors.Join(errs...)
}

// ByteSize is a byte count that configuration may write with a binary
// suffix: 4194304, 4MiB, 10GiB.
type ByteSize int64

// ParseByteSize reads a byte count with an optional KiB, MiB, GiB or TiB
// suffix. Negative counts and counts that overflow are errors.
func ParseByteSize(s string) (ByteSize, error) {
	t := strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40}} {
		if v, ok := strings.CutSuffix(t, u.suffix); ok {
			t, mult = strings.TrimSpace(v), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n < 0 || n > math.MaxInt64/mult {
		return 0, fmt.Errorf("not a byte count (a non-negative number, optionally with KiB, MiB, GiB or TiB): %q", s)
	}
	return ByteSize(n * mult), nil
}

// UnmarshalText lets YAML and flags use the same notation.
func (b *ByteSize) UnmarshalText(text []byte) error {
	v, err := ParseByteSize(string(text))
	if err != nil {
		return err
	}
	*b = v
	return nil
}

func (b ByteSize) String() string { return strconv.FormatInt(int64(b), 10) }

// validateTrust checks the trust settings without reading the files:
// the TLS paths come as a set, and member listeners beyond loopback need
// TLS and a gossip key unless InsecureCluster says otherwise.
func (c Config) validateTrust(listeners map[string]string) error {
	set := 0
	for _, p := range []string{c.TLSCA, c.TLSCert, c.TLSKey} {
		if p != "" {
			set++
		}
	}
	if set != 0 && set != 3 {
		return errors.New("tls_ca, tls_cert and tls_key come together: set all three or none")
	}
	return transport.CheckListeners(listeners, set == 3, c.GossipKeyFile != "", c.InsecureCluster)
}

// HTTPTLS loads the HTTPS certificate for the OCI port; nil without one.
func (c Config) HTTPTLS(logger *slog.Logger) (*tls.Config, error) {
	if c.HTTPTLSCert == "" && c.HTTPTLSKey == "" {
		return nil, nil
	}
	kp, err := pki.OpenKeyPair(c.HTTPTLSCert, c.HTTPTLSKey, logger)
	if err != nil {
		return nil, fmt.Errorf("HTTPS: %w", err)
	}
	return kp.ServerConfig(), nil
}

// LoadTrust reads the member certificate and the gossip keys the
// configuration names: plaintext (a nil Source) without TLS files, no
// encryption without a key file.
func (c Config) LoadTrust(logger *slog.Logger) (*transport.Trust, [][]byte, error) {
	trust := &transport.Trust{}
	if c.TLSCRL != "" && c.TLSCA == "" {
		return nil, nil, errors.New("cluster TLS: --tls-crl needs --tls-ca, --tls-cert and --tls-key")
	}
	if c.TLSCA != "" || c.TLSCert != "" || c.TLSKey != "" {
		src, err := pki.OpenWithCRL(c.TLSCA, c.TLSCRL, c.TLSCert, c.TLSKey, logger)
		if err != nil {
			return nil, nil, fmt.Errorf("cluster TLS: %w", err)
		}
		if id := src.Identity(); id.Cluster != c.ClusterID {
			return nil, nil, fmt.Errorf("cluster TLS: %s is a certificate of cluster %q, this is cluster_id %q", c.TLSCert, id.Cluster, c.ClusterID)
		}
		trust.Source = src
	}
	var keys [][]byte
	if c.GossipKeyFile != "" {
		var err error
		if keys, err = membership.ReadKeyFile(c.GossipKeyFile); err != nil {
			return nil, nil, err
		}
	}
	return trust, keys, nil
}
