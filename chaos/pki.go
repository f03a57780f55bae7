package chaos

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// Member roles, as `meridian ca issue --role` takes them.
const (
	roleNode    = "node"
	roleGateway = "gateway"
	roleAdmin   = "admin"
)

// adminID names the harness's own admin certificate: every `meridian
// cluster status` the harness runs presents it.
const adminID = "chaos-admin"

// certRotateWithin bounds how long a process may take to serve a
// certificate re-issued in place. Processes look at their certificate
// files again at most once a second, on a handshake; the rest is slack
// for a loaded machine.
const certRotateWithin = 10 * time.Second

// clusterPKI is the run's cluster CA, made with `meridian ca` under
// dir: ca.crt, ca.key, gossip.key and ID.crt/ID.key for every member and
// for the harness's admin, and ID.gossip.key (a copy of gossip.key) for
// every member.
type clusterPKI struct {
	meridian, dir, cluster string
	// admin and roots are what the harness dials members with.
	admin tls.Certificate
	roots *x509.CertPool
}

// pkiMember is one certificate to issue.
type pkiMember struct{ role, id string }

// newClusterPKI runs `meridian ca init` for cluster into dir (which must
// not hold a CA yet), then `meridian ca issue` for every member and the
// admin.
func newClusterPKI(ctx context.Context, meridian, dir, cluster string, members []pkiMember) (*clusterPKI, error) {
	p := &clusterPKI{meridian: meridian, dir: dir, cluster: cluster}
	if err := p.run(ctx, "ca", "init", "--dir", dir, "--cluster-id", cluster); err != nil {
		return nil, err
	}
	for _, m := range append(slices.Clone(members), pkiMember{roleAdmin, adminID}) {
		if err := p.issue(ctx, m.role, m.id); err != nil {
			return nil, err
		}
	}
	// Each member gets a copy of the key file: a member rewrites its own
	// after a keyring change, and restarts from it.
	key, err := os.ReadFile(p.gossipKeyFile())
	if err != nil {
		return nil, err
	}
	for _, m := range members {
		if err := os.WriteFile(p.memberGossipKeyFile(m.id), key, 0o600); err != nil {
			return nil, err
		}
	}
	if p.admin, err = tls.LoadX509KeyPair(p.certFile(adminID), p.keyFile(adminID)); err != nil {
		return nil, fmt.Errorf("chaos: admin certificate: %w", err)
	}
	caPEM, err := os.ReadFile(p.caFile())
	if err != nil {
		return nil, err
	}
	p.roots = x509.NewCertPool()
	if !p.roots.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("chaos: %s holds no certificate", p.caFile())
	}
	return p, nil
}

// issue runs `meridian ca issue` for id: a new certificate and key, or a
// renewal in place of the old ones.
func (p *clusterPKI) issue(ctx context.Context, role, id string) error {
	return p.run(ctx, "ca", "issue", "--dir", p.dir, "--role", role, "--id", id)
}

func (p *clusterPKI) run(ctx context.Context, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, p.meridian, args...)
	cmd.Env = harnessEnv()
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("chaos: meridian %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

func (p *clusterPKI) caFile() string            { return filepath.Join(p.dir, "ca.crt") }
func (p *clusterPKI) gossipKeyFile() string     { return filepath.Join(p.dir, "gossip.key") }
func (p *clusterPKI) certFile(id string) string { return filepath.Join(p.dir, id+".crt") }
func (p *clusterPKI) keyFile(id string) string  { return filepath.Join(p.dir, id+".key") }

// memberGossipKeyFile is id's own copy of the gossip keyring.
func (p *clusterPKI) memberGossipKeyFile(id string) string {
	return filepath.Join(p.dir, id+".gossip.key")
}

// tlsFlags name the CA and id's certificate and key: what an admin
// command takes.
func (p *clusterPKI) tlsFlags(id string) []string {
	return []string{"--tls-ca", p.caFile(), "--tls-cert", p.certFile(id), "--tls-key", p.keyFile(id)}
}

// memberFlags are what `meridian serve` or `meridian gateway` takes to
// run as id: mutual TLS and its own gossip key file.
func (p *clusterPKI) memberFlags(id string) []string {
	return append(p.tlsFlags(id), "--gossip-key-file", p.memberGossipKeyFile(id))
}

// identity is the spiffe URI a certificate of role and id carries.
func (p *clusterPKI) identity(role, id string) string {
	return "spiffe://" + p.cluster + "/" + role + "/" + id
}

// fileSerial is the serial number of id's certificate file.
func (p *clusterPKI) fileSerial(id string) (*big.Int, error) {
	b, err := os.ReadFile(p.certFile(id))
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("chaos: %s holds no PEM certificate", p.certFile(id))
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("chaos: %s: %w", p.certFile(id), err)
	}
	return cert.SerialNumber, nil
}

// errWrongPeer: the certificate a member served is not the one its
// identity calls for.
var errWrongPeer = errors.New("served certificate does not carry the expected identity")

// served dials addr with the admin certificate, as `meridian cluster
// status` would, and returns the certificate the member there presents.
// The certificate must chain to the cluster CA and carry identity (a
// spiffe URI; members are not named by host), or the handshake fails.
func (p *clusterPKI) served(ctx context.Context, addr, identity string) (*x509.Certificate, error) {
	cfg := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		NextProtos:   []string{"h2"},
		Certificates: []tls.Certificate{p.admin},
		// Verified below against the CA and by identity instead of by
		// host name; the handshake still proves the key is held.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("no server certificate")
			}
			leaf := cs.PeerCertificates[0]
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: p.roots, Intermediates: inter,
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
				return err
			}
			for _, u := range leaf.URIs {
				if u.String() == identity {
					return nil
				}
			}
			return fmt.Errorf("%w: %v, want %s", errWrongPeer, leaf.URIs, identity)
		},
	}
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 3 * time.Second}, Config: cfg}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	return conn.(*tls.Conn).ConnectionState().PeerCertificates[0], nil
}

// waitServed polls the member at addr until it serves a certificate for
// identity with serial want, which must differ from old (the serial
// before the rotation), and returns how long that took from since (the
// re-issue). It gives up within after since, when ctx ends or when exited
// (the member's process) closes, saying what it saw last.
func (p *clusterPKI) waitServed(ctx context.Context, addr, identity string, old, want *big.Int, since time.Time, within time.Duration,
	exited <-chan struct{}) (time.Duration, error) {
	ctx, cancel := context.WithDeadline(ctx, since.Add(within))
	defer cancel()
	last := "nothing"
	err := pollUntil(ctx, time.Until(since.Add(within)), 250*time.Millisecond, exited, func() bool {
		cert, err := p.served(ctx, addr, identity)
		if err != nil {
			last = err.Error()
			return false
		}
		last = "serial " + shortSerial(cert.SerialNumber)
		return cert.SerialNumber.Cmp(want) == 0 && want.Cmp(old) != 0
	})
	if err != nil {
		return 0, fmt.Errorf("new serial %s (was %s) not served within %v (%v); last seen: %s",
			shortSerial(want), shortSerial(old), within, err, last)
	}
	return time.Since(since), nil
}

// shortSerial is the first hex digits of a serial number, enough to tell
// certificates apart in a report.
func shortSerial(n *big.Int) string {
	if n == nil {
		return "-"
	}
	return abbrev(n.Text(16), 12)
}

// CheckCertRotations is the check of the cert-rotate faults: each
// certificate re-issued in place was served by its process within
// certRotateWithin, without a restart. Checked counts the rotations
// injected; a rotation whose Failure is set is a violation.
func CheckCertRotations(faults []Fault) CheckResult {
	return checkFaultOutcomes(faults, FaultCertRotate, CheckNameCertRotations,
		func(f Fault) string { return fmt.Sprintf("%s, re-issued at %s", f.Target, fmtOffset(f.Start)) },
		func(ok, checked int) string {
			return fmt.Sprintf("%d of %d certificates re-issued in place served within %v", ok, checked, certRotateWithin)
		}, "after its re-issue began")
}

// checkFaultOutcomes is the check of a fault kind that judges its own
// outcome (Failure set: a violation): every injected fault of kind is
// counted, and the slowest good one is reported as "slowest <d> <after>".
func checkFaultOutcomes(faults []Fault, kind, check string, name func(Fault) string, summary func(ok, checked int) string, after string) CheckResult {
	checked := 0
	var vs []Violation
	var took []time.Duration
	for _, f := range faults {
		if f.Kind != kind || f.Error != "" {
			continue
		}
		checked++
		if f.Failure != "" {
			vs = append(vs, Violation{Check: check, Message: name(f) + ": " + f.Failure})
		} else {
			took = append(took, f.End-f.Start)
		}
	}
	detail := summary(len(took), checked)
	if len(took) > 0 {
		detail += fmt.Sprintf(" (the slowest %v %s)", slices.Max(took).Round(10*time.Millisecond), after)
	}
	return newResult(check, checked, vs, detail)
}
