package chaos

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	mathrand "math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"go.yaml.in/yaml/v3"
)

// Options configures StartCluster.
type Options struct {
	// Meridian and Versitygw are the binaries to run.
	Meridian, Versitygw string
	// Dir is the run directory; everything goes under it: pki/ (the
	// cluster CA, the gossip key and every member's certificate, from
	// `meridian ca`, and the first admin's password), config/ (the
	// generated YAML), nodes/<id> (data), blobs/<region> (directory
	// regions), s3/<region> (versitygw data), logs/ (every process's
	// output, restarts appended) and ready/ (ready files).
	Dir     string
	Profile Profile
	// Log receives progress lines (nil: none).
	Log io.Writer
}

// Endpoint is an HTTP endpoint serving the OCI API.
type Endpoint struct {
	ID              string
	URL             string // http://127.0.0.1:PORT
	ReadConsistency string // "strong" or "local"
}

// NodeState is one node as `meridian cluster status` reports it.
type NodeState struct {
	ID, Region string
	// RaftState is leader, follower, candidate or shutdown ("" when
	// unreachable); Suffrage voter, nonvoter or none.
	RaftState, Suffrage string
	// Reachable: the node answered its status call.
	Reachable bool
	// Health is its gossip state: alive, suspect, dead, left or unknown.
	Health string
	// Applied is Raft's applied index; DigestIndex the state store's
	// applied index, at which Digest (hex sha256 of the store) holds.
	Applied, DigestIndex uint64
	Digest               string
	Commit               uint64 // the node's own commit index
	LeaderID             string // the leader the node believes in
	Error                string // why it is unreachable
}

// ClusterState is the cluster as one node saw it.
type ClusterState struct {
	Leader      string
	CommitIndex uint64 // the leader's commit index
	Nodes       []NodeState
	Regions     []RegionLag
	AnsweredBy  string
}

// Cluster is a running chaos cluster: versitygw servers behind S3 fault
// proxies, nodes behind TCP fault proxies, and standalone gateways.
type Cluster struct {
	opt  Options
	prof Profile
	dir  string
	out  io.Writer
	net  *Network
	pki  *clusterPKI

	// adminPassword is the first admin's (--admin-password-file); robots
	// is the robot the workload's robot writers push as.
	adminPassword string
	robots        robotAccounts

	s3       map[string]*s3Server // by region
	nodes    []*nodeProc
	gateways []*gatewayProc

	mu        sync.Mutex
	exits     []ProcExit
	closed    bool
	closeOnce sync.Once
}

type s3Server struct {
	region, bucket string
	addr           string // versitygw's own address
	access, secret string
	proc           *Proc
	proxy          *S3Proxy
	mu             sync.Mutex // serializes stop/start
}

type nodeProc struct {
	spec                                     NodeSpec
	proc                                     *Proc
	httpAddr, grpcAddr, raftAddr, gossipAddr string
	grpcProxy, raftProxy                     *Proxy
	dataDir, config                          string
	first                                    bool
	mu                                       sync.Mutex // serializes starts
}

type gatewayProc struct {
	spec                 GatewaySpec
	proc                 *Proc
	httpAddr, gossipAddr string
	config               string
	mu                   sync.Mutex
}

// StartCluster starts the profile's cluster under opt.Dir: a cluster CA
// with a certificate for every node, every gateway and the harness's
// admin (members run mutual TLS on gRPC and Raft and encrypted gossip);
// the versitygw servers, their S3 proxies and buckets; the first node,
// which bootstraps, then the others, which join it; then, once every voter
// is in and every region known, the gateways. It returns once the gateways serve /v2/ and
// see a healthy node. On failure everything it started is stopped.
func StartCluster(ctx context.Context, opt Options) (_ *Cluster, err error) {
	if err := opt.Profile.validate(); err != nil {
		return nil, err
	}
	if opt.Meridian == "" {
		return nil, errors.New("chaos: Options.Meridian (the meridian binary) is required")
	}
	dir, err := filepath.Abs(opt.Dir)
	if err != nil {
		return nil, err
	}
	// Ports are new on every start, so old node state (whose Raft
	// configuration names old addresses) cannot be reused.
	if entries, err := os.ReadDir(filepath.Join(dir, "nodes")); err == nil && len(entries) > 0 {
		return nil, fmt.Errorf("chaos: %s already holds a cluster's data; use a fresh run directory", dir)
	}
	for _, sub := range []string{"config", "nodes", "blobs", "s3", "logs", "ready"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o755); err != nil {
			return nil, err
		}
	}
	out := opt.Log
	if out == nil {
		out = io.Discard
	}
	c := &Cluster{opt: opt, prof: opt.Profile, dir: dir, out: out, s3: map[string]*s3Server{}}
	c.net = NewNetwork(c.knownPIDs)
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	ports := &portPicker{used: map[int]bool{}}

	// Trust: every member's certificate, and the harness's own.
	members := make([]pkiMember, 0, len(c.prof.Nodes)+len(c.prof.Gateways))
	for _, n := range c.prof.Nodes {
		members = append(members, pkiMember{roleNode, n.ID})
	}
	for _, g := range c.prof.Gateways {
		members = append(members, pkiMember{roleGateway, g.ID})
	}
	if c.pki, err = newClusterPKI(ctx, opt.Meridian, filepath.Join(dir, "pki"), clusterID, members); err != nil {
		return nil, err
	}
	c.logf("cluster CA for %q in %s: %d member certificates and an admin's; mutual TLS and gossip encryption on",
		clusterID, c.pki.dir, len(members))
	if c.adminPassword, err = writeAdminPassword(c.adminPasswordFile()); err != nil {
		return nil, err
	}

	// S3 regions: a versitygw each, behind a fault proxy, with a bucket.
	stores := map[string]string{}
	for _, r := range c.prof.Regions {
		if !r.S3 {
			blobs := filepath.Join(dir, "blobs", r.Name)
			if err := os.MkdirAll(blobs, 0o755); err != nil {
				return nil, err
			}
			stores[r.Name] = "file://" + blobs
			continue
		}
		if opt.Versitygw == "" {
			return nil, fmt.Errorf("chaos: region %s is on S3 but Options.Versitygw is empty", r.Name)
		}
		s, err := c.startS3(ctx, r.Name, ports)
		if err != nil {
			return nil, err
		}
		u := url.URL{Scheme: "s3", User: url.UserPassword(s.access, s.secret), Host: s.proxy.Addr(), Path: "/" + s.bucket,
			RawQuery: "secure=false&region=us-east-1&path_style=true"}
		stores[r.Name] = u.String()
	}

	// Nodes: addresses and proxies first, so every config can be written.
	var nodes []*nodeProc
	for i, ns := range c.prof.Nodes {
		n := &nodeProc{spec: ns, first: i == 0, dataDir: filepath.Join(dir, "nodes", ns.ID),
			config: filepath.Join(dir, "config", ns.ID+".yaml")}
		n.httpAddr, n.grpcAddr, n.raftAddr = ports.tcp(), ports.tcp(), ports.tcp()
		n.gossipAddr = ports.tcpudp()
		if n.grpcProxy, err = c.net.AddProxy(ns.ID, "127.0.0.1:0", n.grpcAddr); err != nil {
			return nil, err
		}
		if n.raftProxy, err = c.net.AddProxy(ns.ID, "127.0.0.1:0", n.raftAddr); err != nil {
			return nil, err
		}
		nodes = append(nodes, n)
	}
	for _, n := range nodes {
		n.proc = &Proc{Name: n.spec.ID, LogPath: filepath.Join(dir, "logs", n.spec.ID+".log"),
			ReadyFile: filepath.Join(dir, "ready", n.spec.ID+".json"), OnExit: c.noteExit}
		if err := c.writeNodeConfig(n, stores); err != nil {
			return nil, err
		}
	}
	c.mu.Lock()
	c.nodes = nodes // the proxies read it (knownPIDs) from now on
	c.mu.Unlock()
	first := c.nodes[0]
	c.logf("starting %s (bootstraps the cluster)", first.spec.ID)
	if err := c.startNode(ctx, first); err != nil {
		return nil, err
	}
	if err := waitHTTPStatus(ctx, 90*time.Second, "http://"+first.httpAddr+"/readyz", first.proc, 200); err != nil {
		return nil, fmt.Errorf("%s never became ready: %w%s", first.spec.ID, err, first.proc.logTailSection())
	}
	if len(c.nodes) > 1 {
		c.logf("starting %d more nodes", len(c.nodes)-1)
		var wg sync.WaitGroup
		errs := make([]error, len(c.nodes))
		for i, n := range c.nodes[1:] {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[i+1] = c.startNode(ctx, n)
			}()
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			return nil, err
		}
	}
	c.logf("waiting for %d voters and every node ready", c.prof.voters())
	if err := c.waitMembership(ctx, 2*time.Minute); err != nil {
		return nil, err
	}

	// Gateways.
	var gateways []*gatewayProc
	for _, gs := range c.prof.Gateways {
		g := &gatewayProc{spec: gs, config: filepath.Join(dir, "config", gs.ID+".yaml")}
		g.httpAddr, g.gossipAddr = ports.tcp(), ports.tcpudp()
		if err := c.writeGatewayConfig(g, stores); err != nil {
			return nil, err
		}
		g.proc = &Proc{Name: gs.ID, LogPath: filepath.Join(dir, "logs", gs.ID+".log"),
			ReadyFile: filepath.Join(dir, "ready", gs.ID+".json"), OnExit: c.noteExit}
		gateways = append(gateways, g)
	}
	c.mu.Lock()
	c.gateways = gateways
	c.mu.Unlock()
	for _, g := range c.gateways {
		c.logf("starting gateway %s (%s, read consistency %s)", g.spec.ID, g.spec.Region, g.spec.ReadConsistency)
		if err := c.startGateway(ctx, g); err != nil {
			return nil, err
		}
	}
	for _, g := range c.gateways {
		if err := c.waitGatewayReady(ctx, g, 90*time.Second); err != nil {
			return nil, err
		}
	}

	// Authentication: the admin the first node created, and the robot
	// the workload's robot writers start with.
	rctx, cancel := context.WithTimeout(ctx, time.Minute)
	name, err := c.newRobot(rctx)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("chaos: creating the first robot: %w", err)
	}
	if err := c.waitLogin(ctx, time.Minute); err != nil {
		return nil, err
	}
	c.logf("authentication on: the workload logs in as %s and, for its robot writer, as robot %s", adminUser, name)
	c.logf("cluster up: %d nodes in %d regions, %d gateways; logs in %s", len(c.nodes), len(c.prof.Regions), len(c.gateways), filepath.Join(dir, "logs"))
	return c, nil
}

func (c *Cluster) logf(format string, args ...any) {
	fmt.Fprintf(c.out, "%s  %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

// noteExit records a process that exited on its own.
func (c *Cluster) noteExit(e ProcExit) {
	c.mu.Lock()
	closed := c.closed
	if !closed {
		c.exits = append(c.exits, e)
	}
	c.mu.Unlock()
	if !closed {
		c.logf("UNEXPECTED EXIT: %s (pid %d): %s", e.Name, e.PID, e.Err)
	}
}

// UnexpectedExits lists the processes that exited without the harness
// killing or stopping them (crashes, failed restarts), with their log tails.
func (c *Cluster) UnexpectedExits() []ProcExit {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.exits)
}

// Network is the TCP fault network between the nodes and gateways.
func (c *Cluster) Network() *Network { return c.net }

// NetworkSummary describes the proxied connections so far: how many from
// each source to each node, what identifying their sources cost, and why
// recent ones could not be identified.
func (c *Cluster) NetworkSummary() string {
	acc := c.net.Accepted()
	keys := make([]string, 0, len(acc))
	total := 0
	for k, v := range acc {
		keys = append(keys, fmt.Sprintf("%s=%d", k, v))
		total += v
	}
	slices.Sort(keys)
	cost, n := c.net.IdentifyCost()
	s := fmt.Sprintf("%d proxied connections, sources identified in %v on average (%d lookups): %s",
		total, cost.Round(time.Microsecond), n, strings.Join(keys, " "))
	if u := c.net.Unidentified(); len(u) > 0 {
		s += "\nunidentified: " + strings.Join(u, "; ")
	}
	return s
}

// Profile is the profile the cluster runs.
func (c *Cluster) Profile() Profile { return c.prof }

// Dir is the run directory.
func (c *Cluster) Dir() string { return c.dir }

// knownPIDs maps every running node and gateway to its pid.
func (c *Cluster) knownPIDs() map[string]int {
	c.mu.Lock()
	nodes, gateways := c.nodes, c.gateways
	c.mu.Unlock()
	m := map[string]int{}
	for _, n := range nodes {
		if n.proc != nil {
			if pid := n.proc.PID(); pid != 0 {
				m[n.spec.ID] = pid
			}
		}
	}
	for _, g := range gateways {
		if g.proc != nil {
			if pid := g.proc.PID(); pid != 0 {
				m[g.spec.ID] = pid
			}
		}
	}
	return m
}

// Gateways are the standalone gateways.
func (c *Cluster) Gateways() []Endpoint {
	var out []Endpoint
	for _, g := range c.gateways {
		out = append(out, Endpoint{ID: g.spec.ID, URL: "http://" + g.httpAddr, ReadConsistency: g.spec.ReadConsistency})
	}
	return out
}

// Nodes are the nodes' own OCI APIs (each node embeds a gateway; its read
// consistency is the nodes' default, local).
func (c *Cluster) Nodes() []Endpoint {
	var out []Endpoint
	for _, n := range c.nodes {
		out = append(out, Endpoint{ID: n.spec.ID, URL: "http://" + n.httpAddr, ReadConsistency: "local"})
	}
	return out
}

// NodeIDs are the nodes' ids, in profile order.
func (c *Cluster) NodeIDs() []string {
	var ids []string
	for _, n := range c.nodes {
		ids = append(ids, n.spec.ID)
	}
	return ids
}

func (c *Cluster) node(id string) *nodeProc {
	for _, n := range c.nodes {
		if n.spec.ID == id {
			return n
		}
	}
	return nil
}

func (c *Cluster) gateway(id string) *gatewayProc {
	for _, g := range c.gateways {
		if g.spec.ID == id {
			return g
		}
	}
	return nil
}

// ---- configuration ----

type yamlRegion struct {
	Name  string `yaml:"name"`
	Store string `yaml:"store"`
}

type yamlPolicy struct {
	Prefix     string   `yaml:"prefix"`
	Regions    []string `yaml:"regions,omitempty"`
	MinRegions int      `yaml:"min_regions,omitempty"`
}

type yamlReplication struct {
	Policies    []yamlPolicy `yaml:"policies,omitempty"`
	SyncTimeout string       `yaml:"sync_timeout"`
}

// yamlConfig holds the keys of meridian's config file the harness sets.
type yamlConfig struct {
	DataDir              string          `yaml:"data_dir,omitempty"`
	ClusterID            string          `yaml:"cluster_id"`
	NodeID               string          `yaml:"node_id,omitempty"`
	Region               string          `yaml:"region"`
	Regions              []yamlRegion    `yaml:"regions"`
	Replication          yamlReplication `yaml:"replication"`
	HTTPAddr             string          `yaml:"http_addr"`
	GRPCAddr             string          `yaml:"grpc_addr,omitempty"`
	RaftAddr             string          `yaml:"raft_addr,omitempty"`
	GossipAddr           string          `yaml:"gossip_addr"`
	AdvertiseGRPC        string          `yaml:"advertise_grpc,omitempty"`
	AdvertiseRaft        string          `yaml:"advertise_raft,omitempty"`
	Voters               int             `yaml:"voters,omitempty"`
	ReadConsistency      string          `yaml:"read_consistency"`
	ApplyTimeout         string          `yaml:"apply_timeout,omitempty"`
	RaftHeartbeatTimeout string          `yaml:"raft_heartbeat_timeout,omitempty"`
	RaftElectionTimeout  string          `yaml:"raft_election_timeout,omitempty"`
	JoinTimeout          string          `yaml:"join_timeout"`
	GossipProfile        string          `yaml:"gossip_profile"`
	ReadyFile            string          `yaml:"ready_file"`
	LogLevel             string          `yaml:"log_level"`
}

const clusterID = "chaos"

func (c *Cluster) baseConfig(region string, stores map[string]string) yamlConfig {
	y := yamlConfig{ClusterID: clusterID, Region: region, GossipProfile: "local", LogLevel: "info", JoinTimeout: "60s"}
	var all []string
	for _, r := range c.prof.Regions {
		y.Regions = append(y.Regions, yamlRegion{Name: r.Name, Store: stores[r.Name]})
		all = append(all, r.Name)
	}
	y.Replication = yamlReplication{Policies: replicationPolicies(all), SyncTimeout: "15s"}
	return y
}

// replicationPolicies are the policies the nodes seed the cluster with at
// bootstrap: every repository in every region; critical/ acknowledged
// only once two regions hold it.
func replicationPolicies(regions []string) []yamlPolicy {
	return []yamlPolicy{{Prefix: "", Regions: regions}, {Prefix: CriticalPrefix, MinRegions: min(2, len(regions))}}
}

// policyRegions is the regions policies place repo in, as the registry
// resolves them (the longest matching prefix wins; unset fields inherit):
// those of the longest matching prefix that names regions, else every
// region.
func policyRegions(policies []yamlPolicy, regions []string, repo string) []string {
	out, longest := regions, -1
	for _, p := range policies {
		if strings.HasPrefix(repo, p.Prefix) && len(p.Regions) > 0 && len(p.Prefix) > longest {
			out, longest = p.Regions, len(p.Prefix)
		}
	}
	return out
}

func yamlDuration(d time.Duration) string {
	if d <= 0 {
		return ""
	}
	return d.String()
}

func (c *Cluster) writeNodeConfig(n *nodeProc, stores map[string]string) error {
	y := c.baseConfig(n.spec.Region, stores)
	y.DataDir, y.NodeID = n.dataDir, n.spec.ID
	y.HTTPAddr, y.GRPCAddr, y.RaftAddr, y.GossipAddr = n.httpAddr, n.grpcAddr, n.raftAddr, n.gossipAddr
	y.AdvertiseGRPC, y.AdvertiseRaft = n.grpcProxy.Addr(), n.raftProxy.Addr()
	y.Voters = c.prof.voters()
	y.ReadConsistency = "local"
	y.ApplyTimeout = yamlDuration(c.prof.ApplyTimeout)
	y.RaftHeartbeatTimeout = yamlDuration(c.prof.RaftHeartbeatTimeout)
	y.RaftElectionTimeout = yamlDuration(c.prof.RaftElectionTimeout)
	y.ReadyFile = filepath.Join(c.dir, "ready", n.spec.ID+".json")
	return writeYAML(n.config, y)
}

func (c *Cluster) writeGatewayConfig(g *gatewayProc, stores map[string]string) error {
	y := c.baseConfig(g.spec.Region, stores)
	y.Replication.Policies = nil // only nodes seed policies
	y.HTTPAddr, y.GossipAddr = g.httpAddr, g.gossipAddr
	y.ReadConsistency = g.spec.ReadConsistency
	y.ReadyFile = filepath.Join(c.dir, "ready", g.spec.ID+".json")
	return writeYAML(g.config, y)
}

func writeYAML(path string, v any) error {
	b, err := yaml.Marshal(v)
	if err != nil {
		return err
	}
	return os.WriteFile(path, append([]byte("# generated by the chaos harness\n"), b...), 0o600)
}

// ---- ports ----

// portPicker hands out loopback ports that were free a moment ago and
// that it has not handed out before, so restarts reuse fixed addresses.
//
// The ports come from below the kernel's ephemeral range (32768 and up on
// Linux): a port there is what any process's outgoing connection or
// listener on port 0 may take between the moment the harness frees it and
// the moment a node (or a node restarted after a kill) binds it again,
// and on a machine running other tests that happens.
type portPicker struct {
	mu   sync.Mutex
	used map[int]bool
}

// Ports are picked from [portLow, portHigh).
const portLow, portHigh = 16384, 32768

func (p *portPicker) tcp() string { return p.pick(false) }

// tcpudp picks a port free for both TCP and UDP (gossip uses both).
func (p *portPicker) tcpudp() string { return p.pick(true) }

func (p *portPicker) pick(udp bool) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	for range 10000 {
		port := portLow + mathrand.IntN(portHigh-portLow)
		if !p.used[port] && portFree(port, udp) {
			p.used[port] = true
			return fmt.Sprintf("127.0.0.1:%d", port)
		}
	}
	panic("chaos: no free loopback port below the ephemeral range")
}

// portFree reports whether port can be bound on loopback for TCP (and
// UDP) right now.
func portFree(port int, udp bool) bool {
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return false
	}
	defer ln.Close()
	if udp {
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			return false
		}
		pc.Close()
	}
	return true
}

// ---- S3 servers ----

func (c *Cluster) startS3(ctx context.Context, region string, ports *portPicker) (*s3Server, error) {
	secret := make([]byte, 20)
	rand.Read(secret)
	s := &s3Server{region: region, bucket: region, addr: ports.tcp(), access: "chaos-" + region, secret: hex.EncodeToString(secret)}
	data := filepath.Join(c.dir, "s3", region)
	if err := os.MkdirAll(data, 0o755); err != nil {
		return nil, err
	}
	s.proc = &Proc{
		Name:    "versitygw-" + region,
		Argv:    []string{c.opt.Versitygw, "--port", s.addr, "--quiet", "posix", data},
		Env:     []string{"ROOT_ACCESS_KEY=" + s.access, "ROOT_SECRET_KEY=" + s.secret},
		LogPath: filepath.Join(c.dir, "logs", "versitygw-"+region+".log"),
		OnExit:  c.noteExit,
	}
	c.s3[region] = s
	c.logf("starting versitygw for %s on %s", region, s.addr)
	if err := s.start(ctx); err != nil {
		return nil, err
	}
	var err error
	if s.proxy, err = NewS3Proxy("127.0.0.1:0", s.addr); err != nil {
		return nil, err
	}
	mc, err := minio.New(s.addr, &minio.Options{Creds: credentials.NewStaticV4(s.access, s.secret, ""), Region: "us-east-1", BucketLookup: minio.BucketLookupPath})
	if err != nil {
		return nil, err
	}
	bctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := mc.MakeBucket(bctx, s.bucket, minio.MakeBucketOptions{Region: "us-east-1"}); err != nil {
		if code := minio.ToErrorResponse(err).Code; code != "BucketAlreadyOwnedByYou" && code != "BucketAlreadyExists" {
			return nil, fmt.Errorf("chaos: creating bucket %s: %w", s.bucket, err)
		}
	}
	return s, nil
}

// start runs versitygw (if it is not running) and waits until it answers
// HTTP. Its port was ours a moment ago, so a failed start is retried.
func (s *s3Server) start(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc.Running() {
		return nil
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if err := s.proc.Start(); err != nil {
			return err
		}
		err := waitHTTPStatus(ctx, 30*time.Second, "http://"+s.addr+"/", s.proc)
		if err == nil {
			return nil
		}
		s.proc.Kill()
		if ctx.Err() != nil || time.Now().After(deadline) {
			return fmt.Errorf("chaos: versitygw for %s: %w%s", s.region, err, s.proc.logTailSection())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// stop kills versitygw, as a crash would.
func (s *s3Server) stop() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.proc.Kill()
}

// ---- nodes and gateways ----

// nodeArgv is the command line of n: everything is in its config file
// but its trust flags (certificate and gossip key) and --join, which every
// node but the bootstrapping one gets on its first start and every node
// gets on restarts (a node with state only uses it to find gossip again).
func (c *Cluster) nodeArgv(n *nodeProc) []string {
	argv := append([]string{c.opt.Meridian, "serve", "--config", n.config}, c.pki.memberFlags(n.spec.ID)...)
	if n.first && n.proc.Starts() == 0 {
		// The node that bootstraps creates the first admin.
		return append(argv, "--admin-password-file", c.adminPasswordFile())
	}
	for _, o := range c.nodes {
		if o != n {
			argv = append(argv, "--join", o.gossipAddr)
		}
	}
	return argv
}

// startNode starts n unless it runs and waits for its ready file.
func (c *Cluster) startNode(ctx context.Context, n *nodeProc) error {
	n.mu.Lock()
	if n.proc.Running() {
		n.mu.Unlock()
		return nil
	}
	n.proc.Argv = c.nodeArgv(n)
	err := n.proc.Start()
	n.mu.Unlock()
	if err != nil {
		return err
	}
	_, err = n.proc.WaitReady(ctx, 90*time.Second)
	return err
}

func (c *Cluster) startGateway(ctx context.Context, g *gatewayProc) error {
	g.mu.Lock()
	if g.proc.Running() {
		g.mu.Unlock()
		return nil
	}
	argv := append([]string{c.opt.Meridian, "gateway", "--config", g.config, "--gateway-id", g.spec.ID}, c.pki.memberFlags(g.spec.ID)...)
	for _, n := range c.nodes {
		argv = append(argv, "--join", n.gossipAddr)
	}
	g.proc.Argv = argv
	err := g.proc.Start()
	g.mu.Unlock()
	if err != nil {
		return err
	}
	_, err = g.proc.WaitReady(ctx, 90*time.Second)
	return err
}

// waitGatewayReady waits until g answers /v2/ (200 or 401) and its
// /readyz (it knows a healthy node).
func (c *Cluster) waitGatewayReady(ctx context.Context, g *gatewayProc, timeout time.Duration) error {
	if err := waitHTTPStatus(ctx, timeout, "http://"+g.httpAddr+"/v2/", g.proc, 200, 401); err != nil {
		return fmt.Errorf("gateway %s: %w%s", g.spec.ID, err, g.proc.logTailSection())
	}
	if err := waitHTTPStatus(ctx, timeout, "http://"+g.httpAddr+"/readyz", g.proc, 200); err != nil {
		return fmt.Errorf("gateway %s: %w%s", g.spec.ID, err, g.proc.logTailSection())
	}
	return nil
}

var probeClient = &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}

// httpStatus GETs url and returns the status code.
func httpStatus(ctx context.Context, url string) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	resp, err := probeClient.Do(req)
	if err != nil {
		return 0, err
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	return resp.StatusCode, nil
}

// waitHTTPStatus polls url until it answers one of want (none: anything),
// ctx ends, timeout passes or p (if not nil) exits.
func waitHTTPStatus(ctx context.Context, timeout time.Duration, url string, p *Proc, want ...int) error {
	var exited <-chan struct{}
	if p != nil {
		exited = p.Exited()
	}
	var last string
	err := pollUntil(ctx, timeout, 100*time.Millisecond, exited, func() bool {
		code, err := httpStatus(ctx, url)
		if err != nil {
			last = err.Error()
			return false
		}
		if len(want) == 0 || slices.Contains(want, code) {
			return true
		}
		last = fmt.Sprintf("HTTP %d", code)
		return false
	})
	if err != nil {
		return fmt.Errorf("waiting for %s: %w (last: %s)", url, err, last)
	}
	return nil
}

// waitMembership waits until every node is reachable and ready, the
// cluster has its voters, and every region is known.
func (c *Cluster) waitMembership(ctx context.Context, timeout time.Duration) error {
	var last string
	err := pollUntil(ctx, timeout, 500*time.Millisecond, nil, func() bool {
		st, err := c.Status(ctx)
		if err != nil {
			last = err.Error()
			return false
		}
		if st.Leader == "" {
			last = "no leader"
			return false
		}
		voters := 0
		for _, n := range st.Nodes {
			if !n.Reachable {
				last = n.ID + " unreachable: " + n.Error
				return false
			}
			if n.Suffrage == "voter" {
				voters++
			}
		}
		if voters != c.prof.voters() {
			last = fmt.Sprintf("%d voters of %d", voters, c.prof.voters())
			return false
		}
		for _, r := range c.prof.Regions {
			if !slices.ContainsFunc(st.Regions, func(l RegionLag) bool { return l.Region == r.Name }) {
				last = "region " + r.Name + " not in status"
				return false
			}
		}
		for _, n := range c.nodes {
			if code, err := httpStatus(ctx, "http://"+n.httpAddr+"/readyz"); err != nil || code != 200 {
				last = fmt.Sprintf("%s not ready (%d, %v)", n.spec.ID, code, err)
				return false
			}
		}
		return true
	})
	if err != nil {
		return fmt.Errorf("chaos: cluster membership: %w (last: %s)", err, last)
	}
	return nil
}

// ---- status ----

// juint reads protojson's 64-bit integers, which are JSON strings.
type juint uint64

func (u *juint) UnmarshalJSON(b []byte) error {
	s := strings.Trim(string(b), `"`)
	if s == "" || s == "null" {
		*u = 0
		return nil
	}
	v, err := strconv.ParseUint(s, 10, 64)
	*u = juint(v)
	return err
}

type jint int64

func (i *jint) UnmarshalJSON(b []byte) error {
	s := strings.Trim(string(b), `"`)
	if s == "" || s == "null" {
		*i = 0
		return nil
	}
	v, err := strconv.ParseInt(s, 10, 64)
	*i = jint(v)
	return err
}

// statusJSON is ClusterStatusResponse as `meridian cluster status --json`
// prints it (protojson: lowerCamelCase, 64-bit integers as strings, bytes
// as base64).
type statusJSON struct {
	ClusterID         string `json:"clusterId"`
	LeaderID          string `json:"leaderId"`
	LeaderCommitIndex juint  `json:"leaderCommitIndex"`
	AnsweredBy        string `json:"answeredBy"`
	Members           []struct {
		ID       string `json:"id"`
		Region   string `json:"region"`
		Role     string `json:"role"`
		Suffrage string `json:"suffrage"`
		Health   string `json:"health"`
		Error    string `json:"error"`
		Status   *struct {
			ID               string `json:"id"`
			Region           string `json:"region"`
			RaftState        string `json:"raftState"`
			Suffrage         string `json:"suffrage"`
			LeaderID         string `json:"leaderId"`
			Term             juint  `json:"term"`
			CommitIndex      juint  `json:"commitIndex"`
			AppliedIndex     juint  `json:"appliedIndex"`
			LastLogIndex     juint  `json:"lastLogIndex"`
			StateDigest      []byte `json:"stateDigest"`
			StateDigestIndex juint  `json:"stateDigestIndex"`
		} `json:"status"`
	} `json:"members"`
	Regions []struct {
		Region       string `json:"region"`
		MissingBlobs jint   `json:"missingBlobs"`
		MissingBytes jint   `json:"missingBytes"`
	} `json:"regions"`
}

// parseStatus turns the CLI's JSON into a ClusterState; nodes lists the
// nodes to report, in order (members the status lacks are unreachable).
func parseStatus(b []byte, nodes []NodeSpec) (ClusterState, error) {
	var sj statusJSON
	if err := json.Unmarshal(b, &sj); err != nil {
		return ClusterState{}, fmt.Errorf("cluster status JSON: %w", err)
	}
	st := ClusterState{Leader: sj.LeaderID, CommitIndex: uint64(sj.LeaderCommitIndex), AnsweredBy: sj.AnsweredBy}
	for _, spec := range nodes {
		ns := NodeState{ID: spec.ID, Region: spec.Region, Health: "unknown", Error: "not in the cluster status"}
		for _, m := range sj.Members {
			if m.ID != spec.ID {
				continue
			}
			ns.Health, ns.Suffrage, ns.Error = m.Health, m.Suffrage, m.Error
			if s := m.Status; s != nil {
				ns.Reachable = true
				ns.RaftState, ns.Suffrage, ns.LeaderID = s.RaftState, s.Suffrage, s.LeaderID
				ns.Applied, ns.Commit = uint64(s.AppliedIndex), uint64(s.CommitIndex)
				ns.DigestIndex, ns.Digest = uint64(s.StateDigestIndex), hex.EncodeToString(s.StateDigest)
			}
		}
		st.Nodes = append(st.Nodes, ns)
	}
	for _, r := range sj.Regions {
		st.Regions = append(st.Regions, RegionLag{Region: r.Region, MissingBlobs: int64(r.MissingBlobs), MissingBytes: int64(r.MissingBytes)})
	}
	return st, nil
}

// statusFrom runs `meridian cluster status --json` against one node's own
// gRPC listener (not its fault proxy: the harness is not a member), with
// the harness's admin certificate.
func (c *Cluster) statusFrom(ctx context.Context, n *nodeProc) (ClusterState, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	args := append([]string{"cluster", "status", "--json", "--addr", n.grpcAddr, "--timeout", "8s"}, c.pki.tlsFlags(adminID)...)
	cmd := exec.CommandContext(ctx, c.opt.Meridian, args...)
	cmd.Env = harnessEnv()
	var stderr strings.Builder
	cmd.Stderr = &stderr
	b, err := cmd.Output()
	if err != nil {
		return ClusterState{}, fmt.Errorf("cluster status from %s: %v: %s", n.spec.ID, err, strings.TrimSpace(stderr.String()))
	}
	return parseStatus(b, c.prof.Nodes)
}

// Status asks the live, unpaused nodes in turn for the cluster status and
// returns the first answer that names a leader (or, if none does, the
// first answer).
func (c *Cluster) Status(ctx context.Context) (ClusterState, error) {
	var first *ClusterState
	var errs []error
	for _, n := range c.nodes {
		if !n.proc.Running() || n.proc.Paused() {
			continue
		}
		st, err := c.statusFrom(ctx, n)
		if err != nil {
			errs = append(errs, err)
			if ctx.Err() != nil {
				break
			}
			continue
		}
		if st.Leader != "" {
			return st, nil
		}
		if first == nil {
			first = &st
		}
	}
	if first != nil {
		return *first, nil
	}
	if len(errs) == 0 {
		return ClusterState{}, errors.New("chaos: no node is running")
	}
	return ClusterState{}, errors.Join(errs...)
}

// Leader is the current leader's id.
func (c *Cluster) Leader(ctx context.Context) (string, error) {
	st, err := c.Status(ctx)
	if err != nil {
		return "", err
	}
	if st.Leader == "" {
		return "", errors.New("chaos: no leader")
	}
	return st.Leader, nil
}

// ---- healing and convergence ----

// Heal undoes every fault: continues paused processes, heals the network,
// puts the S3 proxies back in pass mode, restarts stopped S3 servers, then
// killed nodes and gateways, and waits until every node's /readyz and
// every gateway's /v2/ and /readyz answer.
func (c *Cluster) Heal(ctx context.Context) error {
	for _, n := range c.nodes {
		n.proc.Resume()
	}
	for _, g := range c.gateways {
		g.proc.Resume()
	}
	c.net.Heal()
	var errs []error
	for _, r := range c.prof.Regions {
		if s := c.s3[r.Name]; s != nil {
			s.proxy.SetMode(S3Pass)
			if err := s.start(ctx); err != nil {
				errs = append(errs, err)
			}
		}
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	for _, n := range c.nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := c.startNode(ctx, n); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	for _, g := range c.gateways {
		if err := c.startGateway(ctx, g); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	for _, n := range c.nodes {
		if err := waitHTTPStatus(ctx, 2*time.Minute, "http://"+n.httpAddr+"/readyz", n.proc, 200); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", n.spec.ID, err))
		}
	}
	for _, g := range c.gateways {
		if err := c.waitGatewayReady(ctx, g, 2*time.Minute); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// WaitConverged polls the cluster status until it shows a converged
// cluster (see convergence) or ctx ends, when Detail says what still
// differed.
func (c *Cluster) WaitConverged(ctx context.Context) Convergence {
	start := time.Now()
	var conv Convergence
	conv.Detail = "no status yet"
	for {
		st, err := c.Status(ctx)
		if err != nil {
			conv.Detail = err.Error()
		} else {
			conv = c.converged(st)
			if conv.Converged {
				conv.Took = time.Since(start)
				return conv
			}
		}
		select {
		case <-ctx.Done():
			conv.Converged = false
			conv.Took = time.Since(start)
			return conv
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// converged checks one status against the profile's regions.
func (c *Cluster) converged(st ClusterState) Convergence {
	regions := make([]string, 0, len(c.prof.Regions))
	for _, r := range c.prof.Regions {
		regions = append(regions, r.Name)
	}
	return convergence(st, regions)
}

// convergence decides whether the cluster status st (one node's view of
// every member, as `meridian cluster status --json` reports it) shows a
// converged cluster holding regions: a leader that every node follows;
// every node reachable, with the same applied index and the same state
// digest at the same digest index, its own commit index equal to its
// applied index; the leader's commit index equal to that applied index;
// and every region listed without a missing blob. Detail lists every
// difference found.
func convergence(st ClusterState, regions []string) Convergence {
	conv := Convergence{Regions: st.Regions}
	var diffs []string
	if st.Leader == "" {
		diffs = append(diffs, "no leader")
	}
	if len(st.Nodes) == 0 {
		diffs = append(diffs, "no node in the status")
	}
	var ref *NodeState
	for i := range st.Nodes {
		n := &st.Nodes[i]
		if !n.Reachable {
			diffs = append(diffs, fmt.Sprintf("%s unreachable (%s)", n.ID, n.Error))
			continue
		}
		if st.Leader != "" && n.LeaderID != st.Leader {
			diffs = append(diffs, fmt.Sprintf("%s follows leader %q, not %s", n.ID, n.LeaderID, st.Leader))
		}
		if n.Commit != n.Applied {
			diffs = append(diffs, fmt.Sprintf("%s committed %d, applied %d", n.ID, n.Commit, n.Applied))
		}
		if ref == nil {
			ref = n
			continue
		}
		if n.Applied != ref.Applied {
			diffs = append(diffs, fmt.Sprintf("%s applied %d, %s %d", n.ID, n.Applied, ref.ID, ref.Applied))
		}
		if n.DigestIndex != ref.DigestIndex || n.Digest != ref.Digest {
			diffs = append(diffs, fmt.Sprintf("%s digest %.12s@%d, %s %.12s@%d", n.ID, n.Digest, n.DigestIndex, ref.ID, ref.Digest, ref.DigestIndex))
		}
	}
	if ref != nil {
		conv.Applied, conv.Digest = ref.Applied, ref.Digest
		if st.CommitIndex != ref.Applied {
			diffs = append(diffs, fmt.Sprintf("leader commit index %d, applied %d", st.CommitIndex, ref.Applied))
		}
	}
	for _, r := range regions {
		i := slices.IndexFunc(st.Regions, func(l RegionLag) bool { return l.Region == r })
		switch {
		case i < 0:
			diffs = append(diffs, "region "+r+" missing from status")
		case st.Regions[i].MissingBlobs != 0:
			diffs = append(diffs, fmt.Sprintf("region %s misses %d blobs (%d bytes)", r, st.Regions[i].MissingBlobs, st.Regions[i].MissingBytes))
		}
	}
	conv.Converged = len(diffs) == 0
	conv.Detail = strings.Join(diffs, "; ")
	return conv
}

// Close kills every process and closes the proxies. It is always safe,
// also on a cluster that failed to start, and more than once.
func (c *Cluster) Close() error {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		c.closed = true
		nodes, gateways := c.nodes, c.gateways
		c.mu.Unlock()
		var wg sync.WaitGroup
		kill := func(p *Proc) {
			if p == nil {
				return
			}
			wg.Add(1)
			go func() { defer wg.Done(); p.Kill() }()
		}
		for _, g := range gateways {
			kill(g.proc)
		}
		for _, n := range nodes {
			kill(n.proc)
		}
		for _, s := range c.s3 {
			kill(s.proc)
		}
		wg.Wait()
		if c.net != nil {
			c.net.Close()
		}
		for _, s := range c.s3 {
			if s.proxy != nil {
				s.proxy.Close()
			}
		}
	})
	return nil
}
