package transport

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/meridian-registry/meridian/node/pki"
)

// ca is a cluster CA in a temporary directory.
type ca struct {
	t   *testing.T
	dir string
}

func newCA(t *testing.T, cluster string) ca {
	dir := filepath.Join(t.TempDir(), "ca")
	if err := pki.InitCA(dir, cluster); err != nil {
		t.Fatal(err)
	}
	return ca{t, dir}
}

func (c ca) trust(role, id string) *Trust {
	c.t.Helper()
	cert, key, err := pki.Issue(c.dir, pki.IssueRequest{Role: role, ID: id})
	if err != nil {
		c.t.Fatal(err)
	}
	src, err := pki.Open(filepath.Join(c.dir, pki.CACertFile), cert, key, nil)
	if err != nil {
		c.t.Fatal(err)
	}
	return &Trust{Source: src}
}

// raftEcho serves ln like a Raft transport would: read a request, answer.
func raftEcho(t *testing.T, ln net.Listener) {
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 4)
				if _, err := io.ReadFull(c, buf); err != nil {
					return
				}
				c.Write(buf)
			}()
		}
	}()
}

func exchange(c net.Conn) error {
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		return err
	}
	buf := make([]byte, 4)
	_, err := io.ReadFull(c, buf)
	return err
}

func TestRaftMutualTLS(t *testing.T) {
	cluster := newCA(t, "c1")
	server := cluster.trust(pki.RoleNode, "n1")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	raftEcho(t, server.RaftListener(ln))
	addr := ln.Addr().String()

	c, err := cluster.trust(pki.RoleNode, "n2").RaftDial(nil)(addr, 5*time.Second)
	if err != nil {
		t.Fatalf("a node of the cluster: %v", err)
	}
	if err := exchange(c); err != nil {
		t.Fatalf("a node of the cluster: %v", err)
	}

	// A plain TCP client, as raft.NewTCPTransport would be: its bytes are
	// not a TLS hello, so the server closes the connection unanswered.
	plain, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	plain.Write(make([]byte, 60)) // a whole (bogus) record header and more
	if err := exchange(plain); err == nil {
		t.Error("a plaintext Raft client got an answer")
	}
	for name, attacker := range map[string]*Trust{
		"gateway certificate":    cluster.trust(pki.RoleGateway, "gw"),
		"admin certificate":      cluster.trust(pki.RoleAdmin, "ops"),
		"another CA's node":      newCA(t, "c1").trust(pki.RoleNode, "n3"),
		"another cluster's node": newCA(t, "c2").trust(pki.RoleNode, "n3"),
	} {
		// The attacker skips its own checks: only the server's stand.
		cfg := &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true,
			GetClientCertificate: attacker.Source.ClientConfig(nil).GetClientCertificate}
		c, err := tls.Dial("tcp", addr, cfg)
		if err == nil {
			err = exchange(c)
		}
		if err == nil {
			t.Errorf("%s: connected to the Raft port", name)
		}
	}
	// And a node does not talk Raft to a server of another CA.
	rogueLn, _ := net.Listen("tcp", "127.0.0.1:0")
	raftEcho(t, tls.NewListener(rogueLn, &tls.Config{Certificates: []tls.Certificate{mustCert(t, newCA(t, "c1").trust(pki.RoleNode, "n1"))}}))
	if c, err := cluster.trust(pki.RoleNode, "n4").RaftDial(nil)(rogueLn.Addr().String(), 5*time.Second); err == nil {
		c.Close()
		t.Error("a node dialed a Raft server of another CA")
	}
}

func mustCert(t *testing.T, tr *Trust) tls.Certificate {
	c, err := tr.Source.ClientConfig(nil).GetClientCertificate(nil)
	if err != nil {
		t.Fatal(err)
	}
	return *c
}

var testAccess = Access{
	"/grpc.health.v1.Health/Check": {pki.RoleNode, pki.RoleGateway},
	// List is named by no key: closed. Watch is open to admins through
	// the service prefix.
	"/grpc.health.v1.Health/": {pki.RoleAdmin},
}

func serveHealth(t *testing.T, tr *Trust) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer(tr.ServerOptions(testAccess)...)
	healthpb.RegisterHealthServer(s, health.NewServer())
	go s.Serve(ln)
	t.Cleanup(s.Stop)
	return ln.Addr().String()
}

func check(addr string, creds grpc.DialOption) error {
	conn, err := grpc.NewClient(addr, creds)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	return err
}

func TestGRPCRoles(t *testing.T) {
	cluster := newCA(t, "c1")
	addr := serveHealth(t, cluster.trust(pki.RoleNode, "n1"))

	for _, tc := range []struct {
		name  string
		creds grpc.DialOption
		want  codes.Code
	}{
		{"gateway", cluster.trust(pki.RoleGateway, "gw").DialCredentials(), codes.OK},
		{"node", cluster.trust(pki.RoleNode, "n2").DialCredentials(), codes.OK},
		{"admin calling a gateway method", cluster.trust(pki.RoleAdmin, "ops").DialCredentials(), codes.PermissionDenied},
		{"no TLS", grpc.WithTransportCredentials(insecure.NewCredentials()), codes.Unavailable},
		// The handshake admits it (admin users may bring credentials
		// instead), the call is refused.
		{"TLS without a certificate", grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{InsecureSkipVerify: true})), codes.Unauthenticated},
		{"another CA", grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{InsecureSkipVerify: true,
			GetClientCertificate: newCA(t, "c1").trust(pki.RoleAdmin, "ops").Source.ClientConfig(nil).GetClientCertificate})), codes.Unavailable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := status.Code(check(addr, tc.creds)); got != tc.want {
				t.Errorf("Check: %v, want %v", got, tc.want)
			}
		})
	}

	// A method the table does not name is closed to every role.
	conn, err := grpc.NewClient(addr, cluster.trust(pki.RoleNode, "n5").DialCredentials())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := healthpb.NewHealthClient(conn).List(ctx, &healthpb.HealthListRequest{}); status.Code(err) != codes.PermissionDenied {
		t.Errorf("List by a node: %v, want PermissionDenied", err)
	}

	// Plaintext: no checks (loopback or --insecure-cluster only).
	plainAddr := serveHealth(t, nil)
	if err := check(plainAddr, (*Trust)(nil).DialCredentials()); err != nil {
		t.Errorf("plaintext: %v", err)
	}
}

func TestCheckListeners(t *testing.T) {
	loop := map[string]string{"grpc": "127.0.0.1:5001", "raft": "[::1]:5002", "gossip": "localhost:5003"}
	open := map[string]string{"grpc": "0.0.0.0:5001", "raft": "127.0.0.1:5002", "gossip": ":5003"}
	for _, tc := range []struct {
		name                  string
		addrs                 map[string]string
		tlsOn, keyOn, insecOK bool
		ok                    bool
	}{
		{"loopback plaintext", loop, false, false, false, true},
		{"open plaintext", open, false, false, false, false},
		{"open with TLS only", open, true, false, false, false},
		{"open with gossip key only", open, false, true, false, false},
		{"open secured", open, true, true, false, true},
		{"open, insecure by choice", open, false, false, true, true},
	} {
		err := CheckListeners(tc.addrs, tc.tlsOn, tc.keyOn, tc.insecOK)
		if (err == nil) != tc.ok || (err != nil && !errors.Is(err, ErrInsecureListener)) {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
}
