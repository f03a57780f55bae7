package node

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"

	"github.com/meridian-registry/meridian/node/membership"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
	"github.com/meridian-registry/meridian/replication"
)

// RegionConfig names a region and its blob store.
type RegionConfig struct {
	Name string `yaml:"name"`
	// Store is s3://ACCESS:SECRET@HOST:PORT/BUCKET[/prefix]?secure=false&…
	// or file:///path (a directory every node of the region sees).
	Store string `yaml:"store"`
	// AccessKey and SecretKey override the URL's credentials; they come
	// from MERIDIAN_REGION_<NAME>_ACCESS_KEY and _SECRET_KEY.
	AccessKey string `yaml:"-"`
	SecretKey string `yaml:"-"`
}

// ReplicationConfig tunes geo-replication.
type ReplicationConfig struct {
	// Policies seed the cluster's replication policies when a new cluster
	// bootstraps; afterwards `meridian policy` changes them.
	Policies []PolicyConfig `yaml:"policies"`
	// Workers is how many blobs a node copies at once.
	Workers int `yaml:"workers"`
	// SyncTimeout bounds how long a blob PUT waits for min_regions copies.
	SyncTimeout time.Duration `yaml:"sync_timeout"`
	// RedirectReads answers blob GETs served from S3 with a 307 to a
	// presigned URL valid for PresignTTL.
	RedirectReads bool          `yaml:"redirect_reads"`
	PresignTTL    time.Duration `yaml:"presign_ttl"`
	// ScrubInterval is how often a node re-hashes its share of its
	// region's blobs (0: never in the background; `meridian scrub` still
	// works); the first pass starts one ScrubDelay after the node starts.
	// ScrubRate bounds the bytes a second a background pass reads.
	ScrubInterval time.Duration `yaml:"scrub_interval"`
	ScrubRate     ByteSize      `yaml:"scrub_rate"`
}

// scrubDelay is how long after start a node's first background scrub pass
// waits: a node that just started has catching up to do first.
const scrubDelay = 10 * time.Minute

// PolicyConfig is one seeded policy; see meridianpb.Policy.
type PolicyConfig struct {
	Prefix     string   `yaml:"prefix"`
	Regions    []string `yaml:"regions"`
	MinRegions int      `yaml:"min_regions"`
}

// regionList returns the configured regions, or the single implicit one.
func (c Config) regionList() []RegionConfig {
	if len(c.Regions) > 0 {
		return c.Regions
	}
	dir := c.BlobDir
	if dir == "" {
		dir = filepath.Join(c.DataDir, "blobs")
	}
	if abs, err := filepath.Abs(dir); err == nil {
		dir = abs
	}
	return []RegionConfig{{Name: c.Region, Store: "file://" + dir}}
}

// RegionStores is every region with its store, as a node of this
// configuration reaches them (`meridian restore` checks them).
func (c Config) RegionStores() []RegionConfig { return c.regionList() }

func (c Config) regionNames() []string {
	var names []string
	for _, r := range c.regionList() {
		names = append(names, r.Name)
	}
	slices.Sort(names)
	return names
}

// topologyFingerprint identifies the region list (names and stores without
// credentials) so members with different lists refuse each other at join.
func (c Config) topologyFingerprint() string {
	regions := map[string]string{}
	for _, r := range c.Regions {
		regions[r.Name] = r.Store
	}
	return replication.TopologyFingerprint(regions)
}

func (c Config) validateRegions() []error {
	var errs []error
	if len(c.Regions) > 0 {
		seen := map[string]bool{}
		for i, r := range c.Regions {
			if !idRE.MatchString(r.Name) {
				errs = append(errs, fmt.Errorf("regions[%d].name %q: use 1-63 letters, digits, '.', '_' or '-'", i, r.Name))
			}
			if seen[r.Name] {
				errs = append(errs, fmt.Errorf("regions[%d]: region %q is listed twice", i, r.Name))
			}
			seen[r.Name] = true
			if _, err := replication.ParseStoreURL(r.Store); err != nil {
				errs = append(errs, fmt.Errorf("regions[%d] (%s).store: %w", i, r.Name, err))
			}
		}
		if !seen[c.Region] {
			errs = append(errs, fmt.Errorf("region %q is not among the configured regions %v", c.Region, c.regionNames()))
		}
		if c.BlobDir != "" {
			errs = append(errs, errors.New("blob_dir applies only without regions; give the region's store a file:// URL instead"))
		}
	}
	names := c.regionNames()
	for i, p := range c.Replication.Policies {
		for _, r := range p.Regions {
			if !slices.Contains(names, r) {
				errs = append(errs, fmt.Errorf("replication.policies[%d] (prefix %q): unknown region %q (regions: %v)", i, p.Prefix, r, names))
			}
		}
		if p.MinRegions < 0 {
			errs = append(errs, fmt.Errorf("replication.policies[%d] (prefix %q): min_regions cannot be negative", i, p.Prefix))
		}
	}
	if c.Replication.Workers < 1 {
		errs = append(errs, errors.New("replication.workers must be at least 1"))
	}
	if c.Replication.SyncTimeout <= 0 || c.Replication.PresignTTL <= 0 {
		errs = append(errs, errors.New("replication.sync_timeout and replication.presign_ttl must be positive"))
	}
	return errs
}

// openStores reaches every region's store: this region's directly, other
// regions' S3 buckets directly, and other regions' directories through a
// node of that region (replication.Remote over gRPC).
func (n *Node) openStores(ctx context.Context) error {
	var stores []replication.StoreConfig
	for _, rc := range n.cfg.regionList() {
		stores = append(stores, replication.StoreConfig{Region: rc.Name, URL: rc.Store, AccessKey: rc.AccessKey, SecretKey: rc.SecretKey})
	}
	regions, err := replication.OpenRegions(ctx, replication.OpenRegionsConfig{
		Local: n.cfg.Region, Stores: stores, OwnDirectory: true, Remote: n.regionConn, Logger: n.logger,
	})
	if err != nil {
		return err
	}
	n.regions = regions
	n.localStore, _ = n.regions.Driver(n.cfg.Region)
	return nil
}

// regionConn picks a live node of region to reach its store through,
// preferring the one that answered last.
func (n *Node) regionConn(region string) func(ctx context.Context) (grpc.ClientConnInterface, error) {
	return func(ctx context.Context) (grpc.ClientConnInterface, error) {
		var addrs []string
		for _, m := range n.membership.Members() {
			if m.Region == region && m.Role == membership.RoleServer && m.State == membership.StateAlive && m.GRPCAddr != "" {
				addrs = append(addrs, m.GRPCAddr)
			}
		}
		if len(addrs) == 0 {
			return nil, fmt.Errorf("no live node of region %s", region)
		}
		// Spread load, stable per caller: rendezvous on our own id.
		addr := replication.Owner(n.cfg.NodeID, addrs)
		return n.peers.conn(addr)
	}
}

// regionNodes lists the ids of live servers of this node's region, itself
// included: the nodes that share its replication work.
func (n *Node) regionNodes() []string {
	ids := []string{n.cfg.NodeID}
	for _, m := range n.membership.Members() {
		if m.Region == n.cfg.Region && m.Role == membership.RoleServer && m.State == membership.StateAlive && m.ID != n.cfg.NodeID {
			ids = append(ids, m.ID)
		}
	}
	return ids
}

// placementSource adapts the node to the replicator.
type placementSource struct{ n *Node }

func (p placementSource) Wanted(ctx context.Context, region, after string, limit int) ([]*pb.Wanted, error) {
	return p.n.consensus.Store().Wanted(ctx, region, after, limit)
}

func (p placementSource) Blob(ctx context.Context, digest string) (*pb.BlobRecord, error) {
	return p.n.consensus.Store().Blob(ctx, digest)
}

func (p placementSource) Changed() <-chan struct{} { return p.n.consensus.Changed() }

func (p placementSource) Place(ctx context.Context, digest string, size int64, region string) error {
	ctx, cancel := context.WithTimeout(ctx, p.n.cfg.ApplyTimeout)
	defer cancel()
	return p.n.commit(ctx, &pb.Command{Intent: &pb.Command_PlaceBlob{PlaceBlob: &pb.PlaceBlob{
		Digest: digest, Size: size, Region: region}}})
}

func (p placementSource) Removals(ctx context.Context, region, after string, limit int) ([]*pb.Wanted, error) {
	return p.n.consensus.Store().Removals(ctx, region, after, limit)
}

func (p placementSource) Removed(ctx context.Context, digest, region string) error {
	ctx, cancel := context.WithTimeout(ctx, p.n.cfg.ApplyTimeout)
	defer cancel()
	return p.n.commit(ctx, &pb.Command{Intent: &pb.Command_BlobRemoved{BlobRemoved: &pb.BlobRemoved{
		Digest: digest, Region: region}}})
}

func (p placementSource) Owns(digest string) bool {
	return replication.Owner(digest, p.n.regionNodes()) == p.n.cfg.NodeID
}

// runReplicator copies blobs into this node's region until the node stops.
func (n *Node) runReplicator() {
	defer n.wg.Done()
	ctx, cancel := context.WithCancel(context.Background())
	go func() { <-n.stop; cancel() }()
	n.replicator.Run(ctx)
}

// maintainTopology makes the leader record the configured regions in the
// state machine and, on a new cluster, seed the configured policies; it
// also rotates the upload-token key when it is due (the leader's other
// once-a-second duty).
func (n *Node) maintainTopology() {
	defer n.wg.Done()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	want := n.cfg.regionNames()
	for {
		select {
		case <-n.stop:
			return
		case <-t.C:
		}
		if !n.consensus.IsLeader() {
			continue
		}
		store := n.consensus.Store()
		ctx, cancel := context.WithTimeout(context.Background(), n.cfg.ApplyTimeout)
		have, err := store.Regions(ctx)
		if err == nil && !slices.Equal(have, want) {
			fresh := len(have) == 0
			err = n.commit(ctx, &pb.Command{Intent: &pb.Command_SetRegions{SetRegions: &pb.SetRegions{Regions: want}}})
			if err == nil {
				n.logger.Info("recorded the cluster's regions", "regions", want, "before", have)
			}
			if err == nil && fresh {
				err = n.seedPolicies(ctx)
			}
		}
		if err == nil {
			err = n.consensus.RotateUploadKey(ctx, n.cfg.UploadKeyRotation, n.cfg.UploadTTL)
		}
		if err == nil {
			err = n.accessHousekeeping(ctx)
		}
		cancel()
		if err != nil {
			n.logger.Warn("record regions or rotate the upload key", "err", err)
		}
	}
}

// seedPolicies installs the configured policies on a cluster that has none.
func (n *Node) seedPolicies(ctx context.Context) error {
	existing, err := n.consensus.Store().Policies(ctx)
	if err != nil || len(existing) > 0 {
		return err
	}
	for _, p := range n.cfg.Replication.Policies {
		err := n.commit(ctx, &pb.Command{Intent: &pb.Command_SetPolicy{SetPolicy: &pb.SetPolicy{Policy: &pb.Policy{
			Prefix: p.Prefix, Regions: p.Regions, MinRegions: int32(p.MinRegions)}}}})
		if err != nil {
			return fmt.Errorf("seed policy %q: %w", p.Prefix, err)
		}
	}
	if len(n.cfg.Replication.Policies) > 0 {
		n.logger.Info("seeded replication policies", "count", len(n.cfg.Replication.Policies))
	}
	return nil
}

// Policy resolves a repository's replication policy from the local replica.
func (m clusterMetadata) Policy(ctx context.Context, repo string) (pb.EffectivePolicy, error) {
	return m.store.Policy(ctx, repo)
}

// WaitPlaced waits until regions regions hold the blob.
func (m clusterMetadata) WaitPlaced(ctx context.Context, digest string, regions int) (*pb.BlobRecord, error) {
	for {
		changed := m.n.consensus.Changed()
		rec, err := m.store.Blob(ctx, digest)
		if err != nil && !errors.Is(err, pb.ErrBlobUnknown) {
			return nil, err
		}
		if err == nil && len(rec.Regions) >= regions {
			return rec, nil
		}
		select {
		case <-ctx.Done():
			return rec, ctx.Err()
		case <-changed:
		}
	}
}

// lagCollector reports every region's replication backlog from this node's
// replica on each scrape.
type lagCollector struct {
	n                    *Node
	blobs, bytes, oldest *prometheus.Desc
}

func (n *Node) registerLagMetrics() error {
	c := &lagCollector{
		n: n,
		blobs: prometheus.NewDesc("meridian_replication_missing_blobs",
			"Blobs a region's policy wants there that its store does not hold yet.", []string{"region"}, nil),
		bytes: prometheus.NewDesc("meridian_replication_missing_bytes",
			"Bytes of the blobs a region is missing.", []string{"region"}, nil),
		oldest: prometheus.NewDesc("meridian_replication_oldest_missing_seconds",
			"Age of the longest-missing blob of a region (0 when none is missing).", []string{"region"}, nil),
	}
	return n.registry.Register(c)
}

func (c *lagCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.blobs
	ch <- c.bytes
	ch <- c.oldest
}

func (c *lagCollector) Collect(ch chan<- prometheus.Metric) {
	for _, region := range c.n.cfg.regionNames() {
		lag, err := c.n.consensus.Store().RegionLag(context.Background(), region)
		if err != nil {
			continue
		}
		ch <- prometheus.MustNewConstMetric(c.blobs, prometheus.GaugeValue, float64(lag.Blobs), region)
		ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.GaugeValue, float64(lag.Bytes), region)
		age := 0.0
		if lag.OldestUnixNano > 0 {
			age = max(0, secondsSince(lag.OldestUnixNano))
		}
		ch <- prometheus.MustNewConstMetric(c.oldest, prometheus.GaugeValue, age, region)
	}
}
