package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/meridian-registry/meridian/node"
	"github.com/meridian-registry/meridian/node/pki"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// A cluster of real processes for the bench's gateway and commit figures:
// `meridian serve` nodes and a `meridian gateway`, all started from the
// meridian binary, on 127.0.0.1:0 ports read from their ready files. They run
// as `meridian dev` runs its cluster: mutual TLS between members and
// encrypted gossip under a CA of their own (made as `meridian ca bootstrap`
// makes it), and authentication on the registry API.

// benchRegion is a region of a bench cluster and where its blobs live.
type benchRegion struct{ name, store string }

// benchClusterSpec says what to start: a node in each of nodeRegions (the
// first bootstraps the cluster), then a gateway in gatewayRegion.
type benchClusterSpec struct {
	id            string
	regions       []benchRegion
	nodeRegions   []string
	gatewayRegion string // "": no gateway
	mtls          bool
	// serveArgs are added to every node's flags.
	serveArgs []string
}

// memberReady is what `meridian serve` and `meridian gateway` write to
// their ready files.
type memberReady struct {
	NodeID     string `json:"node_id"`
	GatewayID  string `json:"gateway_id"`
	Region     string `json:"region"`
	HTTPAddr   string `json:"http_addr"`
	GRPCAddr   string `json:"grpc_addr"`
	GossipAddr string `json:"gossip_addr"`
}

// clusterMember is one running node or gateway.
type clusterMember struct {
	id    string
	dir   string   // of its ready file and log
	argv  []string // without --ready-file, to start it again
	proc  *process
	ready memberReady
	base  string // http://HOST:PORT of its registry API
}

// benchCluster is a running cluster.
type benchCluster struct {
	spec     benchClusterSpec
	dir      string
	pkiDir   string // "" without mTLS
	password string // the first admin's
	nodes    []*clusterMember
	gw       *clusterMember
}

// startBenchCluster starts spec's processes from meridian (the binary and
// the arguments before the subcommand) in dir and waits until the gateway has
// measured every node. On error, what was started is stopped.
func startBenchCluster(ctx context.Context, meridian []string, dir string, spec benchClusterSpec) (c *benchCluster, err error) {
	c = &benchCluster{spec: spec, dir: dir}
	defer func() {
		if err != nil {
			c.stop()
			c = nil
		}
	}()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	common := []string{"--cluster-id", spec.id, "--gossip-profile", "local", "--log-level", "warn"}
	for _, r := range spec.regions {
		common = append(common, "--region-store", r.name+"="+r.store)
	}
	ids := make([]string, len(spec.nodeRegions))
	for i := range ids {
		ids[i] = fmt.Sprintf("n%d", i)
	}
	plan := pkiPlan{clusterID: spec.id, adminPassword: true, members: []pki.IssueRequest{
		{Role: pki.RoleGateway, ID: "gateway"}, {Role: pki.RoleAdmin, ID: "bench-admin"}}}
	for _, id := range ids {
		plan.members = append(plan.members, pki.IssueRequest{Role: pki.RoleNode, ID: id})
	}
	c.pkiDir = filepath.Join(dir, "pki")
	if _, err := ensurePKI(c.pkiDir, plan); err != nil {
		return nil, fmt.Errorf("cluster certificates: %w", err)
	}
	pwFile := filepath.Join(c.pkiDir, node.AdminPasswordFileName)
	b, err := os.ReadFile(pwFile)
	if err != nil {
		return nil, err
	}
	c.password = strings.TrimSpace(string(b))
	secure := func(id string) []string {
		if !spec.mtls {
			return nil
		}
		return []string{"--tls-ca", filepath.Join(c.pkiDir, pki.CACertFile), "--tls-crl", filepath.Join(c.pkiDir, pki.CRLFile),
			"--tls-cert", filepath.Join(c.pkiDir, id+".crt"), "--tls-key", filepath.Join(c.pkiDir, id+".key"),
			"--gossip-key-file", filepath.Join(c.pkiDir, pki.GossipKeyFile)}
	}
	if !spec.mtls {
		c.pkiDir = ""
	}
	for i, region := range spec.nodeRegions {
		args := slices.Concat(meridian, []string{"serve", "--node-id", ids[i], "--region", region,
			"--data-dir", filepath.Join(dir, ids[i]), "--admin-password-file", pwFile,
			"--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0", "--raft-addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0"},
			common, secure(ids[i]), spec.serveArgs)
		if i > 0 {
			args = append(args, "--join", c.nodes[0].ready.GossipAddr)
		}
		m, err := startMember(ctx, ids[i], dir, args)
		if err != nil {
			return nil, err
		}
		c.nodes = append(c.nodes, m)
	}
	for _, m := range c.nodes {
		if err := waitHTTP(ctx, m.proc, m.base+"/readyz", http.StatusOK); err != nil {
			return nil, fmt.Errorf("%w%s", err, m.proc.logTail())
		}
	}
	if spec.gatewayRegion == "" {
		return c, nil
	}
	args := slices.Concat(meridian, []string{"gateway", "--gateway-id", "gateway", "--region", spec.gatewayRegion,
		"--http-addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0", "--join", c.nodes[0].ready.GossipAddr}, common, secure("gateway"))
	if !spec.mtls {
		// Without cluster TLS the gateway fetches the access state as an admin.
		args = append(args, "--username", benchAdmin, "--password-file", pwFile)
	}
	if c.gw, err = startMember(ctx, "gateway", dir, args); err != nil {
		return nil, err
	}
	if err := waitHTTP(ctx, c.gw.proc, c.gw.base+"/readyz", http.StatusOK); err != nil {
		return nil, fmt.Errorf("%w%s", err, c.gw.proc.logTail())
	}
	err = poll(ctx, c.gw.proc, "every node healthy and measured", func() error {
		st, err := c.gatewayStatus(ctx)
		if err != nil {
			return err
		}
		return everyNodeMeasured(st, len(c.nodes))
	})
	if err != nil {
		return nil, fmt.Errorf("%w%s", err, c.gw.proc.logTail())
	}
	return c, nil
}

// startMember runs argv with a ready file named after id in dir and waits
// until the file names its addresses.
func startMember(ctx context.Context, id, dir string, argv []string) (*clusterMember, error) {
	ready := filepath.Join(dir, id+".ready.json")
	os.Remove(ready)
	logPath := filepath.Join(dir, id+".log")
	if _, err := os.Stat(logPath); err == nil {
		os.Rename(logPath, logPath+"."+strconv.FormatInt(time.Now().UnixNano(), 10)) // a restart keeps the first run's log
	}
	p, err := startProcess(id, logPath, nil, append(slices.Clone(argv), "--ready-file", ready)...)
	if err != nil {
		return nil, err
	}
	m := &clusterMember{id: id, dir: dir, argv: argv, proc: p}
	err = poll(ctx, p, "the ready file", func() error {
		b, err := os.ReadFile(ready)
		if err != nil {
			return err
		}
		if err := json.Unmarshal(b, &m.ready); err != nil {
			return err
		}
		if m.ready.HTTPAddr == "" {
			return errors.New("no http_addr yet")
		}
		return nil
	})
	if err != nil {
		p.stop()
		return nil, fmt.Errorf("%w%s", err, p.logTail())
	}
	m.base = "http://" + m.ready.HTTPAddr
	return m, nil
}

// stop stops the gateway, then the nodes in reverse order; it reports the
// first that did not stop cleanly.
func (c *benchCluster) stop() error {
	var errs []error
	if c.gw != nil {
		errs = append(errs, c.gw.proc.stop())
	}
	for i := len(c.nodes) - 1; i >= 0; i-- {
		errs = append(errs, c.nodes[i].proc.stop())
	}
	return errors.Join(errs...)
}

// mtlsLabel says how the cluster's members talk to each other, for rows'
// details.
func (c *benchCluster) mtlsLabel() string {
	if c.spec.mtls && c.gw != nil {
		return "mTLS on between gateway and nodes, encrypted gossip"
	}
	if c.spec.mtls {
		return "mTLS on between nodes, encrypted gossip"
	}
	return "mTLS off"
}

// gatewayStatus is the gateway's view of the nodes (GET /status).
func (c *benchCluster) gatewayStatus(ctx context.Context) (*pb.GatewayStatus, error) {
	return fetchGatewayStatus(ctx, c.gw.base)
}

// fetchGatewayStatus GETs /status from the gateway at base.
func fetchGatewayStatus(ctx context.Context, base string) (*pb.GatewayStatus, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/status", nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /status: %s: %s", resp.Status, b)
	}
	st := &pb.GatewayStatus{}
	return st, protojson.UnmarshalOptions{DiscardUnknown: true}.Unmarshal(b, st)
}

// preferred is the node the gateway sends reads to now.
func (c *benchCluster) preferred(ctx context.Context) (*clusterMember, error) {
	st, err := c.gatewayStatus(ctx)
	if err != nil {
		return nil, err
	}
	for _, n := range c.nodes {
		if n.ready.NodeID == st.PreferredNode {
			return n, nil
		}
	}
	return nil, fmt.Errorf("the gateway prefers %q, which is none of the nodes", st.PreferredNode)
}

// clusterStatus asks the first node's admin API, as `meridian cluster
// status` does: with the admin certificate under mTLS, else as the admin
// user.
func (c *benchCluster) clusterStatus() (*pb.ClusterStatusResponse, error) {
	addr, timeout := c.nodes[0].ready.GRPCAddr, 15*time.Second
	var ca, cert, key, user, pwFile string
	if c.spec.mtls {
		ca, cert, key = filepath.Join(c.pkiDir, pki.CACertFile), filepath.Join(c.pkiDir, "bench-admin.crt"), filepath.Join(c.pkiDir, "bench-admin.key")
	} else {
		user, pwFile = benchAdmin, filepath.Join(c.dir, "pki", node.AdminPasswordFileName)
	}
	a := adminFlags{addr: &addr, timeout: &timeout, tlsCA: &ca, tlsCert: &cert, tlsKey: &key, username: &user, passwordFile: &pwFile}
	client, ctx, done, err := a.dial()
	if err != nil {
		return nil, err
	}
	defer done()
	return client.ClusterStatus(ctx, &pb.ClusterStatusRequest{})
}

// follower is a node that is not the Raft leader.
func (c *benchCluster) follower(ctx context.Context) (*clusterMember, string, error) {
	var found *clusterMember
	var leader string
	err := poll(ctx, c.nodes[0].proc, "a leader", func() error {
		st, err := c.clusterStatus()
		if err != nil {
			return err
		}
		if leader = st.LeaderId; leader == "" {
			return errors.New("no leader")
		}
		for _, n := range c.nodes {
			if n.ready.NodeID != leader {
				found = n
				return nil
			}
		}
		return fmt.Errorf("no node besides the leader %s", leader)
	})
	return found, leader, err
}

// waitReplicated waits until no region misses a blob, so that background
// copies do not compete with what is measured.
func (c *benchCluster) waitReplicated(ctx context.Context) error {
	return poll(ctx, c.nodes[0].proc, "every region holding every blob", func() error {
		st, err := c.clusterStatus()
		if err != nil {
			return err
		}
		for _, r := range st.Regions {
			if r.MissingBlobs > 0 {
				return fmt.Errorf("region %s misses %d blobs", r.Region, r.MissingBlobs)
			}
		}
		return nil
	})
}

// basicAuthFor is an Authorization value with the cluster admin's
// credentials.
func (c *benchCluster) basicAuth() string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(benchAdmin+":"+c.password))
}

// token fetches a registry token from base for scope, with the admin's
// credentials.
func (c *benchCluster) token(ctx context.Context, hc *http.Client, base, scope string) (string, error) {
	q := "scope=" + scope + "&service=" + c.spec.id
	tr, err := fetchToken(ctx, hc, base+"/auth/token?"+q, c.basicAuth())
	if err != nil {
		return "", err
	}
	return "Bearer " + tr.Token, nil
}

// adminClient is a client that sends the cluster admin's Basic credentials
// to base's host.
func (c *benchCluster) adminClient(base string, concurrency int) *http.Client {
	hc := newBenchClient(concurrency)
	host := strings.TrimPrefix(base, "http://")
	hc.Transport = basicAuth{host: host, user: benchAdmin, password: c.password, base: hc.Transport}
	return hc
}

// s3Server is a versitygw process serving a directory over S3.
type s3Server struct {
	proc           *process
	addr           string
	access, secret string
}

const benchBucket = "meridian"

// startVersitygw runs versitygw's posix backend on dir and creates the
// bench's bucket.
func startVersitygw(ctx context.Context, bin, dir string) (*s3Server, error) {
	data := filepath.Join(dir, "data")
	if err := os.MkdirAll(data, 0o755); err != nil {
		return nil, err
	}
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	s := &s3Server{addr: addr, access: "meridian-bench", secret: newSecret()}
	s.proc, err = startProcess("versitygw", filepath.Join(dir, "versitygw.log"),
		[]string{"ROOT_ACCESS_KEY=" + s.access, "ROOT_SECRET_KEY=" + s.secret}, bin, "--port", addr, "--quiet", "posix", data)
	if err != nil {
		return nil, err
	}
	if err := waitHTTP(ctx, s.proc, "http://"+addr+"/", 0); err != nil {
		s.proc.stop()
		return nil, err
	}
	mc, err := s.client()
	if err == nil {
		err = mc.MakeBucket(ctx, benchBucket, minio.MakeBucketOptions{Region: "us-east-1"})
	}
	if err != nil {
		s.proc.stop()
		return nil, fmt.Errorf("versitygw: creating the bucket: %w%s", err, s.proc.logTail())
	}
	return s, nil
}

func (s *s3Server) client() (*minio.Client, error) {
	return minio.New(s.addr, &minio.Options{Creds: credentials.NewStaticV4(s.access, s.secret, ""),
		Region: "us-east-1", BucketLookup: minio.BucketLookupPath})
}

// storeURL is the --region-store URL of the bench bucket.
func (s *s3Server) storeURL() string {
	return fmt.Sprintf("s3://%s:%s@%s/%s?secure=false", s.access, s.secret, s.addr, benchBucket)
}

// everyNodeMeasured says why a gateway is not yet ready to be measured:
// until it sees all nodes healthy, with a round-trip time each, and prefers
// one, its reads may go anywhere.
func everyNodeMeasured(st *pb.GatewayStatus, nodes int) error {
	healthy := 0
	for _, n := range st.Nodes {
		if n.Healthy && n.RttKnown {
			healthy++
		}
	}
	if healthy != nodes || st.PreferredNode == "" {
		return fmt.Errorf("%d of %d nodes healthy and measured, preferred %q", healthy, nodes, st.PreferredNode)
	}
	return nil
}
