package replication

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"google.golang.org/grpc"
)

// OpenRegionsConfig says which region stores a process reaches and how.
type OpenRegionsConfig struct {
	// Local is the process's own region.
	Local string
	// Stores lists every region's store, Region being its name.
	Stores []StoreConfig
	// OwnDirectory says the process sees its own region's file:// directory
	// (a node): it creates the directory (0700) and opens it. Without it
	// every file:// store, its own region's included, is reached through
	// that region's nodes (a standalone gateway, which runs apart from
	// them). This is the one place node and gateway differ.
	OwnDirectory bool
	// Remote returns, for a region, how to reach one of its nodes (see
	// NewRemote).
	Remote func(region string) func(ctx context.Context) (grpc.ClientConnInterface, error)
	// Logger receives a warning for each store unreachable at start;
	// nil means slog.Default().
	Logger *slog.Logger
}

// OpenRegions opens every region's store for a process: a file:// directory
// it does not see through a Remote of that region's nodes, anything else
// (its own directory, S3 buckets) directly with OpenStore. An S3 store that
// does not answer at start is added anyway with a warning, since one
// region's outage must not stop processes elsewhere from starting; any other
// error fails the whole set.
func OpenRegions(ctx context.Context, cfg OpenRegionsConfig) (*Regions, error) {
	logger := cfg.Logger
	if logger == nil {
		logger = slog.Default()
	}
	regions := NewRegions(cfg.Local)
	for _, sc := range cfg.Stores {
		dir, isDir := strings.CutPrefix(sc.URL, "file://")
		if isDir && !(cfg.OwnDirectory && sc.Region == cfg.Local) {
			regions.Add(sc.Region, NewRemote(sc.Region, cfg.Remote(sc.Region)))
			continue
		}
		if isDir {
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return nil, fmt.Errorf("region %s store: %w", sc.Region, err)
			}
		}
		d, err := OpenStore(ctx, sc)
		if errors.Is(err, ErrStoreUnreachable) && d != nil {
			logger.Warn("region store unreachable at start; starting anyway", "region", sc.Region, "err", err)
		} else if err != nil {
			return nil, fmt.Errorf("region %s store: %w", sc.Region, err)
		}
		regions.Add(sc.Region, d)
	}
	return regions, nil
}
