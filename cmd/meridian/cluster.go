package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/meridian-registry/meridian/consensus"
	"github.com/meridian-registry/meridian/node/membership"
	"github.com/meridian-registry/meridian/node/pki"
	"github.com/meridian-registry/meridian/node/transport"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

const clusterUsage = `Usage:
  meridian cluster status [--addr HOST:PORT] [--json]
  meridian cluster transfer-leader [--addr HOST:PORT] [ID]
  meridian cluster remove [--addr HOST:PORT] ID
  meridian cluster gossip-key list [--addr HOST:PORT]
  meridian cluster gossip-key install [--addr HOST:PORT] [KEY]   (no KEY: a new one, printed)
  meridian cluster gossip-key use|remove [--addr HOST:PORT] KEY
  meridian cluster recover --data-dir DIR --node-id ID --server ID=RAFT_ADDR [--server …]

--addr is any node's gRPC address (default 127.0.0.1:5001). A cluster with
TLS wants an admin certificate: --tls-ca, --tls-cert, --tls-key (or
MERIDIAN_TLS_CA, MERIDIAN_TLS_CERT, MERIDIAN_TLS_KEY). recover runs on a
stopped node; see docs/operations.md.
`

func cluster(args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, clusterUsage)
		return errors.New("cluster: missing subcommand")
	}
	switch args[0] {
	case "status":
		return clusterStatus(args[1:])
	case "transfer-leader":
		return clusterTransfer(args[1:])
	case "remove":
		return clusterRemove(args[1:])
	case "gossip-key":
		return clusterGossipKey(args[1:])
	case "recover":
		return clusterRecover(args[1:])
	default:
		fmt.Fprint(os.Stderr, clusterUsage)
		return fmt.Errorf("cluster: unknown subcommand %q", args[0])
	}
}

// adminFlags are the flags every online cluster command takes.
type adminFlags struct {
	fs                     *flag.FlagSet
	addr                   *string
	timeout                *time.Duration
	tlsCA, tlsCert, tlsKey *string
	username, passwordFile *string
}

func newAdminFlags(name string) adminFlags {
	fs := flag.NewFlagSet("meridian cluster "+name, flag.ContinueOnError)
	return adminFlags{
		fs:      fs,
		addr:    fs.String("addr", envOr("MERIDIAN_ADDR", "127.0.0.1:5001"), "gRPC address of any node (env MERIDIAN_ADDR)"),
		timeout: fs.Duration("timeout", 15*time.Second, "how long to wait for an answer"),
		tlsCA:   fs.String("tls-ca", os.Getenv("MERIDIAN_TLS_CA"), "cluster CA certificate (env MERIDIAN_TLS_CA)"),
		tlsCert: fs.String("tls-cert", os.Getenv("MERIDIAN_TLS_CERT"), "admin certificate, from meridian ca issue --role admin (env MERIDIAN_TLS_CERT)"),
		tlsKey:  fs.String("tls-key", os.Getenv("MERIDIAN_TLS_KEY"), "admin certificate's key (env MERIDIAN_TLS_KEY)"),
		username: fs.String("username", os.Getenv("MERIDIAN_USERNAME"),
			"an admin user, for clusters without TLS (env MERIDIAN_USERNAME; password from --password-file or MERIDIAN_PASSWORD)"),
		passwordFile: fs.String("password-file", "", "file holding --username's password"),
	}
}

// basicCredentials sends an admin user's credentials with each call; a
// cluster without TLS requires them on admin methods (it listens on
// loopback only).
type basicCredentials struct{ header string }

func (b basicCredentials) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": b.header}, nil
}

func (basicCredentials) RequireTransportSecurity() bool { return false }

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

// dial connects to a node's Admin service, over mutual TLS when given a
// certificate.
func (a adminFlags) dial() (pb.AdminClient, context.Context, func(), error) {
	trust := &transport.Trust{}
	creds := trust.DialCredentials()
	switch {
	case *a.tlsCA != "" && *a.tlsCert == "" && *a.tlsKey == "" && *a.username != "":
		// An admin user on a TLS cluster: the CA to trust the node, the
		// credentials to prove who calls.
		cfg, err := pki.ClientConfigCAOnly(*a.tlsCA, "h2")
		if err != nil {
			return nil, nil, nil, err
		}
		creds = grpc.WithTransportCredentials(credentials.NewTLS(cfg))
	case *a.tlsCA != "" || *a.tlsCert != "" || *a.tlsKey != "":
		src, err := pki.Open(*a.tlsCA, *a.tlsCert, *a.tlsKey, nil)
		if err != nil {
			return nil, nil, nil, err
		}
		trust.Source = src
		creds = trust.DialCredentials()
	}
	opts := []grpc.DialOption{creds, grpc.WithUnaryInterceptor(hintTLS(*a.tlsCA != ""))}
	if *a.username != "" {
		pw, err := readPassword(*a.passwordFile)
		if err != nil {
			return nil, nil, nil, err
		}
		basic := base64.StdEncoding.EncodeToString([]byte(*a.username + ":" + pw))
		opts = append(opts, grpc.WithPerRPCCredentials(basicCredentials{"Basic " + basic}))
	}
	conn, err := grpc.NewClient(*a.addr, opts...)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("connect to %s: %w", *a.addr, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *a.timeout)
	return pb.NewAdminClient(conn), ctx, func() { cancel(); conn.Close() }, nil
}

func clusterStatus(args []string) error {
	a := newAdminFlags("status")
	asJSON := a.fs.Bool("json", false, "print JSON")
	if err := a.fs.Parse(args); err != nil {
		return err
	}
	c, ctx, done, err := a.dial()
	if err != nil {
		return err
	}
	defer done()
	st, err := c.ClusterStatus(ctx, &pb.ClusterStatusRequest{})
	if err != nil {
		return fmt.Errorf("cluster status from %s: %w", *a.addr, err)
	}
	if *asJSON {
		b, _ := protojson.MarshalOptions{Multiline: true, EmitUnpopulated: true}.Marshal(st)
		fmt.Println(string(b))
		return nil
	}
	leader := st.LeaderId
	if leader == "" {
		leader = "(none)"
	}
	fmt.Printf("cluster %s: leader %s, commit index %d (answered by %s)\n\n", st.ClusterId, leader, st.LeaderCommitIndex, st.AnsweredBy)
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "ID\tREGION\tROLE\tSUFFRAGE\tHEALTH\tRAFT\tAPPLIED\tLAG\tSTATE DIGEST\tVERSION\tLOG FORMAT\tHTTP")
	for _, m := range st.Members {
		raftState, applied, lag, digest, version, logFormat, http := "-", "-", "-", "-", "-", "-", "-"
		if s := m.Status; s != nil {
			raftState, applied = s.RaftState, fmt.Sprint(s.AppliedIndex)
			version, logFormat = dash(s.Version), fmt.Sprint(max(s.LogVersion, 1)) // binaries without the field apply format 1
			if st.LeaderCommitIndex >= s.AppliedIndex {
				lag = fmt.Sprint(st.LeaderCommitIndex - s.AppliedIndex)
			} else {
				lag = "0"
			}
			digest = fmt.Sprintf("%s@%d", hex.EncodeToString(s.StateDigest)[:min(12, 2*len(s.StateDigest))], s.StateDigestIndex)
			http = s.HttpAddr
		} else if m.Error != "" {
			raftState = "unreachable"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", m.Id, dash(m.Region), m.Role, m.Suffrage, m.Health, raftState, applied, lag, digest, version, logFormat, http)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	for _, m := range st.Members {
		g := m.Gateway
		if g == nil {
			continue
		}
		fmt.Printf("\ngateway %s (region %s) prefers %s:\n", m.Id, dash(g.Region), dash(g.PreferredNode))
		w = tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(w, "  NODE\tREGION\tRTT\tHEALTHY")
		for _, n := range g.Nodes {
			rtt := "-"
			if n.RttKnown {
				rtt = time.Duration(n.RttSeconds * float64(time.Second)).Round(10 * time.Microsecond).String()
			}
			fmt.Fprintf(w, "  %s\t%s\t%s\t%v\n", n.Id, dash(n.Region), rtt, n.Healthy)
		}
		if err := w.Flush(); err != nil {
			return err
		}
	}
	if len(st.Regions) > 0 {
		fmt.Println()
		w = tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(w, "REGION	MISSING BLOBS	MISSING BYTES	OLDEST MISSING")
		for _, r := range st.Regions {
			oldest := "-"
			if r.MissingBlobs > 0 {
				oldest = (time.Duration(r.OldestMissingSeconds * float64(time.Second))).Round(time.Millisecond).String()
			}
			fmt.Fprintf(w, "%s\t%d\t%d\t%s\n", r.Region, r.MissingBlobs, r.MissingBytes, oldest)
		}
		return w.Flush()
	}
	return nil
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func clusterTransfer(args []string) error {
	a := newAdminFlags("transfer-leader")
	if err := a.fs.Parse(args); err != nil {
		return err
	}
	if a.fs.NArg() > 1 {
		return errors.New("transfer-leader takes at most one node id")
	}
	c, ctx, done, err := a.dial()
	if err != nil {
		return err
	}
	defer done()
	resp, err := c.TransferLeadership(ctx, &pb.TransferLeadershipRequest{Id: a.fs.Arg(0)})
	if err != nil {
		return fmt.Errorf("transfer leadership: %w", err)
	}
	if err := resp.Result.Err(); err != nil {
		return fmt.Errorf("transfer leadership: %s", resultText(resp.Result))
	}
	fmt.Printf("leader is now %s\n", dash(resp.NewLeaderId))
	return nil
}

func clusterRemove(args []string) error {
	a := newAdminFlags("remove")
	if err := a.fs.Parse(args); err != nil {
		return err
	}
	if a.fs.NArg() != 1 {
		return errors.New("remove takes exactly one node id")
	}
	c, ctx, done, err := a.dial()
	if err != nil {
		return err
	}
	defer done()
	resp, err := c.RemoveServer(ctx, &pb.RemoveServerRequest{Id: a.fs.Arg(0)})
	if err != nil {
		return fmt.Errorf("remove %s: %w", a.fs.Arg(0), err)
	}
	if resp.Result.Err() != nil {
		return fmt.Errorf("remove %s: %s", a.fs.Arg(0), resultText(resp.Result))
	}
	fmt.Printf("removed %s from the cluster\n", a.fs.Arg(0))
	return nil
}

func resultText(r *pb.Result) string {
	if r.Detail != "" {
		return r.Detail
	}
	return strings.ToLower(strings.TrimPrefix(r.Code.String(), "CODE_"))
}

// clusterRecover rewrites a stopped node's Raft configuration after a lost
// quorum.
func clusterRecover(args []string) error {
	fs := flag.NewFlagSet("meridian cluster recover", flag.ContinueOnError)
	dataDir := fs.String("data-dir", "data", "data directory of the stopped node")
	nodeID := fs.String("node-id", "", "id of the node whose data this is")
	var servers []consensus.Server
	fs.Func("server", "ID=RAFT_ADDR of a surviving voter (repeat; include this node)", func(v string) error {
		id, addr, ok := strings.Cut(v, "=")
		if !ok || id == "" || addr == "" {
			return fmt.Errorf("want ID=RAFT_ADDR, got %q", v)
		}
		servers = append(servers, consensus.Server{ID: id, Address: addr, Voter: true})
		return nil
	})
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *nodeID == "" || len(servers) == 0 {
		return errors.New("recover needs --node-id and at least one --server")
	}
	found := false
	for _, s := range servers {
		found = found || s.ID == *nodeID
	}
	if !found {
		return fmt.Errorf("--server list must include this node (%s)", *nodeID)
	}
	cfg := consensus.DefaultConfig()
	cfg.NodeID, cfg.DataDir = *nodeID, *dataDir
	if err := consensus.Recover(cfg, servers); err != nil {
		return fmt.Errorf("recover: %w", err)
	}
	fmt.Printf("recovered %s: its Raft configuration is now %d voter(s); start the listed nodes\n", *nodeID, len(servers))
	return nil
}

// hintTLS explains the failure a plaintext client meets at a node that
// runs TLS: the connection closes before gRPC starts.
func hintTLS(secure bool) grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		return explainAdminError(invoker(ctx, method, req, reply, cc, opts...), secure)
	}
}

// explainAdminError adds what to do to the failures an admin command meets
// when its credentials do not fit the cluster.
func explainAdminError(err error, secure bool) error {
	if err != nil && !secure && status.Code(err) == codes.Unavailable {
		return status.Errorf(codes.Unavailable, "%s (if the cluster runs TLS, give an admin certificate: --tls-ca, --tls-cert, --tls-key or MERIDIAN_TLS_*)", status.Convert(err).Message())
	}
	if err != nil && status.Code(err) == codes.Unauthenticated && !strings.Contains(status.Convert(err).Message(), "MERIDIAN_USERNAME") {
		return fmt.Errorf("%s (an admin certificate, --tls-*, or an admin user: MERIDIAN_USERNAME and MERIDIAN_PASSWORD, or --username and --password-file)", status.Convert(err).Message())
	}
	return err
}

// clusterGossipKey changes or lists the gossip keyring of every member.
// Rotation: install a new key, use it, remove the old one; each step is
// answered by every live member, and each member rewrites its key file.
func clusterGossipKey(args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, clusterUsage)
		return errors.New("cluster gossip-key: want list, install, use or remove")
	}
	op := args[0]
	switch op {
	case "list", "install", "use", "remove":
	default:
		return fmt.Errorf("cluster gossip-key: unknown operation %q: want list, install, use or remove", op)
	}
	a := newAdminFlags("gossip-key " + op)
	positional, err := parseInterspersed(a.fs, args[1:])
	if err != nil {
		return err
	}
	var key []byte
	switch {
	case op == "list" && len(positional) == 0:
	case op == "install" && len(positional) == 0:
		key = make([]byte, 32)
		rand.Read(key)
		fmt.Printf("new gossip key: %s\n", membership.EncodeKey(key))
	case op != "list" && len(positional) == 1:
		if key, err = membership.DecodeKey(positional[0]); err != nil {
			return fmt.Errorf("cluster gossip-key %s: %w", op, err)
		}
	default:
		return fmt.Errorf("cluster gossip-key %s: unexpected arguments: %s", op, strings.Join(positional, " "))
	}
	c, ctx, done, err := a.dial()
	if err != nil {
		return err
	}
	defer done()
	resp, err := c.GossipKeyring(ctx, &pb.GossipKeyringRequest{Op: op, Key: key})
	failed := 0
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "MEMBER\tRESULT\tKEYS (primary first)")
	for _, m := range resp.GetMembers() {
		result := "ok"
		if m.Error != "" {
			result, failed = m.Error, failed+1
		}
		var keys []string
		for _, k := range m.Keys {
			keys = append(keys, membership.EncodeKey(k))
		}
		fmt.Fprintf(w, "%s\t%s\t%s\n", m.Id, result, strings.Join(keys, " "))
	}
	w.Flush()
	switch {
	case err != nil:
		return fmt.Errorf("gossip-key %s through %s: %w", op, *a.addr, err)
	case failed > 0:
		return fmt.Errorf("gossip-key %s: %d of %d members did not apply it; run it again once they are reachable", op, failed, len(resp.Members))
	}
	return nil
}

// parseInterspersed parses flags that may come before or after the
// positional arguments (KEY --addr X as well as --addr X KEY), and returns
// the positional ones.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			return positional, nil
		}
		positional = append(positional, fs.Arg(0))
		args = fs.Args()[1:]
	}
}
