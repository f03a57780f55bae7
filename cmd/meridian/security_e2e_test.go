package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/meridian-registry/meridian/node/clustertest/admin"
	"github.com/meridian-registry/meridian/node/pki"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// e2eMeridian runs a short meridian command and fails the test if it fails.
func e2eMeridian(t testing.TB, args ...string) {
	t.Helper()
	cmd := exec.Command(e2eBinary, args...)
	cmd.Env = e2eEnv()
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("meridian %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// secE2E is a cluster of real processes running with the trust settings a
// production cluster has: a CA made with `meridian ca`, mutual TLS, an
// encrypted gossip keyring.
type secE2E struct {
	t       *testing.T
	dir     string
	pki     string
	common  []string // flags every member takes
	nodes   []*e2eProc
	gateway *e2eProc
}

// run runs a short meridian command with env and returns its output.
func (s *secE2E) run(env []string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, e2eBinary, args...)
	cmd.Env = e2eEnv(env...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (s *secE2E) mustRun(args ...string) string {
	s.t.Helper()
	out, err := s.run(nil, args...)
	if err != nil {
		s.t.Fatalf("meridian %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// tlsFlags are the flags naming the CA and the certificate of id.
func (s *secE2E) tlsFlags(id string) []string {
	return []string{"--tls-ca", filepath.Join(s.pki, "ca.crt"),
		"--tls-cert", filepath.Join(s.pki, id+".crt"), "--tls-key", filepath.Join(s.pki, id+".key")}
}

// memberFlags are a node's or gateway's trust flags: tlsFlags and the
// CA's revocation list, which members re-read when it changes.
func (s *secE2E) memberFlags(id string) []string {
	return append(s.tlsFlags(id), "--tls-crl", filepath.Join(s.pki, "ca.crl"))
}

func startSecE2E(t *testing.T) *secE2E {
	e2eNeedBinary(t)
	s := &secE2E{t: t, dir: t.TempDir()}
	s.pki = filepath.Join(s.dir, "pki")
	s.mustRun("ca", "init", "--dir", s.pki, "--cluster-id", "sece2e")
	for _, c := range [][2]string{{"node", "n0"}, {"node", "n1"}, {"node", "n2"}, {"gateway", "gw"}, {"admin", "ops"}} {
		s.mustRun("ca", "issue", "--dir", s.pki, "--role", c[0], "--id", c[1])
	}
	regions := []string{"--region-store", "east=file://" + filepath.Join(s.dir, "blobs", "east"),
		"--region-store", "west=file://" + filepath.Join(s.dir, "blobs", "west")}
	s.common = slices.Concat(regions, []string{"--cluster-id", "sece2e", "--gossip-profile", "local",
		"--gossip-key-file", filepath.Join(s.pki, "gossip.key")})
	for i := range 3 {
		id := fmt.Sprintf("n%d", i)
		region := []string{"east", "west", "west"}[i]
		args := slices.Concat([]string{"serve", "--node-id", id, "--region", region, "--data-dir", filepath.Join(s.dir, id)},
			e2eLoopback, s.common, s.memberFlags(id))
		if i > 0 {
			args = append(args, "--join", s.nodes[0].ready.GossipAddr)
		}
		p := gwe2eStart(t, id, s.dir, args...)
		if i == 0 {
			p.waitWritten()
		}
		s.nodes = append(s.nodes, p)
	}
	for _, p := range s.nodes {
		p.waitReady()
	}
	s.gateway = gwe2eStart(t, "gw", s.dir, slices.Concat([]string{"gateway", "--gateway-id", "gw", "--region", "east",
		"--http-addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0", "--join", s.nodes[0].ready.GossipAddr},
		s.common, s.memberFlags("gw"))...)
	s.gateway.waitReady()
	return s
}

// status asks a node for the cluster status as the given member.
func (s *secE2E) status(id string) (*pb.ClusterStatusResponse, string, error) {
	args := append([]string{"cluster", "status", "--json", "--timeout", "5s", "--addr", s.nodes[0].ready.GRPCAddr}, s.tlsFlags(id)...)
	if id == "" {
		args = args[:7]
	}
	out, err := s.run(nil, args...)
	if err != nil {
		return nil, out, err
	}
	st := &pb.ClusterStatusResponse{}
	if err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal([]byte(out), st); err != nil {
		return nil, out, err
	}
	return st, out, nil
}

// A cluster of `meridian serve` and `meridian gateway` processes with
// certificates from `meridian ca` and an encrypted gossip keyring serves
// pushes and pulls; only the admin certificate reads its status; a rogue
// process without the key does not get in; everything written is private.
func TestSecureClusterBinary(t *testing.T) {
	s := startSecE2E(t)

	img, err := random.Image(2048, 2)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(s.gateway.ref("secure/app:v1"), img); err != nil {
		t.Fatalf("push through the gateway: %v", err)
	}
	e2eCheckImage(t, s.nodes[2].ref("secure/app:v1"), img)

	st, out, err := s.status("ops")
	if err != nil {
		t.Fatalf("cluster status with the admin certificate: %v\n%s", err, out)
	}
	if len(st.Members) != 4 {
		t.Errorf("cluster status lists %d members, want 3 nodes and the gateway:\n%s", len(st.Members), out)
	}
	if _, out, err := s.status("gw"); err == nil || !strings.Contains(out, "PermissionDenied") {
		t.Errorf("cluster status with the gateway's certificate: %v\n%s", err, out)
	}
	if _, out, err := s.status(""); err == nil || !strings.Contains(out, "TLS") {
		t.Errorf("cluster status without a certificate: %v\n%s", err, out)
	}

	// A rogue node on the same machine, told where the cluster gossips,
	// without certificate or gossip key: it cannot join, and gives up.
	rogueDir := filepath.Join(s.dir, "rogue")
	rogue := gwe2eStart(t, "rogue", s.dir, slices.Concat([]string{"serve", "--node-id", "rogue", "--region", "east",
		"--data-dir", rogueDir, "--join", s.nodes[0].ready.GossipAddr, "--join-timeout", "5s"},
		e2eLoopback, s.common[:len(s.common)-2])...)
	select {
	case <-rogue.exited:
		if rogue.cmd.ProcessState.ExitCode() == 0 {
			t.Errorf("the rogue node exited 0:\n%s", rogue.logTail())
		}
	case <-time.After(time.Minute):
		t.Fatalf("the rogue node still runs a minute after its 5s join timeout:\n%s", rogue.logTail())
	}
	st, out, err = s.status("ops")
	if err != nil {
		t.Fatalf("cluster status: %v\n%s", err, out)
	}
	for _, m := range st.Members {
		if m.Id == "rogue" {
			t.Errorf("the rogue node is a member:\n%s", out)
		}
	}

	// Everything the node wrote is its own user's alone.
	err = filepath.WalkDir(filepath.Join(s.dir, "n0"), func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		if perm := info.Mode().Perm(); perm&0o077 != 0 {
			return fmt.Errorf("%s has mode %v", path, perm)
		}
		return nil
	})
	if err != nil {
		t.Errorf("a data file is open to other users: %v", err)
	}
	if info, err := os.Stat(filepath.Join(s.pki, "ca.key")); err != nil || info.Mode().Perm() != 0o600 {
		t.Errorf("ca.key: %v, %v", info.Mode(), err)
	}
}

// Member ports beyond loopback need TLS and a gossip key, or the flag that
// says the operator accepts the risk.
func TestServeRefusesOpenPlaintextListeners(t *testing.T) {
	e2eNeedBinary(t)
	dir := t.TempDir()
	args := []string{"serve", "--node-id", "open", "--data-dir", filepath.Join(dir, "data"),
		"--http-addr", "127.0.0.1:0", "--grpc-addr", "0.0.0.0:0", "--raft-addr", "127.0.0.1:0", "--gossip-addr", "127.0.0.1:0"}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, e2eBinary, args...)
	cmd.Env = e2eEnv()
	out, err := cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "grpc_addr") || !strings.Contains(string(out), "--insecure-cluster") {
		t.Fatalf("serve with a plaintext gRPC port on 0.0.0.0: %v\n%s", err, out)
	}

	p := gwe2eStart(t, "open", dir, append(args, "--insecure-cluster")...)
	p.waitReady()
	p.stop()
	if log := p.logTail(); !strings.Contains(log, "insecure-cluster") || !strings.Contains(log, "WARN") {
		t.Errorf("--insecure-cluster started without a warning:\n%s", log)
	}
}

// The OCI port over HTTPS: a client that trusts the cluster CA pushes and
// pulls over HTTP/2, a renewed certificate is served without a restart,
// and plain HTTP gets nowhere.
func TestServeHTTPS(t *testing.T) {
	e2eNeedBinary(t)
	dir := t.TempDir()
	pkiDir := filepath.Join(dir, "pki")
	run := func(args ...string) { t.Helper(); e2eMeridian(t, args...) }
	run("ca", "init", "--dir", pkiDir)
	run("ca", "issue", "--dir", pkiDir, "--role", "node", "--id", "web", "--ip", "127.0.0.1", "--dns", "localhost")
	ready := filepath.Join(dir, "ready.json")
	p := e2eStart(t, ready, e2eEnv(), slices.Concat([]string{"serve", "--node-id", "web", "--data-dir", filepath.Join(dir, "data"),
		"--ready-file", ready, "--http-tls-cert", filepath.Join(pkiDir, "web.crt"), "--http-tls-key", filepath.Join(pkiDir, "web.key")},
		e2eLoopback)...)
	p.waitWritten()

	caPEM, err := os.ReadFile(filepath.Join(pkiDir, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}, ForceAttemptHTTP2: true}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	base := "https://" + p.ready.HTTPAddr
	var served *x509.Certificate
	p.poll("/readyz over HTTPS", time.Minute, func() error {
		resp, err := client.Get(base + "/readyz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s", resp.Status)
		}
		if resp.Proto != "HTTP/2.0" {
			t.Errorf("protocol %s, want HTTP/2.0", resp.Proto)
		}
		served = resp.TLS.PeerCertificates[0]
		return nil
	})

	ref, err := name.ParseReference(p.ready.HTTPAddr + "/secure/https:v1")
	if err != nil {
		t.Fatal(err)
	}
	img, err := random.Image(4096, 2)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img, remote.WithTransport(admin.Transport(tr))); err != nil {
		t.Fatalf("push over HTTPS: %v", err)
	}
	got, err := remote.Image(ref, remote.WithTransport(admin.Transport(tr)))
	if err != nil {
		t.Fatalf("pull over HTTPS: %v", err)
	}
	if gd, _ := got.Digest(); gd != mustImageDigest(t, img) {
		t.Errorf("pulled %s", gd)
	}

	// Plain HTTP on the HTTPS port is refused.
	if resp, err := http.Get("http://" + p.ready.HTTPAddr + "/v2/"); err == nil {
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Error("plain HTTP got 200 from the HTTPS port")
		}
	}

	// Renew the certificate in place: new connections get the new one.
	run("ca", "issue", "--dir", pkiDir, "--role", "node", "--id", "web", "--ip", "127.0.0.1", "--validity", "48h")
	p.poll("the renewed certificate", 30*time.Second, func() error {
		tr.CloseIdleConnections()
		resp, err := client.Get(base + "/v2/")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if now := resp.TLS.PeerCertificates[0]; now.SerialNumber.Cmp(served.SerialNumber) == 0 {
			return fmt.Errorf("still serial %s", now.SerialNumber)
		}
		return nil
	})
	p.stop()
}

func mustImageDigest(t *testing.T, img interface{ Digest() (v1.Hash, error) }) v1.Hash {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// Rotating the gossip key online: install a new key, use it, remove the
// old one, each step through one node and answered by every member; the
// key file is rewritten, so a node restarted afterwards rejoins, while a
// process holding only the old key cannot.
func TestGossipKeyRotationBinary(t *testing.T) {
	s := startSecE2E(t)
	keyFile := filepath.Join(s.pki, "gossip.key")
	oldKey, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	admin := func(args ...string) string {
		t.Helper()
		out, err := s.run(nil, slices.Concat([]string{"cluster", "gossip-key"}, args, []string{"--addr", s.nodes[1].ready.GRPCAddr}, s.tlsFlags("ops"))...)
		if err != nil {
			t.Fatalf("gossip-key %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}
	out := admin("install")
	newKey := strings.TrimSpace(strings.TrimPrefix(strings.SplitN(out, "\n", 2)[0], "new gossip key:"))
	for _, id := range []string{"n0", "n1", "n2", "gw"} {
		if !strings.Contains(out, id+" ") {
			t.Errorf("install: no answer from %s:\n%s", id, out)
		}
	}
	admin("use", newKey)
	out = admin("remove", strings.TrimSpace(string(oldKey)))
	if strings.Count(out, " ok ") != 4 || strings.Contains(out, strings.TrimSpace(string(oldKey))) {
		t.Errorf("after remove, want 4 members holding only the new key:\n%s", out)
	}
	if b, _ := os.ReadFile(keyFile); strings.TrimSpace(string(b)) != newKey {
		t.Errorf("key file holds %q, want the new key alone", b)
	}
	// A gateway certificate may not rotate keys.
	gwOut, err := s.run(nil, slices.Concat([]string{"cluster", "gossip-key", "list", "--addr", s.nodes[1].ready.GRPCAddr}, s.tlsFlags("gw"))...)
	if err == nil || !strings.Contains(gwOut, "PermissionDenied") {
		t.Errorf("gossip-key list with the gateway's certificate: %v\n%s", err, gwOut)
	}

	// A node restarted now reads the new key from its file and rejoins.
	n2 := s.nodes[2]
	n2.stop()
	args := slices.Concat([]string{"serve", "--node-id", "n2", "--region", "west", "--data-dir", filepath.Join(s.dir, "n2")},
		e2eLoopback, s.common, s.tlsFlags("n2"), []string{"--join", s.nodes[0].ready.GossipAddr})
	again := gwe2eStart(t, "n2", s.dir, args...)
	again.waitReady()
	again.poll("n2 alive in gossip again", time.Minute, func() error {
		st, out, err := s.status("ops")
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		for _, m := range st.Members {
			if m.Id == "n2" && m.Health == "alive" && m.Status != nil {
				return nil
			}
		}
		return fmt.Errorf("n2 not back:\n%s", out)
	})

	// The old key no longer opens the cluster.
	staleKey := filepath.Join(s.dir, "stale.key")
	if err := os.WriteFile(staleKey, oldKey, 0o600); err != nil {
		t.Fatal(err)
	}
	s.mustRun("ca", "issue", "--dir", s.pki, "--role", "node", "--id", "n9")
	stale := gwe2eStart(t, "n9", s.dir, slices.Concat([]string{"serve", "--node-id", "n9", "--region", "east",
		"--data-dir", filepath.Join(s.dir, "n9"), "--join", s.nodes[0].ready.GossipAddr, "--join-timeout", "5s"},
		e2eLoopback, s.common[:len(s.common)-2], []string{"--gossip-key-file", staleKey}, s.tlsFlags("n9"))...)
	select {
	case <-stale.exited:
		if stale.cmd.ProcessState.ExitCode() == 0 {
			t.Errorf("a node with the removed key exited 0:\n%s", stale.logTail())
		}
	case <-time.After(time.Minute):
		t.Fatalf("a node with the removed key still runs:\n%s", stale.logTail())
	}
}

// On a cluster with TLS an admin user's credentials work without an admin
// certificate (the CLI trusts the CA alone), while a client without a
// certificate reaches nothing else: every other method, and admin methods
// without or with the wrong credentials, are refused.
func TestAdminUserOverTLS(t *testing.T) {
	s := startSecE2E(t)
	addr := "--addr=" + s.nodes[1].ready.GRPCAddr
	ca := filepath.Join(s.pki, "ca.crt")
	// e2eEnv names the first admin (MERIDIAN_USERNAME/MERIDIAN_PASSWORD).
	if out, err := s.run(nil, "user", "add", "dana", "--password-stdin", "--tls-ca", ca, addr); err == nil {
		t.Fatalf("user add read no password from stdin and succeeded:\n%s", out)
	}
	s.mustRun("robot", "create", "tls-ci", "--scope", "ci:pull", "--tls-ca", ca, addr)
	if out := s.mustRun("robot", "list", "--tls-ca", ca, addr); !strings.Contains(out, "tls-ci") {
		t.Errorf("robot list:\n%s", out)
	}
	out, err := s.run([]string{"MERIDIAN_PASSWORD=wrong-password-here"}, "user", "list", "--tls-ca", ca, addr)
	if err == nil || !strings.Contains(out, "invalid username or password") {
		t.Errorf("user list with a wrong password: %v\n%s", err, out)
	}

	tlsCfg, err := pki.ClientConfigCAOnly(ca, "h2")
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(s.nodes[0].ready.GRPCAddr, grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	adm, gw := pb.NewAdminClient(conn), pb.NewGatewayClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for name, call := range map[string]func() error{
		"ManageAccess": func() error {
			_, err := adm.ManageAccess(ctx, &pb.ManageAccessRequest{Op: &pb.ManageAccessRequest_DeleteUser{DeleteUser: "admin"}})
			return err
		},
		"ClusterStatus":  func() error { _, err := adm.ClusterStatus(ctx, &pb.ClusterStatusRequest{}); return err },
		"GetAccessState": func() error { _, err := gw.GetAccessState(ctx, &pb.GetAccessStateRequest{}); return err },
		"GetUploadKey":   func() error { _, err := gw.GetUploadKey(ctx, &pb.GetUploadKeyRequest{}); return err },
		"Commit": func() error {
			_, err := gw.Commit(ctx, &pb.CommitRequest{Command: &pb.Command{Intent: &pb.Command_DeleteTag{DeleteTag: &pb.DeleteTag{Repository: "secure/app", Tag: "v1"}}}})
			return err
		},
	} {
		if err := call(); status.Code(err) != codes.Unauthenticated {
			t.Errorf("%s without a certificate or credentials: %v, want Unauthenticated", name, err)
		}
	}
}

// A certificate revoked with `meridian ca revoke` stops working on every
// member port without a restart: a gRPC client holding a gateway
// certificate, a Raft client holding a node certificate and the admin CLI
// holding an admin certificate all succeed before and are refused at the
// handshake after, while the members' own certificates keep working.
func TestRevokedCertificatesRefused(t *testing.T) {
	s := startSecE2E(t)
	for _, c := range [][2]string{{"gateway", "gw-stolen"}, {"node", "n-stolen"}, {"admin", "ops-stolen"}} {
		s.mustRun("ca", "issue", "--dir", s.pki, "--role", c[0], "--id", c[1])
	}
	source := func(id string) *pki.Source {
		src, err := pki.Open(filepath.Join(s.pki, "ca.crt"), filepath.Join(s.pki, id+".crt"), filepath.Join(s.pki, id+".key"), nil)
		if err != nil {
			t.Fatal(err)
		}
		return src
	}
	gw, node := source("gw-stolen"), source("n-stolen")
	ping := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		conn, err := grpc.NewClient(s.nodes[1].ready.GRPCAddr, grpc.WithTransportCredentials(credentials.NewTLS(gw.ClientConfig(nil, "h2"))))
		if err != nil {
			return err
		}
		defer conn.Close()
		_, err = pb.NewGatewayClient(conn).Ping(ctx, &pb.PingRequest{})
		return err
	}
	raftHandshake := func() error {
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", s.nodes[2].ready.RaftAddr, node.ClientConfig(nil))
		if err != nil {
			return err
		}
		defer conn.Close()
		// TLS 1.3: the server checks the client certificate after the
		// client's handshake returns; a refusal arrives on the first read.
		conn.SetDeadline(time.Now().Add(2 * time.Second))
		_, err = conn.Read(make([]byte, 1))
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			return nil // accepted, and nothing to say yet
		}
		return err
	}
	if err := ping(); err != nil {
		t.Fatalf("Ping with a valid gateway certificate: %v", err)
	}
	if err := raftHandshake(); err != nil {
		t.Fatalf("Raft handshake with a valid node certificate: %v", err)
	}
	if _, out, err := s.status("ops-stolen"); err != nil {
		t.Fatalf("cluster status with a valid admin certificate: %v\n%s", err, out)
	}

	for _, id := range []string{"gw-stolen", "n-stolen", "ops-stolen"} {
		if out := s.mustRun("ca", "revoke", "--dir", s.pki, "--id", id); !strings.Contains(out, "revoked") {
			t.Fatalf("ca revoke %s: %s", id, out)
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		pingErr, raftErr := ping(), raftHandshake()
		_, out, statusErr := s.status("ops-stolen")
		if pingErr != nil && raftErr != nil && statusErr != nil {
			// The server's reason stays on its side; the client sees its
			// connection refused (it worked with the same certificate above).
			if status.Code(pingErr) != codes.Unavailable {
				t.Errorf("Ping with a revoked certificate failed, but not at the connection: %v", pingErr)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("30s after revoking: ping %v, raft %v, status %v\n%s", pingErr, raftErr, statusErr, out)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// The members themselves, and the real admin, carry on.
	if _, out, err := s.status("ops"); err != nil {
		t.Fatalf("cluster status with the admin certificate after the revocations: %v\n%s", err, out)
	}
	img, err := random.Image(1024, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(s.gateway.ref("revoked/app:v1"), img); err != nil {
		t.Fatalf("push through the gateway after the revocations: %v", err)
	}
	// Bad input reads clearly.
	if out, err := s.run(nil, "ca", "revoke", "--dir", s.pki); err == nil || !strings.Contains(out, "exactly one of --id and --cert") {
		t.Errorf("ca revoke without a certificate: %v\n%s", err, out)
	}
	if out, err := s.run(nil, "ca", "revoke", "--dir", s.pki, "--id", "nobody"); err == nil || !strings.Contains(out, "nobody.crt") {
		t.Errorf("ca revoke of a missing certificate: %v\n%s", err, out)
	}
}
