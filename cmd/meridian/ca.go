package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/meridian-registry/meridian/node/pki"
)

const caUsage = `Usage:
  meridian ca init  --dir DIR [--cluster-id ID]
  meridian ca issue --dir DIR --role node|gateway|admin --id ID [--dns NAME]… [--ip IP]… [--validity 8760h]

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
