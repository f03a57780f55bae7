package chaos

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"errors"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// testCA signs member certificates in memory, as `meridian ca` does on
// disk: a spiffe URI SAN and no host name.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

var testSerial atomic.Int64

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(testSerial.Add(1)), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert: cert, key: key, pool: pool}
}

// issue signs a certificate for the spiffe URI identity.
func (ca *testCA) issue(t *testing.T, identity string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(identity)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(testSerial.Add(1)), Subject: pkix.Name{CommonName: identity},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), URIs: []*url.URL{u},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

// memberServer is a TLS listener that requires a client certificate of
// its CA and serves whichever certificate is current.
type memberServer struct {
	addr string
	cur  atomic.Pointer[tls.Certificate]
}

func startMemberServer(t *testing.T, ca *testCA, cert tls.Certificate) *memberServer {
	t.Helper()
	s := &memberServer{}
	s.cur.Store(&cert)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return s.cur.Load(), nil
		},
		ClientAuth: tls.RequireAndVerifyClientCert,
		ClientCAs:  ca.pool,
		NextProtos: []string{"h2"},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	s.addr = ln.Addr().String()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				conn.SetDeadline(time.Now().Add(5 * time.Second))
				conn.(*tls.Conn).Handshake()
			}()
		}
	}()
	return s
}

// testPKI is a clusterPKI for cluster "chaos" whose admin certificate is
// signed by ca.
func testPKI(t *testing.T, ca *testCA) *clusterPKI {
	return &clusterPKI{cluster: "chaos", admin: ca.issue(t, "spiffe://chaos/admin/"+adminID), roots: ca.pool}
}

// TestServedCertificate: the probe returns the certificate a member
// serves, and refuses one of another CA or for another identity.
func TestServedCertificate(t *testing.T) {
	ca := newTestCA(t)
	p := testPKI(t, ca)
	n1 := ca.issue(t, p.identity(roleNode, "n1"))
	srv := startMemberServer(t, ca, n1)
	ctx := context.Background()

	got, err := p.served(ctx, srv.addr, p.identity(roleNode, "n1"))
	if err != nil {
		t.Fatalf("served: %v", err)
	}
	if got.SerialNumber.Cmp(n1.Leaf.SerialNumber) != 0 {
		t.Fatalf("served serial %v, want %v", got.SerialNumber, n1.Leaf.SerialNumber)
	}
	if _, err := p.served(ctx, srv.addr, p.identity(roleNode, "n2")); !errors.Is(err, errWrongPeer) {
		t.Fatalf("a member serving n1's certificate passed for n2: %v", err)
	}
	other := newTestCA(t)
	foreign := other.issue(t, p.identity(roleNode, "n1"))
	srv.cur.Store(&foreign)
	if _, err := p.served(ctx, srv.addr, p.identity(roleNode, "n1")); err == nil || errors.Is(err, errWrongPeer) {
		t.Fatalf("a certificate of another CA was accepted: %v", err)
	}
}

// TestWaitServed: a member that switches to the new certificate passes; a
// member that keeps the old one, or a rotation whose file did not change,
// fails within the bound and says what was served.
func TestWaitServed(t *testing.T) {
	ca := newTestCA(t)
	p := testPKI(t, ca)
	id := p.identity(roleNode, "n1")
	ctx := context.Background()

	oldCert, newCert := ca.issue(t, id), ca.issue(t, id)
	oldSerial, newSerial := oldCert.Leaf.SerialNumber, newCert.Leaf.SerialNumber
	srv := startMemberServer(t, ca, oldCert)
	since := time.Now()
	time.AfterFunc(300*time.Millisecond, func() { srv.cur.Store(&newCert) })
	took, err := p.waitServed(ctx, srv.addr, id, oldSerial, newSerial, since, time.Minute, nil)
	if err != nil {
		t.Fatalf("a member that switched certificates: %v", err)
	}
	if took < 300*time.Millisecond {
		t.Fatalf("served after %v, before the switch", took)
	}

	for _, c := range []struct {
		name      string
		old, want *big.Int
	}{
		{"the member kept its old certificate", oldSerial, big.NewInt(0).Add(newSerial, big.NewInt(1000))},
		{"the file was not re-issued", newSerial, newSerial},
	} {
		t.Run(c.name, func(t *testing.T) {
			start := time.Now()
			_, err := p.waitServed(ctx, srv.addr, id, c.old, c.want, start, time.Second, nil)
			if err == nil {
				t.Fatal("passed")
			}
			if !strings.Contains(err.Error(), "last seen: serial "+shortSerial(newSerial)) {
				t.Fatalf("the error does not say what was served: %v", err)
			}
			if waited := time.Since(start); waited > time.Minute {
				t.Fatalf("gave up after %v, bound 1s", waited)
			}
		})
	}

	exited := make(chan struct{})
	close(exited)
	if _, err := p.waitServed(ctx, srv.addr, id, newSerial, oldSerial, time.Now(), time.Minute, exited); err == nil ||
		!strings.Contains(err.Error(), errExited.Error()) {
		t.Fatalf("a member whose process exited: %v", err)
	}
}

// TestCheckCertRotations: each injected rotation counts; one not served
// is a violation that fails the run; a promised check with no rotation
// proved nothing.
func TestCheckCertRotations(t *testing.T) {
	faults := []Fault{
		{Kind: FaultCertRotate, Target: "n1", Start: time.Second, End: 2 * time.Second},
		{Kind: FaultCertRotate, Target: "n2", Start: 5 * time.Second, End: 15 * time.Second, Failure: "not served within 10s"},
		{Kind: FaultCertRotate, Target: "n3", Error: "ca issue failed"},
		{Kind: FaultKill, Target: "n1", Start: time.Second, End: 9 * time.Second},
	}
	res := CheckCertRotations(faults)
	if res.Status != CheckFail || res.Checked != 2 || len(res.Violations) != 1 || !strings.Contains(res.Violations[0].Message, "n2") {
		t.Fatalf("result %+v", res)
	}
	r := NewReport(1, "short", testStarted, time.Minute, nil, faults, nil, []CheckResult{res}, convergedState())
	text := reportText(t, r)
	if r.Passed || !slices.Contains(r.Failures, "check "+CheckNameCertRotations+" found 1 violations") ||
		!strings.Contains(text, "FAILED: not served within 10s") {
		t.Fatalf("a rotation that was not served: failures %q\n%s", r.Failures, text)
	}

	if res := CheckCertRotations(faults[:1]); res.Status != CheckPass || res.Checked != 1 {
		t.Fatalf("one rotation served: %+v", res)
	}
	none := CheckCertRotations(faults[3:])
	r = NewReport(1, "short", testStarted, time.Minute, nil, nil, nil, []CheckResult{none}, convergedState())
	if r.Passed || !slices.Contains(r.Failures, "check "+CheckNameCertRotations+" had nothing to check") {
		t.Fatalf("no rotation: %+v, failures %q", none, r.Failures)
	}
	if !hasKind(FaultQuotas(ShortProfile(), nil, 1), nil, FaultCertRotate) ||
		hasKind(FaultQuotas(ShortProfile(), []string{FaultKill}, 1), faults[3:], FaultCertRotate) ||
		!hasKind(nil, faults[:1], FaultCertRotate) {
		t.Fatal("the rotation check is not added exactly when rotations are promised or happened")
	}
}

// TestProfileReservedIDs: a member id that would overwrite the CA's
// files, the harness's admin certificate or another member's gossip key
// file is refused.
func TestProfileReservedIDs(t *testing.T) {
	if err := ShortProfile().validate(); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"ca", "gossip", adminID, "gw-local.gossip"} {
		p := ShortProfile()
		p.Nodes[1].ID = id
		if err := p.validate(); err == nil || !strings.Contains(err.Error(), "reserved") {
			t.Errorf("node %q: %v", id, err)
		}
		p = ShortProfile()
		p.Gateways[0].ID = id
		if err := p.validate(); err == nil || !strings.Contains(err.Error(), "reserved") {
			t.Errorf("gateway %q: %v", id, err)
		}
	}
}

// TestCheckGossipKeys: each injected rotation counts; one that failed is
// a violation that fails the run; a promised check with no rotation
// proved nothing.
func TestCheckGossipKeys(t *testing.T) {
	faults := []Fault{
		{Kind: FaultGossipKey, Target: gossipKeyTarget, Start: time.Second, End: 9 * time.Second, Detail: "restart n1, key a → b"},
		{Kind: FaultGossipKey, Target: gossipKeyTarget, Start: 20 * time.Second, End: 40 * time.Second, Detail: "restart n2, key b → c",
			Failure: "after the restart of n2 not every member alive in gossip"},
		{Kind: FaultGossipKey, Target: gossipKeyTarget, Error: "gossip-key install: exit status 1"},
		{Kind: FaultKill, Target: "n1", Start: time.Second, End: 9 * time.Second},
	}
	res := CheckGossipKeys(faults)
	if res.Status != CheckFail || res.Checked != 2 || len(res.Violations) != 1 || !strings.Contains(res.Violations[0].Message, "restart n2") {
		t.Fatalf("result %+v", res)
	}
	r := NewReport(1, "short", testStarted, time.Minute, nil, faults, nil, []CheckResult{res}, convergedState())
	if r.Passed || !slices.Contains(r.Failures, "check "+CheckNameGossipKeys+" found 1 violations") {
		t.Fatalf("a failed rotation: failures %q", r.Failures)
	}
	if res := CheckGossipKeys(faults[:1]); res.Status != CheckPass || res.Checked != 1 {
		t.Fatalf("one rotation: %+v", res)
	}
	none := CheckGossipKeys(faults[3:])
	r = NewReport(1, "short", testStarted, time.Minute, nil, nil, nil, []CheckResult{none}, convergedState())
	if r.Passed || !slices.Contains(r.Failures, "check "+CheckNameGossipKeys+" had nothing to check") {
		t.Fatalf("no rotation: %+v, failures %q", none, r.Failures)
	}
	if !hasKind(FaultQuotas(ShortProfile(), nil, 1), nil, FaultGossipKey) ||
		hasKind(FaultQuotas(ShortProfile(), []string{FaultKill}, 1), faults[3:], FaultGossipKey) {
		t.Fatal("the gossip key check is not added exactly when rotations are promised or happened")
	}
}

// TestGossipKeyFiles: a key file reads primary first, comments and blank
// lines skipped; a new key is 32 bytes of base64; the status JSON gives
// every member's health, gateways included.
func TestGossipKeyFiles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "k")
	a, b := newGossipKey(), newGossipKey()
	if raw, err := base64.StdEncoding.DecodeString(a); err != nil || len(raw) != 32 || a == b {
		t.Fatalf("new keys %q, %q: %v", a, b, err)
	}
	if err := os.WriteFile(path, []byte("# keyring\n"+a+"\n\n"+b+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if keys, err := readGossipKeys(path); err != nil || !slices.Equal(keys, []string{a, b}) {
		t.Fatalf("keys %q, %v", keys, err)
	}
	h, err := parseMemberHealth([]byte(`{"members":[{"id":"n1","role":"server","health":"alive"},{"id":"gw-local","role":"gateway","health":"suspect"}]}`))
	if err != nil || h["n1"] != "alive" || h["gw-local"] != "suspect" || len(h) != 2 {
		t.Fatalf("health %v, %v", h, err)
	}
	if _, err := parseMemberHealth([]byte(`{"members":[]}`)); err == nil {
		t.Fatal("a status without members gave no error")
	}
}
