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
)

// option is one setting: its flag name (the YAML key is the same in
// snake_case, the env var MERIDIAN_ plus upper snake_case), help text, and
// how to parse it into the config.
type option struct {
	name  string
	usage string
	set   func(c *node.Config, v string) error
	get   func(c *node.Config) string
}

func stringOpt(name, usage string, field func(*node.Config) *string) option {
	return option{name, usage,
		func(c *node.Config, v string) error { *field(c) = v; return nil },
		func(c *node.Config) string { return *field(c) }}
}

func int64Opt(name, usage string, field func(*node.Config) *int64) option {
	return option{name, usage,
		func(c *node.Config, v string) error {
			n, err := parseSize(v)
			*field(c) = n
			return err
		},
		func(c *node.Config) string { return strconv.FormatInt(*field(c), 10) }}
}

func uint64Opt(name, usage string, field func(*node.Config) *uint64) option {
	return option{name, usage,
		func(c *node.Config, v string) (err error) { *field(c), err = strconv.ParseUint(v, 10, 64); return err },
		func(c *node.Config) string { return strconv.FormatUint(*field(c), 10) }}
}

func durationOpt(name, usage string, field func(*node.Config) *time.Duration) option {
	return option{name, usage,
		func(c *node.Config, v string) (err error) { *field(c), err = time.ParseDuration(v); return err },
		func(c *node.Config) string { return field(c).String() }}
}

// serveOptions are the settings of `meridian serve`.
var serveOptions = []option{
	stringOpt("data-dir", "directory for the node's state and blobs", func(c *node.Config) *string { return &c.DataDir }),
	stringOpt("node-id", "stable node id (default: host name)", func(c *node.Config) *string { return &c.NodeID }),
	stringOpt("region", "region this node runs in", func(c *node.Config) *string { return &c.Region }),
	stringOpt("http-addr", "OCI API, /metrics, /healthz and /readyz listen address", func(c *node.Config) *string { return &c.HTTPAddr }),
	stringOpt("raft-addr", "Raft listen address", func(c *node.Config) *string { return &c.RaftAddr }),
	stringOpt("advertise-raft", "Raft address other nodes dial (default: raft-addr)", func(c *node.Config) *string { return &c.AdvertiseRaft }),
	stringOpt("ready-file", "write JSON with the node's id and actual addresses here once serving", func(c *node.Config) *string { return &c.ReadyFile }),
	int64Opt("max-manifest-size", "largest accepted manifest, bytes (suffixes KiB, MiB, GiB)", func(c *node.Config) *int64 { return &c.MaxManifestSize }),
	int64Opt("max-blob-size", "largest accepted blob, bytes (suffixes KiB, MiB, GiB, TiB; 0: no limit)", func(c *node.Config) *int64 { return &c.MaxBlobSize }),
	durationOpt("upload-ttl", "how long an upload session stays usable", func(c *node.Config) *time.Duration { return &c.UploadTTL }),
	uint64Opt("snapshot-threshold", "log entries between Raft snapshots", func(c *node.Config) *uint64 { return &c.SnapshotThreshold }),
	stringOpt("log-level", "debug, info, warn or error", func(c *node.Config) *string { return &c.LogLevel }),
	stringOpt("log-format", "text or json", func(c *node.Config) *string { return &c.LogFormat }),
}

func envName(flagName string) string {
	return "MERIDIAN_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// loadConfig fills a node.Config from defaults, then the YAML file named by
// --config (or MERIDIAN_CONFIG), then MERIDIAN_* variables, then flags.
func loadConfig(name string, args []string, opts []option, defaults node.Config) (node.Config, error) {
	fs := flag.NewFlagSet("meridian "+name, flag.ContinueOnError)
	configFile := fs.String("config", os.Getenv("MERIDIAN_CONFIG"), "YAML configuration file (env MERIDIAN_CONFIG)")
	type setting struct {
		opt   option
		value string
	}
	var fromFlags []setting
	for _, o := range opts {
		o := o
		fs.Func(o.name, fmt.Sprintf("%s (env %s, default %q)", o.usage, envName(o.name), o.get(&defaults)), func(v string) error {
			fromFlags = append(fromFlags, setting{o, v})
			return o.set(&node.Config{}, v) // reject bad values while parsing
		})
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
	for _, s := range fromFlags {
		if err := s.opt.set(&cfg, s.value); err != nil {
			return node.Config{}, fmt.Errorf("--%s=%q: %w", s.opt.name, s.value, err)
		}
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

// parseSize reads a byte count with an optional binary suffix.
func parseSize(s string) (int64, error) {
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40}} {
		if v, ok := strings.CutSuffix(s, u.suffix); ok {
			s, mult = v, u.mult
			break
		}
	}
	n, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("not a byte count: %q", s)
	}
	return n * mult, nil
}
