package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/meridian-registry/meridian/node"
	"github.com/meridian-registry/meridian/replication"
)

const storeUsage = `Usage:
  meridian store init [--config FILE] [--region-store NAME=URL]… [--timeout 2m]

init creates the bucket of every s3:// region store that does not have one
yet, with the credentials the nodes use (the URL's, or
MERIDIAN_REGION_<NAME>_ACCESS_KEY and _SECRET_KEY). It reads the regions
the way meridian serve does: the config file (--config or MERIDIAN_CONFIG),
MERIDIAN_REGION_STORE, --region-store. Stores that do not answer yet are
asked again until --timeout (env MERIDIAN_TIMEOUT), so it can run next to S3 servers that are
still starting. Nodes never create buckets themselves: a missing bucket
at a node's start is usually a typo.
`

func storeCmd(args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, storeUsage)
		return errors.New("store: missing subcommand")
	}
	switch args[0] {
	case "init":
		return storeInit(args[1:])
	case "help", "-h", "--help":
		fmt.Print(storeUsage)
		return nil
	default:
		fmt.Fprint(os.Stderr, storeUsage)
		return fmt.Errorf("store: unknown subcommand %q", args[0])
	}
}

func storeInit(args []string) error {
	// --timeout is this command's own setting, parsed with the node's.
	timeout := 2 * time.Minute
	timeoutOpt := option{name: "timeout", usage: "how long to keep asking stores that do not answer",
		set: func(_ *node.Config, v string) error {
			d, err := time.ParseDuration(v)
			if err != nil || d <= 0 {
				return fmt.Errorf("want a positive duration such as 2m")
			}
			timeout = d
			return nil
		},
		get: func(*node.Config) string { return timeout.String() }}
	cfg, err := loadConfig("store init", args, []option{regionStoresOpt, timeoutOpt}, node.DefaultConfig())
	if errors.Is(err, flag.ErrHelp) {
		fmt.Print(storeUsage)
		return err
	}
	if err != nil {
		return fmt.Errorf("store init: %w", err)
	}
	if len(cfg.Regions) == 0 {
		return errors.New("store init: no regions: give --config or --region-store NAME=URL")
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	for _, r := range cfg.Regions {
		sc := replication.StoreConfig{Region: r.Name, URL: r.Store, AccessKey: r.AccessKey, SecretKey: r.SecretKey}
		created, err := ensureBucketRetrying(ctx, sc)
		if err != nil {
			return fmt.Errorf("store init: %w", err)
		}
		switch u := replication.RedactStoreURL(r.Store); {
		case created:
			fmt.Printf("region %s: created the bucket of %s\n", r.Name, u)
		default:
			fmt.Printf("region %s: %s is ready\n", r.Name, u)
		}
	}
	return nil
}

// ensureBucketRetrying asks until the store answers or ctx ends: S3 servers
// started at the same time as this command take a moment to listen.
func ensureBucketRetrying(ctx context.Context, sc replication.StoreConfig) (bool, error) {
	for {
		created, err := replication.EnsureBucket(ctx, sc)
		if err == nil {
			return created, nil
		}
		select {
		case <-ctx.Done():
			return false, fmt.Errorf("%w (gave up: %v)", err, context.Cause(ctx))
		case <-time.After(time.Second):
		}
	}
}
