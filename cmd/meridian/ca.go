package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/meridian-registry/meridian/node/pki"
)

const caUsage = `Usage:
  meridian ca init  --dir DIR [--cluster-id ID]
  meridian ca issue --dir DIR --role node|gateway|admin --id ID [--dns NAME]… [--ip IP]… [--validity 8760h]
  meridian ca revoke --dir DIR (--id ID | --cert FILE)

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
