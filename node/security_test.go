package node_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/hashicorp/raft"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/meridian-registry/meridian/node"
	"github.com/meridian-registry/meridian/node/clustertest"
	"github.com/meridian-registry/meridian/node/pki"
	"github.com/meridian-registry/meridian/node/transport"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// securePKI is a cluster CA with certificates issued on demand, and the
// cluster's gossip key file.
type securePKI struct {
	t       testing.TB
	dir     string
	cluster string
}

func newSecurePKI(t testing.TB, cluster string) *securePKI {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "ca")
	if err := pki.InitCA(dir, cluster); err != nil {
		t.Fatal(err)
	}
	return &securePKI{t: t, dir: dir, cluster: cluster}
}

func (p *securePKI) issue(role, id string) (cert, key string) {
	p.t.Helper()
	cert, key, err := pki.Issue(p.dir, pki.IssueRequest{Role: role, ID: id})
	if err != nil {
		p.t.Fatal(err)
	}
	return cert, key
}

// secure configures cfg as the member id of this PKI: TLS and gossip key.
func (p *securePKI) secure(cfg *node.Config) {
	cfg.TLSCert, cfg.TLSKey = p.issue(pki.RoleNode, cfg.NodeID)
	cfg.TLSCA = filepath.Join(p.dir, pki.CACertFile)
	cfg.GossipKeyFile = filepath.Join(p.dir, pki.GossipKeyFile)
}

func (p *securePKI) trust(role, id string) *transport.Trust {
	p.t.Helper()
	cert, key := p.issue(role, id)
	src, err := pki.Open(filepath.Join(p.dir, pki.CACertFile), cert, key, nil)
	if err != nil {
		p.t.Fatal(err)
	}
	return &transport.Trust{Source: src}
}

// newSecureCluster starts three nodes with mutual TLS and encrypted gossip.
func newSecureCluster(t *testing.T) (*clustertest.Cluster, *securePKI) {
	t.Helper()
	var p *securePKI
	c := clustertest.New(t, 3, clustertest.WithConfig(func(_ int, cfg *node.Config) {
		if p == nil {
			p = newSecurePKI(t, cfg.ClusterID)
		}
		p.secure(cfg)
	}))
	return c, p
}

func grpcClient(t *testing.T, addr string, creds grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, creds)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// A cluster with TLS and gossip encryption serves like any other: push
// through a follower, pull through every node, converge.
func TestSecureClusterPushPull(t *testing.T) {
	c, p := newSecureCluster(t)
	ctx := within(t, 2*time.Minute)
	leader := mustLeader(t, ctx, c)
	follower := (leader + 1) % 3
	img := randomImage(t, 2048, 2)
	if err := remote.Write(ref(t, c, follower, "secure/app:v1"), img, remoteOpts(ctx, c)...); err != nil {
		t.Fatalf("push through follower %d: %v", follower, err)
	}
	for i := range 3 {
		if err := pullAndCompare(ctx, c, i, "secure/app:v1", img); err != nil {
			t.Errorf("node %d: %v", i, err)
		}
	}
	if err := c.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}
	// An admin certificate reads the cluster's status.
	conn := grpcClient(t, c.Config(follower).GRPCAddr, p.trust(pki.RoleAdmin, "ops").DialCredentials())
	st, err := pb.NewAdminClient(conn).ClusterStatus(ctx, &pb.ClusterStatusRequest{})
	if err != nil || len(st.Members) != 3 {
		t.Fatalf("ClusterStatus with an admin certificate: %v, %v", st, err)
	}
}

// Probes of the gRPC port by callers without the right certificate.
func TestSecureClusterGRPCRefusesStrangers(t *testing.T) {
	c, p := newSecureCluster(t)
	ctx := within(t, 2*time.Minute)
	leader := mustLeader(t, ctx, c)
	addr := c.Config(leader).GRPCAddr
	other := newSecurePKI(t, p.cluster) // same cluster id, another CA

	call := func(creds grpc.DialOption, f func(*grpc.ClientConn) error) codes.Code {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		_ = cctx
		return status.Code(f(grpcClient(t, addr, creds)))
	}
	uploadKey := func(cc *grpc.ClientConn) error {
		_, err := pb.NewGatewayClient(cc).GetUploadKey(ctx, &pb.GetUploadKeyRequest{})
		return err
	}
	for _, tc := range []struct {
		name  string
		creds grpc.DialOption
		f     func(*grpc.ClientConn) error
		want  codes.Code
	}{
		{"no TLS asks for the upload key", grpc.WithTransportCredentials(insecure.NewCredentials()), uploadKey, codes.Unavailable},
		{"another CA's gateway asks for the upload key", other.trust(pki.RoleGateway, "gw").DialCredentials(), uploadKey, codes.Unavailable},
		{"gateway transfers leadership", p.trust(pki.RoleGateway, "gw").DialCredentials(), func(cc *grpc.ClientConn) error {
			_, err := pb.NewAdminClient(cc).TransferLeadership(ctx, &pb.TransferLeadershipRequest{})
			return err
		}, codes.PermissionDenied},
		{"gateway removes a server", p.trust(pki.RoleGateway, "gw").DialCredentials(), func(cc *grpc.ClientConn) error {
			_, err := pb.NewAdminClient(cc).RemoveServer(ctx, &pb.RemoveServerRequest{Id: c2id(leader)})
			return err
		}, codes.PermissionDenied},
		{"gateway sets a policy", p.trust(pki.RoleGateway, "gw").DialCredentials(), func(cc *grpc.ClientConn) error {
			_, err := pb.NewAdminClient(cc).SetPolicy(ctx, &pb.SetPolicyRequest{Policy: &pb.Policy{Prefix: "x/"}})
			return err
		}, codes.PermissionDenied},
		{"admin asks for the upload key", p.trust(pki.RoleAdmin, "ops").DialCredentials(), uploadKey, codes.PermissionDenied},
		{"gateway asks for the upload key", p.trust(pki.RoleGateway, "gw").DialCredentials(), uploadKey, codes.OK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := call(tc.creds, tc.f); got != tc.want {
				t.Errorf("%v, want %v", got, tc.want)
			}
		})
	}

	// The blob store: a gateway may write uploads but not delete blobs.
	bs := pb.NewBlobStoreClient(grpcClient(t, addr, p.trust(pki.RoleGateway, "gw2").DialCredentials()))
	if _, err := bs.Delete(ctx, &pb.DeleteBlobRequest{Region: c.Config(leader).Region, Digest: "sha256:" + strings.Repeat("0", 64)}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("gateway deletes a blob: %v, want PermissionDenied", err)
	}
	if _, err := bs.PurgeUploads(ctx, &pb.PurgeUploadsRequest{Region: c.Config(leader).Region, OlderThanUnixNano: time.Now().Add(time.Hour).UnixNano()}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("gateway purges uploads: %v, want PermissionDenied", err)
	}
	// After all that, the leader is still the leader of a working cluster.
	if l := mustLeader(t, ctx, c); l != leader {
		t.Errorf("leadership moved from node %d to %d", leader, l)
	}
}

func c2id(i int) string { return fmt.Sprintf("node-%d", i) }

// The gRPC services split by caller role, probed as the holder of a stolen
// certificate would: every method of Member, Gateway and Admin is called
// with a real client under a node, a gateway and an admin certificate. A
// gateway certificate gets PermissionDenied from every Admin and Member
// method. The methods come from the service descriptors, so a method added
// later is probed too; the expectations are written out here, not read
// from the node's access table, so a change to the table shows.
func TestServicesAdmitTheirRolesOnly(t *testing.T) {
	c, p := newSecureCluster(t)
	ctx := within(t, 3*time.Minute)
	leader := mustLeader(t, ctx, c)
	addr := c.Config(leader).GRPCAddr
	callers := map[string]*grpc.ClientConn{
		pki.RoleNode:    grpcClient(t, addr, p.trust(pki.RoleNode, "node-9").DialCredentials()),
		pki.RoleGateway: grpcClient(t, addr, p.trust(pki.RoleGateway, "gw").DialCredentials()),
		pki.RoleAdmin:   grpcClient(t, addr, p.trust(pki.RoleAdmin, "ops").DialCredentials()),
	}
	allowed := func(service, method, role string) bool {
		switch {
		case service == "Member":
			return role == pki.RoleNode
		case service == "Gateway" && method == "GetAccessState":
			return true
		case service == "Gateway":
			return role != pki.RoleAdmin
		case method == "GossipKeyring" || method == "Scrub" || method == "Backup":
			return role == pki.RoleAdmin
		default: // Admin
			return role != pki.RoleGateway
		}
	}
	// Requests that change nothing when let through; any other method gets
	// an empty one. Only whether the transport refused the call matters.
	requests := map[string]proto.Message{
		"TransferLeadership": &pb.TransferLeadershipRequest{Id: "no-such-node"},
		"RemoveServer":       &pb.RemoveServerRequest{Id: "no-such-node"},
		"DeletePolicy":       &pb.DeletePolicyRequest{Prefix: "no/such/prefix"},
		"GossipKeyring":      &pb.GossipKeyringRequest{Op: "list"},
	}
	for _, sd := range []grpc.ServiceDesc{pb.Member_ServiceDesc, pb.Gateway_ServiceDesc, pb.Admin_ServiceDesc} {
		service := strings.TrimPrefix(sd.ServiceName, "meridian.v1.")
		for _, m := range sd.Methods {
			for role, conn := range callers {
				t.Run(service+"/"+m.MethodName+"/"+role, func(t *testing.T) {
					req, ok := requests[m.MethodName]
					if !ok {
						req = &emptypb.Empty{}
					}
					timeout := 20 * time.Second
					if m.MethodName == "WaitBlobPlaced" {
						// It waits for a blob nobody places and answers
						// "not yet" just before the deadline.
						timeout = 2 * time.Second
					}
					cctx, cancel := context.WithTimeout(ctx, timeout)
					defer cancel()
					err := conn.Invoke(cctx, "/"+sd.ServiceName+"/"+m.MethodName, req, &emptypb.Empty{})
					code := status.Code(err)
					refused := code == codes.PermissionDenied || code == codes.Unauthenticated
					switch want := allowed(service, m.MethodName, role); {
					case want && refused:
						t.Errorf("refused to a %s certificate: %v", role, err)
					case !want && code != codes.PermissionDenied:
						t.Errorf("a %s certificate got %v (%v), want PermissionDenied", role, code, err)
					}
				})
			}
		}
	}
	// Streaming methods: the transport's answer comes with the first
	// message.
	for _, sd := range []grpc.ServiceDesc{pb.Member_ServiceDesc, pb.Gateway_ServiceDesc, pb.Admin_ServiceDesc} {
		service := strings.TrimPrefix(sd.ServiceName, "meridian.v1.")
		for _, sm := range sd.Streams {
			for role, conn := range callers {
				t.Run(service+"/"+sm.StreamName+"/"+role, func(t *testing.T) {
					cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
					defer cancel()
					desc := sm
					st, err := conn.NewStream(cctx, &desc, "/"+sd.ServiceName+"/"+sm.StreamName)
					if err == nil {
						if err = st.SendMsg(&emptypb.Empty{}); err == nil {
							st.CloseSend()
							err = st.RecvMsg(&emptypb.Empty{})
						}
					}
					code := status.Code(err)
					refused := code == codes.PermissionDenied || code == codes.Unauthenticated
					switch want := allowed(service, sm.StreamName, role); {
					case want && refused:
						t.Errorf("refused to a %s certificate: %v", role, err)
					case want && err != nil:
						t.Errorf("a %s certificate: %v", role, err)
					case !want && code != codes.PermissionDenied:
						t.Errorf("a %s certificate got %v (%v), want PermissionDenied", role, code, err)
					}
				})
			}
		}
	}
	if len(pb.Admin_ServiceDesc.Streams) == 0 {
		t.Fatal("the Admin service has no streaming method: the loop above probed nothing")
	}
	// The probes moved nothing.
	if l := mustLeader(t, ctx, c); l != leader {
		t.Errorf("leadership moved from node %d to %d", leader, l)
	}
}

// A plain Raft client, as hashicorp/raft itself would dial, cannot get a
// heartbeat with a higher term or a forged entry into the cluster.
func TestSecureClusterRaftRefusesStrangers(t *testing.T) {
	c, _ := newSecureCluster(t)
	ctx := within(t, 2*time.Minute)
	leader := mustLeader(t, ctx, c)
	target := (leader + 1) % 3
	termBefore := c.Node(target).Consensus().Stats().Term

	trans, err := raft.NewTCPTransport("127.0.0.1:0", nil, 1, 5*time.Second, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	defer trans.Close()
	req := raft.AppendEntriesRequest{
		RPCHeader: raft.RPCHeader{ID: []byte("rogue"), Addr: []byte(trans.LocalAddr())},
		Term:      termBefore + 1000, Leader: []byte(trans.LocalAddr()),
		Entries: []*raft.Log{{Index: 1 << 30, Term: termBefore + 1000, Type: raft.LogCommand, Data: []byte("forged")}},
	}
	var resp raft.AppendEntriesResponse
	addr := raft.ServerAddress(c.Config(target).RaftAddr)
	if err := trans.AppendEntries("node-x", addr, &req, &resp); err == nil {
		t.Fatalf("a plaintext AppendEntries with term %d was answered: %+v", req.Term, resp)
	}
	if term := c.Node(target).Consensus().Stats().Term; term >= termBefore+1000 {
		t.Errorf("the node took the stranger's term: %d", term)
	}
	// The cluster still writes.
	if err := remote.Write(ref(t, c, leader, "raft/after:v1"), randomImage(t, 256, 1), remoteOpts(ctx, c)...); err != nil {
		t.Fatalf("push after the probe: %v", err)
	}
}

// Nodes that cannot prove who they are do not become members.
func TestSecureClusterRefusesRogueNodes(t *testing.T) {
	c, p := newSecureCluster(t)
	ctx := within(t, 3*time.Minute)
	if err := c.WaitVoters(ctx, 3); err != nil {
		t.Fatal(err)
	}
	joinAttempt := func(cfg *node.Config) {
		cfg.JoinTimeout = 5 * time.Second
		cfg.Voters = 3
	}

	t.Run("no certificate, no gossip key", func(t *testing.T) {
		_, err := c.Add(func(cfg *node.Config) {
			joinAttempt(cfg)
			cfg.TLSCA, cfg.TLSCert, cfg.TLSKey, cfg.GossipKeyFile = "", "", "", ""
		})
		if err == nil {
			t.Fatal("a node without certificate or gossip key joined")
		}
	})
	t.Run("a certificate naming another node", func(t *testing.T) {
		_, err := c.Add(func(cfg *node.Config) {
			joinAttempt(cfg)
			cfg.TLSCert, cfg.TLSKey = p.issue(pki.RoleNode, "node-0")
		})
		if err == nil || !strings.Contains(err.Error(), "node_id") {
			t.Fatalf("a node with another node's certificate started: %v", err)
		}
	})
	t.Run("the gossip key and another CA's certificate", func(t *testing.T) {
		// It gets into gossip, which the key opens, but the leader finds
		// no certificate of this cluster on its Raft port and never adds it.
		rogue := newSecurePKI(t, p.cluster)
		i, err := c.Add(func(cfg *node.Config) {
			joinAttempt(cfg)
			cfg.TLSCert, cfg.TLSKey = rogue.issue(pki.RoleNode, cfg.NodeID)
			cfg.TLSCA = filepath.Join(rogue.dir, pki.CACertFile)
		})
		if err != nil {
			t.Fatalf("start: %v", err) // a node with state-free join may fail to be added, not to start
		}
		id := c.Config(i).NodeID
		l := c.Node(mustLeader(t, ctx, c))
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			if _, ok := l.Membership().Member(id); ok {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if _, ok := l.Membership().Member(id); !ok {
			t.Fatalf("the rogue node never reached gossip; the test would prove nothing")
		}
		// Several reconcile rounds (one a second).
		time.Sleep(4 * time.Second)
		servers, err := l.Consensus().Servers()
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range servers {
			if s.ID == id {
				t.Fatalf("the rogue node %s was added to Raft: %+v", id, servers)
			}
		}
		c.Stop(i)
	})
}

// Keep the members' data out of other users' reach: every directory the
// node makes is 0700, so no other user can reach a file inside whatever
// its mode (the binary also runs with umask 077; see the e2e test).
func TestDataFilesPrivate(t *testing.T) {
	c := clustertest.New(t, 1)
	ctx := within(t, time.Minute)
	if err := remote.Write(ref(t, c, 0, "perm/app:v1"), randomImage(t, 256, 1), remoteOpts(ctx, c)...); err != nil {
		t.Fatal(err)
	}
	dir := c.Config(0).DataDir
	for _, d := range []string{dir, filepath.Join(dir, "state"), filepath.Join(dir, "raft"), filepath.Join(dir, "snapshots")} {
		st, err := os.Stat(d)
		if err != nil {
			t.Fatal(err)
		}
		want := os.FileMode(0o700)
		if !st.IsDir() {
			want = 0o600
		}
		if perm := st.Mode().Perm(); perm != want {
			t.Errorf("%s has mode %v, want %v", d, perm, want)
		}
	}
	var err error
	if err != nil {
		t.Error(err)
	}
}

// What a gateway sends is an intent the node checks field by field; no
// call commits a raw log entry. Malformed intents are refused with
// INVALID_ARGUMENT and the cluster keeps serving; intents only nodes may
// send are refused to a gateway certificate.
func TestCommitValidatesIntents(t *testing.T) {
	c, p := newSecureCluster(t)
	ctx := within(t, 2*time.Minute)
	leader := mustLeader(t, ctx, c)
	follower := (leader + 1) % 3
	conn := grpcClient(t, c.Config(follower).GRPCAddr, p.trust(pki.RoleGateway, "gw").DialCredentials())
	commit := func(cmd *pb.Command, forwarded bool) (*pb.CommitResponse, error) {
		if forwarded {
			return pb.NewMemberClient(conn).Forward(ctx, &pb.CommitRequest{Command: cmd})
		}
		return pb.NewGatewayClient(conn).Commit(ctx, &pb.CommitRequest{Command: cmd})
	}
	good := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}`)
	goodDigest := "sha256:" + fmt.Sprintf("%x", sha256.Sum256(good))
	huge := bytes.Repeat([]byte(" "), int(node.DefaultConfig().MaxManifestSize)+1)
	manifest := func(f func(*pb.PutManifest)) *pb.Command {
		m := &pb.PutManifest{Repository: "ok/repo", Digest: goodDigest, MediaType: "application/vnd.oci.image.manifest.v1+json", Content: good}
		f(m)
		return &pb.Command{Intent: &pb.Command_PutManifest{PutManifest: m}}
	}
	link := func(repo, dgst string) *pb.Command {
		return &pb.Command{Intent: &pb.Command_LinkBlob{LinkBlob: &pb.LinkBlob{Repository: repo, Digest: dgst, Size: 1}}}
	}
	for name, cmd := range map[string]*pb.Command{
		"no intent":                 {},
		"repository with NUL":       manifest(func(m *pb.PutManifest) { m.Repository = "a\x00b" }),
		"repository with ..":        manifest(func(m *pb.PutManifest) { m.Repository = "a/../b" }),
		"made-up digest":            manifest(func(m *pb.PutManifest) { m.Digest = "sha256:" + strings.Repeat("ab", 32) }),
		"malformed digest":          manifest(func(m *pb.PutManifest) { m.Digest = "sha256:xyz" }),
		"manifest past the limit":   manifest(func(m *pb.PutManifest) { m.Content = huge; m.Digest = fmt.Sprintf("sha256:%x", sha256.Sum256(huge)) }),
		"bad tag":                   manifest(func(m *pb.PutManifest) { m.Tags = []string{"-nope"} }),
		"control chars in media":    manifest(func(m *pb.PutManifest) { m.MediaType = "a/b\n" }),
		"link with a bad name":      link("UPPER/case", goodDigest),
		"link with a bad digest":    link("ok/repo", "md5:abc"),
		"link to an unknown region": {Intent: &pb.Command_LinkBlob{LinkBlob: &pb.LinkBlob{Repository: "ok/repo", Digest: goodDigest, PlacedRegion: "mars"}}},
	} {
		resp, err := commit(cmd, false)
		if err != nil || resp.GetResult().GetCode() != pb.Code_CODE_INVALID_ARGUMENT {
			t.Errorf("%s: %v, %v; want INVALID_ARGUMENT", name, resp.GetResult(), err)
		}
	}
	for name, cmd := range map[string]*pb.Command{
		"place a blob":        {Intent: &pb.Command_PlaceBlob{PlaceBlob: &pb.PlaceBlob{Digest: goodDigest, Size: 1, Region: c.Config(0).Region}}},
		"set a policy":        {Intent: &pb.Command_SetPolicy{SetPolicy: &pb.SetPolicy{Policy: &pb.Policy{Prefix: "x/"}}}},
		"set regions":         {Intent: &pb.Command_SetRegions{SetRegions: &pb.SetRegions{Regions: []string{"a"}}}},
		"delete policy":       {Intent: &pb.Command_DeletePolicy{DeletePolicy: &pb.DeletePolicy{Prefix: ""}}},
		"delete a repository": {Intent: &pb.Command_DeleteRepository{DeleteRepository: &pb.DeleteRepository{Repository: "ok/repo"}}},
		"remove a blob":       {Intent: &pb.Command_BlobRemoved{BlobRemoved: &pb.BlobRemoved{Digest: goodDigest, Region: c.Config(0).Region}}},
		"set a quota":         {Intent: &pb.Command_SetQuota{SetQuota: &pb.SetQuota{Quota: &pb.Quota{MaxTags: 1}}}},
		"lift immutability": {Intent: &pb.Command_DeleteImmutableRule{DeleteImmutableRule: &pb.DeleteImmutableRule{
			Rule: &pb.ImmutableRule{Tags: "*"}}}},
		"set a retention rule": {Intent: &pb.Command_SetRetentionRule{SetRetentionRule: &pb.SetRetentionRule{
			Rule: &pb.RetentionRule{KeepTags: 1}}}},
	} {
		if _, err := commit(cmd, false); status.Code(err) != codes.PermissionDenied {
			t.Errorf("gateway: %s: %v, want PermissionDenied", name, err)
		}
	}
	if _, err := commit(manifest(func(*pb.PutManifest) {}), true); status.Code(err) != codes.PermissionDenied {
		t.Errorf("gateway forwarding a write as a node would: %v, want PermissionDenied", err)
	}

	// None of it reached the state, and the cluster still takes a valid
	// push through the same node.
	if err := c.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if repos, err := c.Node(i).Consensus().Store().Repositories(ctx, "", 100); err != nil || len(repos) != 0 {
			t.Errorf("node %d holds repositories %v (%v) after refused commands", i, repos, err)
		}
	}
	if err := remote.Write(ref(t, c, follower, "after/refusals:v1"), randomImage(t, 256, 1), remoteOpts(ctx, c)...); err != nil {
		t.Fatalf("push after the refused commands: %v", err)
	}
}

// The leader rotates the upload-token key on schedule; a session begun
// under an old key keeps going across rotations, on any node, and
// completes.
func TestUploadKeyRotation(t *testing.T) {
	c := clustertest.New(t, 3, clustertest.WithConfig(func(_ int, cfg *node.Config) {
		cfg.UploadKeyRotation = time.Second
	}))
	ctx := within(t, 2*time.Minute)
	client := c.Client()
	post, err := client.Post(c.URL(0)+"/v2/rot/app/blobs/uploads/", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	post.Body.Close()
	loc := post.Header.Get("Location")
	if post.StatusCode != 202 || loc == "" {
		t.Fatalf("POST: %s", post.Status)
	}
	first, err := c.Node(0).Consensus().Store().UploadKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, "two more rotations", func() bool {
		keys, err := c.Node(0).Consensus().Store().UploadKeys(ctx)
		return err == nil && len(keys) > 0 && keys[len(keys)-1].Id >= first[len(first)-1].Id+2
	})
	content := []byte("bytes sent across key rotations")
	for i, chunk := range [][]byte{content[:10], content[10:]} {
		via := (i + 1) % 3
		req, _ := http.NewRequestWithContext(ctx, http.MethodPatch, c.URL(via)+loc, bytes.NewReader(chunk))
		req.Header.Set("Content-Range", fmt.Sprintf("%d-%d", i*10, i*10+len(chunk)-1))
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusAccepted {
			t.Fatalf("PATCH %d through node %d with a token of an older key: %s", i, via, resp.Status)
		}
		loc = resp.Header.Get("Location")
	}
	dgst := fmt.Sprintf("sha256:%x", sha256.Sum256(content))
	req, _ := http.NewRequestWithContext(ctx, http.MethodPut, c.URL(2)+loc+"?digest="+dgst, nil)
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("PUT after rotations: %s", resp.Status)
	}
}
