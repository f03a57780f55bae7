package node

import (
	"errors"
	"fmt"
	"net"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/meridian-registry/meridian/gateway"
)

// Config configures one node. Every field has a YAML key (its tag), a flag
// and a MERIDIAN_ environment variable; DefaultConfig runs with no file.
type Config struct {
	// DataDir holds the node's Raft log, state store, snapshots and, for the
	// embedded filesystem store, its blobs.
	DataDir string `yaml:"data_dir"`
	// NodeID is the node's stable identity; it defaults to the host name.
	NodeID string `yaml:"node_id"`
	// Region is where the node runs; its blobs land in this region's store.
	Region string `yaml:"region"`
	// HTTPAddr serves the OCI API, /metrics, /healthz and /readyz.
	HTTPAddr string `yaml:"http_addr"`
	// RaftAddr carries Raft traffic; AdvertiseRaft is what peers dial.
	RaftAddr      string `yaml:"raft_addr"`
	AdvertiseRaft string `yaml:"advertise_raft"`
	// ReadyFile, when set, receives JSON with the node's id and actual
	// addresses once it serves (so scripts can use :0 ports).
	ReadyFile string `yaml:"ready_file"`

	// MaxManifestSize and MaxBlobSize bound uploads in bytes (0: no blob limit).
	MaxManifestSize int64 `yaml:"max_manifest_size"`
	MaxBlobSize     int64 `yaml:"max_blob_size"`
	// UploadTTL is how long an upload session stays usable; abandoned
	// uploads are removed after it.
	UploadTTL time.Duration `yaml:"upload_ttl"`

	// SnapshotThreshold is how many log entries trigger a snapshot and log
	// compaction.
	SnapshotThreshold uint64 `yaml:"snapshot_threshold"`

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
		NodeID:            host,
		Region:            "local",
		HTTPAddr:          ":5000",
		RaftAddr:          "127.0.0.1:5002",
		MaxManifestSize:   g.MaxManifestSize,
		MaxBlobSize:       g.MaxBlobSize,
		UploadTTL:         g.UploadTTL,
		SnapshotThreshold: 8192,
		LogLevel:          "info",
		LogFormat:         "text",
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
	for name, addr := range map[string]string{"http_addr": c.HTTPAddr, "raft_addr": c.RaftAddr} {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			errs = append(errs, fmt.Errorf("%s %q: want host:port", name, addr))
		}
	}
	if c.AdvertiseRaft != "" {
		if host, _, err := net.SplitHostPort(c.AdvertiseRaft); err != nil || host == "" {
			errs = append(errs, fmt.Errorf("advertise_raft %q: want a dialable host:port", c.AdvertiseRaft))
		}
	}
	if c.MaxManifestSize <= 0 {
		errs = append(errs, errors.New("max_manifest_size must be positive"))
	}
	if c.MaxBlobSize < 0 {
		errs = append(errs, errors.New("max_blob_size cannot be negative"))
	}
	if c.UploadTTL <= 0 {
		errs = append(errs, errors.New("upload_ttl must be positive"))
	}
	if c.SnapshotThreshold == 0 {
		errs = append(errs, errors.New("snapshot_threshold must be positive"))
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
