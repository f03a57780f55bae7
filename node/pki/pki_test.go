package pki

import (
	"crypto/tls"
	"encoding/base64"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestInitCAAndIssue(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	if err := InitCA(dir, "prod-eu"); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]os.FileMode{CACertFile: 0o644, CAKeyFile: 0o600, GossipKeyFile: 0o600} {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != want {
			t.Errorf("%s: mode %v, want %v", name, st.Mode().Perm(), want)
		}
	}
	if st, _ := os.Stat(dir); st.Mode().Perm() != 0o700 {
		t.Errorf("CA directory mode %v, want 0700", st.Mode().Perm())
	}
	gk, _ := os.ReadFile(filepath.Join(dir, GossipKeyFile))
	if key, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(gk))); err != nil || len(key) != 32 {
		t.Errorf("gossip.key: %d bytes, %v; want 32 base64 bytes", len(key), err)
	}
	if err := InitCA(dir, "prod-eu"); !errors.Is(err, ErrExists) {
		t.Errorf("second InitCA: %v, want ErrExists", err)
	}

	certPath, keyPath, err := Issue(dir, IssueRequest{Role: RoleGateway, ID: "gw-1", DNSNames: []string{"registry.example.com"}, IPs: []net.IP{net.ParseIP("10.0.0.7")}})
	if err != nil {
		t.Fatal(err)
	}
	if certPath != filepath.Join(dir, "gw-1.crt") || keyPath != filepath.Join(dir, "gw-1.key") {
		t.Errorf("paths %s %s", certPath, keyPath)
	}
	if st, _ := os.Stat(keyPath); st.Mode().Perm() != 0o600 {
		t.Errorf("key mode %v, want 0600", st.Mode().Perm())
	}
	s, err := Open(filepath.Join(dir, CACertFile), certPath, keyPath, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := s.Identity(), (Identity{Cluster: "prod-eu", Role: RoleGateway, ID: "gw-1"}); got != want {
		t.Errorf("identity %v, want %v", got, want)
	}
	leaf := s.current().cert.Leaf
	if len(leaf.DNSNames) != 1 || len(leaf.IPAddresses) != 1 || leaf.URIs[0].String() != "spiffe://prod-eu/gateway/gw-1" {
		t.Errorf("SANs %v %v %v", leaf.DNSNames, leaf.IPAddresses, leaf.URIs)
	}
}

func TestIssueRefusesBadInput(t *testing.T) {
	dir := t.TempDir()
	if _, _, err := Issue(dir, IssueRequest{Role: RoleNode, ID: "n1"}); err == nil || !strings.Contains(err.Error(), "ca init") {
		t.Errorf("issue without a CA: %v", err)
	}
	if err := InitCA(dir, "c"); err != nil {
		t.Fatal(err)
	}
	for _, req := range []IssueRequest{
		{Role: "root", ID: "n1"},
		{Role: RoleNode, ID: ""},
		{Role: RoleNode, ID: "../etc/passwd"},
		{Role: RoleNode, ID: "a/b"},
		{Role: RoleAdmin, ID: strings.Repeat("x", 64)},
	} {
		if _, _, err := Issue(dir, req); !errors.Is(err, ErrBadIdentity) {
			t.Errorf("Issue(%+v): %v, want ErrBadIdentity", req, err)
		}
	}
	if err := InitCA(t.TempDir(), "bad id"); err == nil {
		t.Error("InitCA accepted a cluster id with a space")
	}
}

func TestParseIdentity(t *testing.T) {
	for _, tc := range []struct {
		uri string
		ok  bool
	}{
		{"spiffe://c1/node/n1", true},
		{"spiffe://c1/admin/ops.team", true},
		{"spiffe://c1/node", false},
		{"spiffe://c1/node/n1/x", false},
		{"spiffe://c1/boss/n1", false},
		{"spiffe://c1:80/node/n1", false},
		{"spiffe://c1/node/n1?x=1", false},
		{"https://c1/node/n1", false},
	} {
		u, err := (&Identity{}).URI().Parse(tc.uri)
		if err != nil {
			t.Fatal(err)
		}
		_, err = ParseIdentity(u)
		if (err == nil) != tc.ok {
			t.Errorf("ParseIdentity(%s): %v, want ok=%v", tc.uri, err, tc.ok)
		}
	}
}

// testPKI is a CA directory with issued members.
type testPKI struct {
	t   *testing.T
	dir string
}

func newTestPKI(t *testing.T, cluster string) *testPKI {
	dir := filepath.Join(t.TempDir(), cluster)
	if err := InitCA(dir, cluster); err != nil {
		t.Fatal(err)
	}
	return &testPKI{t: t, dir: dir}
}

func (p *testPKI) source(role, id string) *Source {
	p.t.Helper()
	cert, key, err := Issue(p.dir, IssueRequest{Role: role, ID: id})
	if err != nil {
		p.t.Fatal(err)
	}
	s, err := Open(filepath.Join(p.dir, CACertFile), cert, key, nil)
	if err != nil {
		p.t.Fatal(err)
	}
	return s
}

// serve accepts TLS connections with cfg on loopback, echoes one line
// back to each, and reports the peer identity of each accepted handshake.
func serve(t *testing.T, cfg *tls.Config) (addr string, peers <-chan Identity) {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	ch := make(chan Identity, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				tc := c.(*tls.Conn)
				c.SetDeadline(time.Now().Add(10 * time.Second))
				if err := tc.Handshake(); err != nil {
					return
				}
				if id, err := PeerIdentity(tc.ConnectionState()); err == nil {
					ch <- id
				}
				io.Copy(c, io.LimitReader(c, 5))
			}()
		}
	}()
	return ln.Addr().String(), ch
}

// roundTrip dials addr with cfg and echoes "hello" through the connection;
// it fails when either side refuses the handshake.
func roundTrip(addr string, cfg *tls.Config) error {
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("hello")); err != nil {
		return err
	}
	// In TLS 1.3 the server's verdict on the client certificate arrives
	// after the client's handshake completes: read to see it.
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	return nil
}

func TestMutualTLS(t *testing.T) {
	p := newTestPKI(t, "c1")
	server := p.source(RoleNode, "n1")
	addr, peers := serve(t, server.ServerConfig(nil))

	t.Run("member of the cluster", func(t *testing.T) {
		client := p.source(RoleGateway, "gw")
		if err := roundTrip(addr, client.ClientConfig(nil)); err != nil {
			t.Fatal(err)
		}
		if id := <-peers; id != (Identity{"c1", RoleGateway, "gw"}) {
			t.Errorf("server saw %v", id)
		}
	})
	t.Run("client with no certificate", func(t *testing.T) {
		cfg := &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}
		if err := roundTrip(addr, cfg); err == nil {
			t.Fatal("a client with no certificate got through")
		}
	})
	t.Run("certificate of another CA", func(t *testing.T) {
		// Same cluster id, same role and id: only the signer differs. The
		// attacker trusts any server, so only the server's check stands
		// in the way.
		other := newTestPKI(t, "c1").source(RoleNode, "n2")
		attacker := &tls.Config{MinVersion: tls.VersionTLS13, InsecureSkipVerify: true, Certificates: []tls.Certificate{*other.current().cert}}
		if err := roundTrip(addr, attacker); err == nil {
			t.Fatal("a certificate from another CA got through")
		}
	})
	t.Run("server of another CA", func(t *testing.T) {
		// A rogue server that asks for no client certificate: only the
		// client's check stands in the way.
		rogue := newTestPKI(t, "c1").source(RoleNode, "n1")
		raddr, _ := serve(t, &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{*rogue.current().cert}})
		if err := roundTrip(raddr, p.source(RoleNode, "n3").ClientConfig(nil)); err == nil {
			t.Fatal("the client trusted a server from another CA")
		}
	})
	t.Run("expected identity", func(t *testing.T) {
		client := p.source(RoleNode, "n4")
		want := func(id Identity) error {
			if id.ID != "n9" {
				return errors.New("not n9")
			}
			return nil
		}
		if err := roundTrip(addr, client.ClientConfig(want)); err == nil {
			t.Fatal("the client accepted n1 where it expected n9")
		}
	})
	t.Run("role refused by the server", func(t *testing.T) {
		onlyNodes := func(id Identity) error {
			if id.Role != RoleNode {
				return errors.New("members only")
			}
			return nil
		}
		naddr, _ := serve(t, server.ServerConfig(onlyNodes))
		if err := roundTrip(naddr, p.source(RoleGateway, "gw2").ClientConfig(nil)); err == nil {
			t.Fatal("a gateway got through a nodes-only listener")
		}
		if err := roundTrip(naddr, p.source(RoleNode, "n5").ClientConfig(nil)); err != nil {
			t.Fatalf("a node was refused: %v", err)
		}
	})
}

// A certificate issued again for the same id is picked up without a
// restart; a certificate for another identity written over it is not.
func TestReload(t *testing.T) {
	p := newTestPKI(t, "c1")
	s := p.source(RoleNode, "n1")
	first := s.current().cert.Leaf.SerialNumber
	if _, _, err := Issue(p.dir, IssueRequest{Role: RoleNode, ID: "n1", Validity: time.Hour}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for s.current().cert.Leaf.SerialNumber.Cmp(first) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the reissued certificate was not picked up")
		}
		time.Sleep(50 * time.Millisecond)
	}

	// A gateway certificate copied over the node's files is refused.
	gwCert, gwKey, err := Issue(p.dir, IssueRequest{Role: RoleGateway, ID: "gw"})
	if err != nil {
		t.Fatal(err)
	}
	second := s.current().cert.Leaf.SerialNumber
	for _, cp := range [][2]string{{gwKey, filepath.Join(p.dir, "n1.key")}, {gwCert, filepath.Join(p.dir, "n1.crt")}} {
		b, _ := os.ReadFile(cp[0])
		if err := WriteFileAtomic(cp[1], b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(2 * recheckEvery)
	if got := s.current(); got.cert.Leaf.SerialNumber.Cmp(second) != 0 || got.self.Role != RoleNode {
		t.Errorf("a certificate for %v replaced the node's", got.self)
	}
}

// A revocation list cuts off exactly the certificates it lists, is re-read
// when it changes, and must be signed by the cluster CA.
func TestRevocationList(t *testing.T) {
	p := newTestPKI(t, "crl")
	crl := filepath.Join(p.dir, CRLFile)
	p.source(RoleNode, "n1")
	server, err := OpenWithCRL(filepath.Join(p.dir, CACertFile), crl,
		filepath.Join(p.dir, "n1.crt"), filepath.Join(p.dir, "n1.key"), nil)
	if err != nil {
		t.Fatal(err)
	}
	addr, peers := serve(t, server.ServerConfig(nil))
	go func() {
		for range peers { // serve reports every handshake; nobody here needs them
		}
	}()
	stolen, kept := p.source(RoleGateway, "stolen"), p.source(RoleGateway, "kept")
	for _, c := range []*Source{stolen, kept} {
		if err := roundTrip(addr, c.ClientConfig(nil)); err != nil {
			t.Fatalf("before revoking: %v", err)
		}
	}
	if _, err := Revoke(p.dir, filepath.Join(p.dir, "stolen.crt")); err != nil {
		t.Fatal(err)
	}
	// The watcher notices the new list (it checks the files' stamps).
	deadline := time.Now().Add(10 * time.Second)
	for roundTrip(addr, stolen.ClientConfig(nil)) == nil {
		if time.Now().After(deadline) {
			t.Fatal("a revoked certificate still gets through 10s after the list changed")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := roundTrip(addr, kept.ClientConfig(nil)); err != nil {
		t.Fatalf("a certificate the list does not name: %v", err)
	}
	// Revoking again changes nothing; the list keeps both entries.
	if _, err := Revoke(p.dir, filepath.Join(p.dir, "stolen.crt")); err != nil {
		t.Fatal(err)
	}
	if _, err := Revoke(p.dir, filepath.Join(p.dir, "kept.crt")); err != nil {
		t.Fatal(err)
	}
	m, err := server.load()
	if err != nil || len(m.revoked) != 2 {
		t.Fatalf("revoked = %v, %v; want both", m.revoked, err)
	}
	// A list signed by another CA is refused, and so is a certificate of
	// another CA.
	other := newTestPKI(t, "crl")
	if _, err := Revoke(p.dir, filepath.Join(other.dir, CACertFile)); err == nil {
		t.Fatal("revoked a certificate the CA did not issue")
	}
	if _, err := OpenWithCRL(filepath.Join(p.dir, CACertFile), filepath.Join(other.dir, CRLFile),
		filepath.Join(p.dir, "n1.crt"), filepath.Join(p.dir, "n1.key"), nil); err == nil || !strings.Contains(err.Error(), "not signed") {
		t.Fatalf("a list from another CA: %v", err)
	}
}
