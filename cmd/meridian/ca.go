package main

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/meridian-registry/meridian/node"
	"github.com/meridian-registry/meridian/node/pki"
)

const caUsage = `Usage:
  meridian ca init  --dir DIR [--cluster-id ID]
  meridian ca issue --dir DIR --role node|gateway|admin --id ID [--dns NAME]… [--ip IP]… [--validity 8760h]
  meridian ca revoke --dir DIR (--id ID | --cert FILE)
  meridian ca bootstrap --dir DIR [--cluster-id ID] [--node ID]… [--gateway ID]… [--admin ID]… [--dns NAME]… [--admin-password]

init writes a new cluster CA into DIR: DIR/ca.crt, DIR/ca.key (0600) and a
fresh gossip key DIR/gossip.key (0600). The CA names the cluster
(--cluster-id, default meridian: the same id the nodes run with); it is never
overwritten.

issue signs a certificate for one member and writes DIR/ID.crt and DIR/ID.key
(0600). The member's identity, spiffe://CLUSTER/ROLE/ID, is in the
certificate: a node's ID is its --node-id, a gateway's its --gateway-id, an
admin's any name. --dns and --ip add host names for HTTPS clients. Issuing
again for the same ID renews the certificate; processes using the files
pick it up without a restart.

revoke adds a certificate (DIR/ID.crt, or --cert FILE) to the CA's signed
revocation list DIR/ca.crl (init writes an empty one). Members started with
--tls-crl pointing at a copy of it refuse that certificate on gRPC and Raft
as soon as the new list reaches them: they re-read it when it changes. Copy
ca.crl wherever ca.crt goes. A new certificate issued for the same ID has a
new serial number and is not revoked.

bootstrap makes DIR hold what a new cluster's members need, creating only
what is missing, so it can run before every start (a compose or Kubernetes
init step): the CA and gossip key (as init), the revocation list, a
certificate for each --node, --gateway and --admin ID (each with every
--dns name), and with --admin-password a generated password for the first
admin in DIR/admin-password (0600), for the nodes' --admin-password-file.
Existing files are kept as they are; secrets are never printed.
`

func ca(args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, caUsage)
		return errors.New("ca: missing subcommand")
	}
	switch args[0] {
	case "init":
		return caInit(args[1:])
	case "issue":
		return caIssue(args[1:])
	case "revoke":
		return caRevoke(args[1:])
	case "bootstrap":
		return caBootstrap(args[1:])
	case "help", "-h", "--help":
		fmt.Print(caUsage)
		return nil
	default:
		fmt.Fprint(os.Stderr, caUsage)
		return fmt.Errorf("ca: unknown subcommand %q", args[0])
	}
}

func caInit(args []string) error {
	fs := flag.NewFlagSet("ca init", flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprint(fs.Output(), caUsage) }
	dir := fs.String("dir", "", "directory for the CA (created 0700)")
	clusterID := fs.String("cluster-id", "meridian", "the cluster's id, as the nodes' --cluster-id")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("ca init: unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	if *dir == "" {
		return errors.New("ca init: --dir is required")
	}
	if err := pki.InitCA(*dir, *clusterID); err != nil {
		return fmt.Errorf("ca init: %w", err)
	}
	fmt.Printf("cluster CA for %q in %s: %s, %s (keep it secret), %s (keep it secret)\n", *clusterID, *dir,
		pki.CACertFile, pki.CAKeyFile, pki.GossipKeyFile)
	return nil
}

func caIssue(args []string) error {
	fs := flag.NewFlagSet("ca issue", flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprint(fs.Output(), caUsage) }
	dir := fs.String("dir", "", "the CA's directory (from ca init); the certificate is written there")
	role := fs.String("role", "", "node, gateway or admin")
	id := fs.String("id", "", "the member's id: node id, gateway id or admin name")
	validity := fs.Duration("validity", pki.DefaultValidity, "how long the certificate is valid (capped at the CA's expiry)")
	var dns, ips repeated
	fs.Var(&dns, "dns", "a DNS name for HTTPS clients (repeatable)")
	fs.Var(&ips, "ip", "an IP address for HTTPS clients (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("ca issue: unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	switch {
	case *dir == "":
		return errors.New("ca issue: --dir is required")
	case *role == "":
		return fmt.Errorf("ca issue: --role is required (%s)", strings.Join(pki.Roles, ", "))
	case *id == "":
		return errors.New("ca issue: --id is required")
	case *validity <= 0:
		return fmt.Errorf("ca issue: --validity %v: must be positive", *validity)
	}
	req := pki.IssueRequest{Role: *role, ID: *id, DNSNames: dns, Validity: *validity}
	for _, s := range ips {
		ip := net.ParseIP(s)
		if ip == nil {
			return fmt.Errorf("ca issue: --ip %q is not an IP address", s)
		}
		req.IPs = append(req.IPs, ip)
	}
	certPath, keyPath, err := pki.Issue(*dir, req)
	if err != nil {
		return fmt.Errorf("ca issue: %w", err)
	}
	fmt.Printf("%s certificate for %s: %s, %s (valid %s)\n", *role, *id, certPath, keyPath, validity.Round(time.Hour))
	return nil
}

// repeated is a flag that may be given several times.
type repeated []string

func (r *repeated) String() string { return strings.Join(*r, ",") }

func (r *repeated) Set(v string) error {
	if v == "" {
		return errors.New("empty value")
	}
	*r = append(*r, v)
	return nil
}

func caRevoke(args []string) error {
	fs := flag.NewFlagSet("ca revoke", flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprint(fs.Output(), caUsage) }
	dir := fs.String("dir", "", "the CA's directory (from ca init); ca.crl there is updated")
	id := fs.String("id", "", "revoke DIR/ID.crt")
	cert := fs.String("cert", "", "revoke this certificate file instead")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("ca revoke: unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	switch {
	case *dir == "":
		return errors.New("ca revoke: --dir is required")
	case (*id == "") == (*cert == ""):
		return errors.New("ca revoke: give exactly one of --id and --cert")
	}
	path := *cert
	if *id != "" {
		if !pki.ValidID(*id) {
			return fmt.Errorf("ca revoke: --id %q is not a member id", *id)
		}
		path = filepath.Join(*dir, *id+".crt")
	}
	serial, err := pki.Revoke(*dir, path)
	if err != nil {
		return fmt.Errorf("ca revoke: %w", err)
	}
	fmt.Printf("revoked %s (serial %s) in %s; copy it to every member's --tls-crl\n", path, serial, filepath.Join(*dir, pki.CRLFile))
	return nil
}

func caBootstrap(args []string) error {
	fs := flag.NewFlagSet("ca bootstrap", flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprint(fs.Output(), caUsage) }
	dir := fs.String("dir", "", "directory for the CA, certificates and secrets (created 0700)")
	clusterID := fs.String("cluster-id", "meridian", "the cluster's id, as the nodes' --cluster-id (used when the CA is created)")
	password := fs.Bool("admin-password", false, "also generate the first admin's password into DIR/"+node.AdminPasswordFileName)
	var nodes, gateways, admins, dns repeated
	fs.Var(&nodes, "node", "a node id to issue a certificate for (repeatable)")
	fs.Var(&gateways, "gateway", "a gateway id to issue a certificate for (repeatable)")
	fs.Var(&admins, "admin", "an admin name to issue a certificate for (repeatable)")
	fs.Var(&dns, "dns", "a DNS name put on every certificate issued, for HTTPS clients (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("ca bootstrap: unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	if *dir == "" {
		return errors.New("ca bootstrap: --dir is required")
	}
	plan := pkiPlan{clusterID: *clusterID, adminPassword: *password}
	for _, group := range []struct {
		role string
		ids  []string
	}{{pki.RoleNode, nodes}, {pki.RoleGateway, gateways}, {pki.RoleAdmin, admins}} {
		for _, id := range group.ids {
			plan.members = append(plan.members, pki.IssueRequest{Role: group.role, ID: id, DNSNames: dns})
		}
	}
	made, err := ensurePKI(*dir, plan)
	if err != nil {
		return fmt.Errorf("ca bootstrap: %w", err)
	}
	if len(made) == 0 {
		fmt.Printf("%s already holds everything asked for\n", *dir)
	}
	for _, m := range made {
		fmt.Printf("created %s\n", m)
	}
	return nil
}

// pkiPlan is what a cluster's secrets directory must hold.
type pkiPlan struct {
	clusterID     string
	members       []pki.IssueRequest
	adminPassword bool
}

// ensurePKI creates in dir whatever of plan is missing (CA and gossip key,
// revocation list, member certificates, first admin's password) and keeps
// what exists; it returns what it created.
func ensurePKI(dir string, plan pkiPlan) (made []string, err error) {
	seen := map[string]bool{}
	for _, m := range plan.members {
		if seen[m.ID] {
			return nil, fmt.Errorf("id %q is given twice: certificates are named by id", m.ID)
		}
		seen[m.ID] = true
	}
	if _, err := os.Stat(filepath.Join(dir, pki.CACertFile)); errors.Is(err, os.ErrNotExist) {
		if err := pki.InitCA(dir, plan.clusterID); err != nil {
			return nil, err
		}
		made = append(made, fmt.Sprintf("the cluster CA for %q (%s, %s)", plan.clusterID, pki.CACertFile, pki.GossipKeyFile))
	} else if err != nil {
		return nil, err
	} else if id, err := pki.CAClusterID(dir); err != nil {
		return nil, err
	} else if id != plan.clusterID {
		return nil, fmt.Errorf("%s holds the CA of cluster %q, not %q: use another directory or --cluster-id %s", dir, id, plan.clusterID, id)
	}
	if err := pki.EnsureCRL(dir); err != nil {
		return nil, err
	}
	for _, m := range plan.members {
		if _, err := os.Stat(filepath.Join(dir, m.ID+".crt")); err == nil {
			if _, err := os.Stat(filepath.Join(dir, m.ID+".key")); err != nil {
				return nil, fmt.Errorf("%s.crt is there but not its key (%v): remove the certificate to issue a new pair", m.ID, err)
			}
			continue
		}
		if _, _, err := pki.Issue(dir, m); err != nil {
			return nil, fmt.Errorf("certificate for %s: %w", m.ID, err)
		}
		made = append(made, fmt.Sprintf("the certificate of %s %s", m.Role, m.ID))
	}
	if plan.adminPassword {
		path := filepath.Join(dir, node.AdminPasswordFileName)
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			if err := pki.WriteFileAtomic(path, []byte(newSecret()+"\n"), 0o600); err != nil {
				return nil, err
			}
			made = append(made, "the first admin's password ("+path+")")
		} else if err != nil {
			return nil, err
		}
	}
	return made, nil
}

// newSecret is 256 random bits, URL-safe: a password no one has to type.
func newSecret() string {
	b := make([]byte, 32)
	rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}
