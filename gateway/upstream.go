package gateway

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"

	"github.com/meridian-registry/meridian/node/membership"
	"github.com/meridian-registry/meridian/node/transport"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
	"github.com/meridian-registry/meridian/replication"
)

// UpstreamConfig configures an Upstream. Zero durations take defaults.
type UpstreamConfig struct {
	// ID is this gateway's member id, sent with pings so nodes know who
	// measures them (optional).
	ID string
	// Region and Zone of this gateway: a node in the same zone, then the
	// same region, wins ties between nodes whose measured distances are
	// within tieFraction / tieFloor of each other; otherwise measured
	// distance wins.
	Region, Zone string
	// Members returns the current gossip view (the gateway's
	// membership.Members()). Required.
	Members func() []membership.Member
	// Dial returns a pooled connection to a node's gRPC address. Nil uses
	// a pool of the Upstream's own, closed by Close.
	Dial func(addr string) (grpc.ClientConnInterface, error)
	// NetDial, when set, opens the TCP connections of the Upstream's own
	// pool (tests put proxies in between); ignored when Dial is set.
	NetDial func(ctx context.Context, addr string) (net.Conn, error)
	// Trust is the gateway's member identity for its own pool (mutual TLS
	// to the nodes); nil is plaintext. Ignored when Dial is set.
	Trust *transport.Trust
	// PingInterval is how often every live server node is pinged; default 1s.
	PingInterval time.Duration
	// ReadConsistency is "local" (default) or "strong"; see pb.Consistency.
	ReadConsistency string
	// CallTimeout bounds one attempt of a read on one node (default 5s);
	// writes and WaitPlaced are bounded by the request's context only.
	CallTimeout time.Duration
	Logger      *slog.Logger
	// Registerer receives the upstream metrics; nil means none.
	Registerer prometheus.Registerer
}

const (
	defaultPingInterval = time.Second
	defaultCallTimeout  = 5 * time.Second

	// Two nodes are equally near when their distances differ by at most a
	// fifth of the nearer one's, or by tieFloor: pings jitter, and below a
	// millisecond locality says more about cost than the measurement does.
	tieFraction = 5
	tieFloor    = time.Millisecond
)

// Upstream is a standalone gateway's view of the cluster: which server
// nodes are alive (gossip), how far each is (pings over the gRPC
// connections that carry requests, fed to Vivaldi coordinates), and a
// Metadata that sends every call to the nearest healthy node, failing over
// to the next one when a node stops answering. It keeps no state beyond
// what gossip and pings say, and is safe for concurrent use.
type Upstream struct {
	cfg     UpstreamConfig
	strong  bool
	dial    func(addr string) (grpc.ClientConnInterface, error)
	pool    *transport.Pool // nil when cfg.Dial is set
	rtt     *membership.RTT
	logger  *slog.Logger
	metrics *upstreamMetrics
	// manifests shares concurrent reads of one manifest or tag.
	manifests *coalescer[*pb.ManifestRecord]

	// applied is the newest applied index a ping answer carried
	// (Metadata.WriteFence).
	applied atomic.Uint64
	// written is the highest log index of a write a node acknowledged to
	// this gateway. Reads carry it as min_index, so whichever node answers
	// has applied the gateway's own writes first.
	written atomic.Uint64

	mu        sync.Mutex
	pinging   map[string]bool // node ids with a ping in flight
	published map[string]bool // node ids with metric series
	seen      map[string]bool // node ids RTT holds data about
}

// UpstreamNode is a live server node as the gateway sees it.
type UpstreamNode struct {
	ID, Region, Zone string
	// Addr is the node's gRPC address.
	Addr string
	// RTT is the estimated round-trip time, meaningful when Known.
	RTT   time.Duration
	Known bool
	// Healthy is false from a failed ping or call until the next
	// successful ping.
	Healthy bool
}

// NewUpstream returns an Upstream; Run must run for distances to be known.
func NewUpstream(cfg UpstreamConfig) (*Upstream, error) {
	if cfg.Members == nil {
		return nil, errors.New("gateway: upstream needs a Members function")
	}
	if cfg.PingInterval < 0 || cfg.CallTimeout < 0 {
		return nil, errors.New("gateway: upstream intervals cannot be negative")
	}
	switch cfg.ReadConsistency {
	case "", "local", "strong":
	default:
		return nil, fmt.Errorf("gateway: read consistency %q is neither local nor strong", cfg.ReadConsistency)
	}
	if cfg.PingInterval == 0 {
		cfg.PingInterval = defaultPingInterval
	}
	if cfg.CallTimeout == 0 {
		cfg.CallTimeout = defaultCallTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	m, err := newUpstreamMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	u := &Upstream{
		cfg: cfg, strong: cfg.ReadConsistency == "strong", dial: cfg.Dial,
		rtt: membership.NewRTT(), logger: cfg.Logger.With("component", "upstream"), metrics: m,
		pinging: map[string]bool{}, published: map[string]bool{}, seen: map[string]bool{},
	}
	u.manifests = newCoalescer[*pb.ManifestRecord](m.sharedReads.Inc)
	if u.dial == nil {
		u.pool = cfg.Trust.NewPool(cfg.NetDial, replication.RemoteDialOptions()...)
		u.dial = func(addr string) (grpc.ClientConnInterface, error) { return u.pool.Conn(addr) }
	}
	return u, nil
}

// Close closes the connections of the Upstream's own pool (none when
// cfg.Dial was given). Calls after Close fail.
func (u *Upstream) Close() error {
	if u.pool == nil {
		return nil
	}
	return u.pool.Close()
}

// Nodes lists every live server node, nearest first: healthy before
// failing, measured before unknown, then by distance, with locality (same
// zone, then same region) breaking near ties. Metadata calls go down this
// list.
func (u *Upstream) Nodes() []UpstreamNode {
	var nodes []UpstreamNode
	for _, m := range u.cfg.Members() {
		if m.Role != membership.RoleServer || m.State != membership.StateAlive || m.GRPCAddr == "" {
			continue
		}
		rtt, known := u.rtt.Estimate(m.ID)
		nodes = append(nodes, UpstreamNode{ID: m.ID, Region: m.Region, Zone: m.Zone, Addr: m.GRPCAddr,
			RTT: rtt, Known: known, Healthy: u.rtt.Healthy(m.ID)})
	}
	return u.rank(nodes)
}

// rank sorts nodes by tier and distance, then reorders each run of nodes
// tied with the run's nearest by locality. Ties are measured from the
// run's first node, so a chain of small differences cannot make a far node
// tie with a near one.
func (u *Upstream) rank(nodes []UpstreamNode) []UpstreamNode {
	slices.SortFunc(nodes, func(a, b UpstreamNode) int {
		return cmp.Or(cmp.Compare(tier(a), tier(b)), cmp.Compare(a.RTT, b.RTT), strings.Compare(a.ID, b.ID))
	})
	for i := 0; i < len(nodes); {
		j := i + 1
		for j < len(nodes) && tier(nodes[j]) == tier(nodes[i]) && tied(nodes[i], nodes[j]) {
			j++
		}
		slices.SortStableFunc(nodes[i:j], func(a, b UpstreamNode) int {
			return cmp.Compare(u.locality(a), u.locality(b))
		})
		i = j
	}
	return nodes
}

// tier: healthy and measured first, failing last.
func tier(n UpstreamNode) int {
	t := 0
	if !n.Healthy {
		t += 2
	}
	if !n.Known {
		t++
	}
	return t
}

// tied reports whether far is as near as near (which is not farther).
func tied(near, far UpstreamNode) bool {
	return !near.Known || far.RTT-near.RTT <= max(tieFloor, near.RTT/tieFraction)
}

// locality: 0 same zone, 1 same region, 2 elsewhere.
func (u *Upstream) locality(n UpstreamNode) int {
	switch {
	case u.cfg.Region == "" || n.Region != u.cfg.Region:
		return 2
	case u.cfg.Zone != "" && n.Zone == u.cfg.Zone:
		return 0
	}
	return 1
}

// RegionConn returns a connection function for replication.NewRemote: each
// call reaches the nearest healthy node of region (the nearest live one
// when none is healthy).
func (u *Upstream) RegionConn(region string) func(ctx context.Context) (grpc.ClientConnInterface, error) {
	return func(context.Context) (grpc.ClientConnInterface, error) {
		var fallback *UpstreamNode
		for _, n := range u.Nodes() {
			if n.Region != region {
				continue
			}
			if n.Healthy {
				return u.dial(n.Addr)
			}
			if fallback == nil {
				fallback = &n
			}
		}
		if fallback != nil {
			return u.dial(fallback.Addr)
		}
		return nil, fmt.Errorf("%w: no live node of region %s", pb.ErrUnavailable, region)
	}
}

// RegionDistance returns the estimated round-trip time to the nearest
// healthy node of region; false when none is healthy and measured.
func (u *Upstream) RegionDistance(region string) (time.Duration, bool) {
	best, ok := time.Duration(0), false
	for _, n := range u.Nodes() {
		if n.Region == region && n.Healthy && n.Known && (!ok || n.RTT < best) {
			best, ok = n.RTT, true
		}
	}
	return best, ok
}

// Run pings every live server node each PingInterval, over the connection
// that carries its requests, until ctx ends. A node that fails a ping (or a
// call) leaves the rotation until a ping succeeds again.
func (u *Upstream) Run(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	t := time.NewTicker(u.cfg.PingInterval)
	defer t.Stop()
	for {
		nodes := u.Nodes()
		u.publish(nodes)
		u.forgetGone()
		for _, n := range nodes {
			// One ping per node at a time: a node that hangs costs one
			// goroutine, and delays nobody else's measurement.
			if u.startPing(n.ID) {
				wg.Go(func() {
					defer u.endPing(n.ID)
					u.ping(ctx, n)
				})
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (u *Upstream) startPing(id string) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.pinging[id] {
		return false
	}
	u.pinging[id], u.seen[id] = true, true
	return true
}

func (u *Upstream) endPing(id string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	delete(u.pinging, id)
}

// pingTimeout bounds one ping: long enough for a far region, short enough
// that a hung node is noticed within a couple of intervals.
func (u *Upstream) pingTimeout() time.Duration {
	return min(u.cfg.CallTimeout, max(2*u.cfg.PingInterval, time.Second))
}

// ping measures one node. A node not measured yet, or failing, gets a
// warm-up ping first whose time is not recorded: it pays for (re)connecting,
// which would make the node look farther than it is.
func (u *Upstream) ping(ctx context.Context, n UpstreamNode) {
	conn, err := u.dial(n.Addr)
	if err != nil {
		u.fail(n.ID, err)
		return
	}
	c := pb.NewGatewayClient(conn)
	warm := !n.Known || !n.Healthy
	for {
		pctx, cancel := context.WithTimeout(ctx, u.pingTimeout())
		start := time.Now()
		resp, err := c.Ping(pctx, &pb.PingRequest{FromId: u.cfg.ID, Coordinate: pb.CoordinateToProto(u.rtt.Coordinate())})
		took := time.Since(start)
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err == nil && resp.NodeId != "" && resp.NodeId != n.ID {
			err = fmt.Errorf("address %s answers as node %s", n.Addr, resp.NodeId)
		}
		if err != nil {
			u.fail(n.ID, err)
			return
		}
		raise(&u.applied, resp.AppliedIndex)
		if warm {
			warm = false
			continue
		}
		if !u.rtt.Healthy(n.ID) {
			u.logger.Info("upstream node answers again", "node", n.ID, "addr", n.Addr)
		}
		u.rtt.Observe(n.ID, pb.CoordinateFromProto(resp.Coordinate), took)
		return
	}
}

// fail takes node id out of the rotation until a ping succeeds.
func (u *Upstream) fail(id string, err error) {
	if u.rtt.Healthy(id) {
		u.logger.Warn("upstream node failing; using the next nearest", "node", id, "err", err)
	}
	u.rtt.Failed(id)
	u.mu.Lock()
	u.seen[id] = true
	u.mu.Unlock()
	u.publish(u.Nodes())
}

// forgetGone drops what is known of nodes that gossip no longer lists at
// all (it keeps dead and departed members for a day).
func (u *Upstream) forgetGone() {
	listed := map[string]bool{}
	for _, m := range u.cfg.Members() {
		listed[m.ID] = true
	}
	u.mu.Lock()
	var gone []string
	for id := range u.seen {
		if !listed[id] {
			gone = append(gone, id)
			delete(u.seen, id)
		}
	}
	u.mu.Unlock()
	for _, id := range gone {
		u.rtt.Forget(id)
	}
}

// upstreamMetrics describe the nodes a gateway reads from.
type upstreamMetrics struct {
	rtt       *prometheus.GaugeVec
	preferred *prometheus.GaugeVec
	failovers prometheus.Counter
	// sharedReads counts manifest reads answered by a round trip that
	// another request of the same manifest or tag made.
	sharedReads prometheus.Counter
}

func newUpstreamMetrics(reg prometheus.Registerer) (*upstreamMetrics, error) {
	m := &upstreamMetrics{
		rtt: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "meridian", Subsystem: "gateway", Name: "upstream_rtt_seconds",
			Help: "Estimated round-trip time to each live server node (measured by gRPC pings, else from network coordinates).",
		}, []string{"node"}),
		preferred: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "meridian", Subsystem: "gateway", Name: "upstream_preferred",
			Help: "1 for the node metadata calls go to first now, 0 for the other live server nodes.",
		}, []string{"node"}),
		failovers: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "meridian", Subsystem: "gateway", Name: "upstream_failovers_total",
			Help: "Metadata calls sent again to the next nearest node after a node failed to answer.",
		}),
		sharedReads: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "meridian", Subsystem: "gateway", Name: "upstream_shared_manifest_reads_total",
			Help: "Manifest reads answered by a node read that a concurrent request of the same manifest or tag made after this one arrived.",
		}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.rtt, m.preferred, m.failovers, m.sharedReads} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}

// publish sets the per-node gauges from nodes (ranked) and drops the
// series of nodes no longer live.
func (u *Upstream) publish(nodes []UpstreamNode) {
	u.mu.Lock()
	defer u.mu.Unlock()
	live := make(map[string]bool, len(nodes))
	for i, n := range nodes {
		live[n.ID] = true
		if n.Known {
			u.metrics.rtt.WithLabelValues(n.ID).Set(n.RTT.Seconds())
		} else {
			u.metrics.rtt.DeleteLabelValues(n.ID)
		}
		preferred := 0.0
		if i == 0 {
			preferred = 1
		}
		u.metrics.preferred.WithLabelValues(n.ID).Set(preferred)
	}
	for id := range u.published {
		if !live[id] {
			u.metrics.rtt.DeleteLabelValues(id)
			u.metrics.preferred.DeleteLabelValues(id)
		}
	}
	u.published = live
}
