package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/meridian-registry/meridian/node"
	"github.com/meridian-registry/meridian/replication"
)

// option is one setting: its flag name (the YAML key is the same in
// snake_case, the env var MERIDIAN_ plus upper snake_case), help text, and
// how to parse it into the config.
type option struct {
	name  string
	usage string
	set   func(c *node.Config, v string) error
	get   func(c *node.Config) string
	// list options take a comma-separated value; as flags they repeat.
	list bool
	// boolean options may stand alone as flags (--insecure-cluster).
	boolean bool
}

func stringOpt(name, usage string, field func(*node.Config) *string) option {
	return option{name: name, usage: usage,
		set: func(c *node.Config, v string) error { *field(c) = v; return nil },
		get: func(c *node.Config) string { return *field(c) }}
}

func sizeOpt(name, usage string, field func(*node.Config) *node.ByteSize) option {
	return option{name: name, usage: usage,
		set: func(c *node.Config, v string) error { return field(c).UnmarshalText([]byte(v)) },
		get: func(c *node.Config) string { return field(c).String() }}
}

func uint64Opt(name, usage string, field func(*node.Config) *uint64) option {
	return option{name: name, usage: usage,
		set: func(c *node.Config, v string) (err error) { *field(c), err = strconv.ParseUint(v, 10, 64); return err },
		get: func(c *node.Config) string { return strconv.FormatUint(*field(c), 10) }}
}

func intOpt(name, usage string, field func(*node.Config) *int) option {
	return option{name: name, usage: usage,
		set: func(c *node.Config, v string) (err error) { *field(c), err = strconv.Atoi(v); return err },
		get: func(c *node.Config) string { return strconv.Itoa(*field(c)) }}
}

func listOpt(name, usage string, field func(*node.Config) *[]string) option {
	return option{name: name, usage: usage, list: true,
		set: func(c *node.Config, v string) error {
			var items []string
			for _, item := range strings.Split(v, ",") {
				if item = strings.TrimSpace(item); item != "" {
					items = append(items, item)
				}
			}
			*field(c) = items
			return nil
		},
		get: func(c *node.Config) string { return strings.Join(*field(c), ",") }}
}

func durationOpt(name, usage string, field func(*node.Config) *time.Duration) option {
	return option{name: name, usage: usage,
		set: func(c *node.Config, v string) (err error) { *field(c), err = time.ParseDuration(v); return err },
		get: func(c *node.Config) string { return field(c).String() }}
}

func boolOpt(name, usage string, field func(*node.Config) *bool) option {
	return option{name: name, usage: usage, boolean: true,
		set: func(c *node.Config, v string) (err error) { *field(c), err = strconv.ParseBool(v); return err },
		get: func(c *node.Config) string { return strconv.FormatBool(*field(c)) }}
}

// regionStoresOpt sets the region list from NAME=URL items.
var regionStoresOpt = option{name: "region-store", list: true,
	usage: "a region and its blob store, NAME=s3://…|file:///…; repeat for every region (env: comma-separated)",
	set: func(c *node.Config, v string) error {
		var regions []node.RegionConfig
		for _, item := range strings.Split(v, ",") {
			if item = strings.TrimSpace(item); item == "" {
				continue
			}
			name, url, ok := strings.Cut(item, "=")
			if !ok || name == "" || url == "" {
				return fmt.Errorf("%q: want NAME=STORE_URL", item)
			}
			regions = append(regions, node.RegionConfig{Name: name, Store: url})
		}
		c.Regions = regions
		return nil
	},
	get: func(c *node.Config) string {
		var items []string
		for _, r := range c.Regions {
			items = append(items, r.Name+"="+replication.RedactStoreURL(r.Store))
		}
		return strings.Join(items, ",")
	}}

// serveOptions are the settings of `meridian serve`.
var serveOptions = []option{
	stringOpt("data-dir", "directory for the node's state and blobs", func(c *node.Config) *string { return &c.DataDir }),
	stringOpt("blob-dir", "blob directory of a cluster without --region-store (default: DATA_DIR/blobs)", func(c *node.Config) *string { return &c.BlobDir }),
	regionStoresOpt,
	intOpt("replication-workers", "blobs this node copies into its region at once", func(c *node.Config) *int { return &c.Replication.Workers }),
	durationOpt("sync-timeout", "how long a blob PUT waits for a policy's min_regions copies before 503", func(c *node.Config) *time.Duration { return &c.Replication.SyncTimeout }),
	boolOpt("redirect-reads", "answer blob GETs served from S3 with a 307 to a presigned URL", func(c *node.Config) *bool { return &c.Replication.RedirectReads }),
	durationOpt("presign-ttl", "lifetime of presigned blob URLs", func(c *node.Config) *time.Duration { return &c.Replication.PresignTTL }),
	durationOpt("scrub-interval", "how often a node re-hashes its share of its region's blobs (0: only when meridian scrub asks)", func(c *node.Config) *time.Duration { return &c.Replication.ScrubInterval }),
	sizeOpt("scrub-rate", "bytes a second a background scrub pass reads", func(c *node.Config) *node.ByteSize { return &c.Replication.ScrubRate }),
	stringOpt("cluster-id", "cluster identity; members of other clusters are refused", func(c *node.Config) *string { return &c.ClusterID }),
	stringOpt("node-id", "stable node id (default: host name)", func(c *node.Config) *string { return &c.NodeID }),
	stringOpt("region", "region this node runs in", func(c *node.Config) *string { return &c.Region }),
	stringOpt("zone", "zone within the region", func(c *node.Config) *string { return &c.Zone }),
	stringOpt("http-addr", "OCI API, /metrics, /healthz and /readyz listen address", func(c *node.Config) *string { return &c.HTTPAddr }),
	stringOpt("grpc-addr", "gRPC listen address (nodes, gateways, meridian cluster)", func(c *node.Config) *string { return &c.GRPCAddr }),
	stringOpt("raft-addr", "Raft listen address", func(c *node.Config) *string { return &c.RaftAddr }),
	stringOpt("gossip-addr", "gossip listen address, UDP and TCP", func(c *node.Config) *string { return &c.GossipAddr }),
	stringOpt("advertise-http", "HTTP address clients are told about (default: http-addr)", func(c *node.Config) *string { return &c.AdvertiseHTTP }),
	stringOpt("advertise-grpc", "gRPC address other members dial (default: grpc-addr)", func(c *node.Config) *string { return &c.AdvertiseGRPC }),
	stringOpt("advertise-raft", "Raft address other nodes dial (default: raft-addr)", func(c *node.Config) *string { return &c.AdvertiseRaft }),
	stringOpt("advertise-gossip", "gossip address other members dial (default: gossip-addr)", func(c *node.Config) *string { return &c.AdvertiseGossip }),
	listOpt("join", "gossip address of a running member; repeat for more (env: comma-separated)", func(c *node.Config) *[]string { return &c.Join }),
	durationOpt("join-timeout", "how long a new node tries to reach --join before giving up", func(c *node.Config) *time.Duration { return &c.JoinTimeout }),
	intOpt("voters", "Raft voters the leader keeps; further servers are non-voters", func(c *node.Config) *int { return &c.Voters }),
	durationOpt("dead-voter-timeout", "a voter gone this long is replaced by a healthy non-voter", func(c *node.Config) *time.Duration { return &c.DeadVoterTimeout }),
	stringOpt("read-consistency", "local (replica reads, misses confirmed with the leader) or strong (linearizable)", func(c *node.Config) *string { return &c.ReadConsistency }),
	durationOpt("apply-timeout", "how long a write waits for a leader and commit before 503", func(c *node.Config) *time.Duration { return &c.ApplyTimeout }),
	durationOpt("raft-heartbeat-timeout", "Raft heartbeat timeout (0: 1s)", func(c *node.Config) *time.Duration { return &c.RaftHeartbeatTimeout }),
	durationOpt("raft-election-timeout", "Raft election timeout (0: 1s)", func(c *node.Config) *time.Duration { return &c.RaftElectionTimeout }),
	stringOpt("gossip-profile", "gossip timings: lan, wan or local", func(c *node.Config) *string { return &c.GossipProfile }),
	stringOpt("ready-file", "write JSON with the node's id and actual addresses here once serving", func(c *node.Config) *string { return &c.ReadyFile }),
	sizeOpt("max-manifest-size", "largest accepted manifest, bytes (suffixes KiB, MiB, GiB)", func(c *node.Config) *node.ByteSize { return &c.MaxManifestSize }),
	sizeOpt("max-blob-size", "largest accepted blob, bytes (suffixes KiB, MiB, GiB, TiB; 0: no limit)", func(c *node.Config) *node.ByteSize { return &c.MaxBlobSize }),
	durationOpt("upload-ttl", "how long an upload session stays usable", func(c *node.Config) *time.Duration { return &c.UploadTTL }),
	durationOpt("upload-key-rotation", "how often the leader adds a new upload-token key (0: never); old keys stay for upload-ttl", func(c *node.Config) *time.Duration { return &c.UploadKeyRotation }),
	uint64Opt("snapshot-threshold", "log entries between Raft snapshots", func(c *node.Config) *uint64 { return &c.SnapshotThreshold }),
	durationOpt("snapshot-interval", "how often Raft checks whether to snapshot", func(c *node.Config) *time.Duration { return &c.SnapshotInterval }),
	uint64Opt("trailing-logs", "log entries kept behind a snapshot for followers that lag a little", func(c *node.Config) *uint64 { return &c.TrailingLogs }),
	boolOpt("insecure-no-auth", "turn authentication off: anyone who reaches the registry may push, pull and delete", func(c *node.Config) *bool { return &c.Auth.InsecureNoAuth }),
	stringOpt("admin-password-file", "password of the first admin of a new cluster (default: generated into DATA_DIR/admin-password)", func(c *node.Config) *string { return &c.Auth.AdminPasswordFile }),
	durationOpt("token-ttl", "lifetime of registry tokens from /auth/token", func(c *node.Config) *time.Duration { return &c.Auth.TokenTTL }),
	durationOpt("refresh-ttl", "lifetime of refresh tokens (offline_token=true)", func(c *node.Config) *time.Duration { return &c.Auth.RefreshTTL }),
	durationOpt("token-key-rotation", "how often the leader adds a token signing key", func(c *node.Config) *time.Duration { return &c.Auth.TokenKeyRotation }),
	durationOpt("audit-retention", "audit records older than this are dropped (0: kept forever)", func(c *node.Config) *time.Duration { return &c.Auth.AuditRetention }),
	durationOpt("gc-interval", "how often the leader collects garbage (0: only when meridian gc run asks)", func(c *node.Config) *time.Duration { return &c.GC.Interval }),
	durationOpt("gc-grace", "how long a blob goes unreferenced before garbage collection takes it", func(c *node.Config) *time.Duration { return &c.GC.Grace }),
	durationOpt("gc-untagged", "collect manifests untagged and unreferenced this long (0: keep them)", func(c *node.Config) *time.Duration { return &c.GC.Untagged }),
	durationOpt("gc-pull-resolution", "how coarsely pulls are recorded for retention rules (0: not recorded)", func(c *node.Config) *time.Duration { return &c.GC.PullResolution }),
	intOpt("webhook-max-attempts", "times an event is sent to a webhook before it becomes a dead letter", func(c *node.Config) *int { return &c.Webhooks.MaxAttempts }),
	durationOpt("webhook-backoff", "wait after a webhook's first failed attempt; doubles per attempt", func(c *node.Config) *time.Duration { return &c.Webhooks.Backoff }),
	durationOpt("webhook-max-backoff", "longest wait between attempts of one webhook event", func(c *node.Config) *time.Duration { return &c.Webhooks.MaxBackoff }),
	intOpt("webhook-max-dead-letters", "dead letters kept per webhook, the oldest dropped first (0: no limit)", func(c *node.Config) *int { return &c.Webhooks.MaxDeadLetters }),
	durationOpt("webhook-timeout", "time limit of one webhook delivery attempt", func(c *node.Config) *time.Duration { return &c.Webhooks.Timeout }),
	stringOpt("log-level", "debug, info, warn or error", func(c *node.Config) *string { return &c.LogLevel }),
	stringOpt("log-format", "text or json", func(c *node.Config) *string { return &c.LogFormat }),
}

// trustOptions are the cluster trust settings, the same on nodes and
// gateways (docs/security.md).
var trustOptions = []option{
	stringOpt("tls-ca", "cluster CA certificate(s), PEM: peers must chain to one", func(c *node.Config) *string { return &c.TLSCA }),
	stringOpt("tls-cert", "this member's certificate (meridian ca issue), for mutual TLS on gRPC and Raft", func(c *node.Config) *string { return &c.TLSCert }),
	stringOpt("tls-key", "this member's private key", func(c *node.Config) *string { return &c.TLSKey }),
	stringOpt("tls-crl", "revocation list signed by the cluster CA (meridian ca revoke): listed certificates are refused; reloaded when it changes", func(c *node.Config) *string { return &c.TLSCRL }),
	stringOpt("http-tls-cert", "certificate for HTTPS on the OCI port (HTTP/2); reloaded when it changes", func(c *node.Config) *string { return &c.HTTPTLSCert }),
	stringOpt("http-tls-key", "key of --http-tls-cert", func(c *node.Config) *string { return &c.HTTPTLSKey }),
	stringOpt("gossip-key-file", "gossip keyring: one base64 key per line, the first the primary", func(c *node.Config) *string { return &c.GossipKeyFile }),
	boolOpt("insecure-cluster", "allow gRPC, Raft and gossip beyond loopback without TLS or a gossip key (anyone who reaches them is trusted)", func(c *node.Config) *bool { return &c.InsecureCluster }),
}

func envName(flagName string) string {
	return "MERIDIAN_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// loadConfig fills a node.Config from defaults, then the YAML file named by
// --config (or MERIDIAN_CONFIG), then MERIDIAN_* variables, then flags.
// extra adds flags of the command's own that are no node setting.
func loadConfig(name string, args []string, opts []option, defaults node.Config, extra ...func(*flag.FlagSet)) (node.Config, error) {
	fs := flag.NewFlagSet("meridian "+name, flag.ContinueOnError)
	configFile := fs.String("config", os.Getenv("MERIDIAN_CONFIG"), "YAML configuration file (env MERIDIAN_CONFIG)")
	for _, add := range extra {
		add(fs)
	}
	type setting struct {
		opt   option
		value string
	}
	var fromFlags []setting
	for _, o := range opts {
		o := o
		usage := fmt.Sprintf("%s (env %s, default %q)", o.usage, envName(o.name), o.get(&defaults))
		set := func(v string) error {
			fromFlags = append(fromFlags, setting{o, v})
			return o.set(&node.Config{}, v) // reject bad values while parsing
		}
		if o.boolean {
			fs.BoolFunc(o.name, usage, set) // --flag alone means true; --flag=false works too
		} else {
			fs.Func(o.name, usage, set)
		}
	}
	if err := fs.Parse(args); err != nil {
		return node.Config{}, err
	}
	if fs.NArg() > 0 {
		return node.Config{}, fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	cfg := defaults
	if *configFile != "" {
		if err := readYAML(*configFile, &cfg); err != nil {
			return node.Config{}, err
		}
	}
	for _, o := range opts {
		if v, ok := os.LookupEnv(envName(o.name)); ok {
			if err := o.set(&cfg, v); err != nil {
				return node.Config{}, fmt.Errorf("%s=%q: %w", envName(o.name), v, err)
			}
		}
	}
	// Repeated list flags add up: --join a --join b.
	lists := map[string][]string{}
	for _, s := range fromFlags {
		if s.opt.list {
			lists[s.opt.name] = append(lists[s.opt.name], s.value)
			continue
		}
		if err := s.opt.set(&cfg, s.value); err != nil {
			return node.Config{}, fmt.Errorf("--%s=%q: %w", s.opt.name, s.value, err)
		}
	}
	for _, o := range opts {
		if vs, ok := lists[o.name]; ok {
			if err := o.set(&cfg, strings.Join(vs, ",")); err != nil {
				return node.Config{}, fmt.Errorf("--%s: %w", o.name, err)
			}
		}
	}
	// Store credentials may stay out of files and flags.
	for i, r := range cfg.Regions {
		cfg.Regions[i].AccessKey, cfg.Regions[i].SecretKey = replication.CredentialsFromEnv(r.Name, os.LookupEnv)
	}
	return cfg, nil
}

// readYAML decodes a config file strictly: an unknown key is an error, not a
// silently ignored typo.
func readYAML(path string, cfg *node.Config) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("config file: %w", err)
	}
	defer f.Close()
	dec := yaml.NewDecoder(f)
	dec.KnownFields(true)
	if err := dec.Decode(cfg); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("config file %s: %w", path, err)
	}
	return nil
}
