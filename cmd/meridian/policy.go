package main

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"

	"google.golang.org/protobuf/encoding/protojson"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

const policyUsage = `Usage:
  meridian policy list   [--addr HOST:PORT] [--json]
  meridian policy set    [--addr HOST:PORT] [--regions A,B,…] [--min-regions N] PREFIX
  meridian policy delete [--addr HOST:PORT] PREFIX

A policy says which regions hold the blobs of repositories whose names start
with PREFIX ("" is every repository) and how many must hold a pushed blob
before its PUT answers 201. The longest matching prefix wins; fields a policy
leaves unset (no --regions, --min-regions 0) inherit from shorter prefixes,
and at the root: every region, min-regions 1. Changes apply cluster-wide at
once. --addr is any node's gRPC address (default 127.0.0.1:5001).
`

func policy(args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, policyUsage)
		return errors.New("policy: missing subcommand")
	}
	switch args[0] {
	case "list":
		return policyList(args[1:])
	case "set":
		return policySet(args[1:])
	case "delete":
		return policyDelete(args[1:])
	default:
		fmt.Fprint(os.Stderr, policyUsage)
		return fmt.Errorf("policy: unknown subcommand %q", args[0])
	}
}

func policyList(args []string) error {
	a := newAdminFlags("policy list")
	asJSON := a.fs.Bool("json", false, "print JSON")
	if err := a.fs.Parse(args); err != nil {
		return err
	}
	if a.fs.NArg() > 0 {
		return errors.New("policy list takes no arguments")
	}
	c, ctx, done, err := a.dial()
	if err != nil {
		return err
	}
	defer done()
	resp, err := c.ListPolicies(ctx, &pb.ListPoliciesRequest{})
	if err != nil {
		return fmt.Errorf("list policies from %s: %w", *a.addr, err)
	}
	if *asJSON {
		b, _ := protojson.MarshalOptions{Multiline: true, EmitUnpopulated: true}.Marshal(resp)
		fmt.Println(string(b))
		return nil
	}
	fmt.Printf("regions: %s\n\n", strings.Join(resp.Regions, ", "))
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "PREFIX\tREGIONS\tMIN REGIONS\tRESOLVES TO")
	for _, p := range resp.Policies {
		regions, min := "(inherit)", "(inherit)"
		if len(p.Regions) > 0 {
			regions = strings.Join(p.Regions, ",")
		}
		if p.MinRegions > 0 {
			min = fmt.Sprint(p.MinRegions)
		}
		eff := pb.ResolvePolicy(resp.Policies, resp.Regions, p.Prefix)
		fmt.Fprintf(w, "%q\t%s\t%s\t%s min %d\n", p.Prefix, regions, min, strings.Join(eff.Regions, ","), eff.MinRegions)
	}
	if len(resp.Policies) == 0 {
		fmt.Fprintf(w, "(none: every repository in every region, min 1)\t\t\t\n")
	}
	return w.Flush()
}

func policySet(args []string) error {
	a := newAdminFlags("policy set")
	regions := a.fs.String("regions", "", "comma-separated regions (empty: inherit)")
	minRegions := a.fs.Int("min-regions", 0, "regions that must hold a blob before its PUT answers 201 (0: inherit)")
	if err := a.fs.Parse(args); err != nil {
		return err
	}
	if a.fs.NArg() != 1 {
		return errors.New(`policy set takes exactly one PREFIX ("" for every repository)`)
	}
	if *minRegions < 0 {
		return errors.New("--min-regions cannot be negative")
	}
	p := &pb.Policy{Prefix: a.fs.Arg(0), MinRegions: int32(*minRegions)}
	for _, r := range strings.Split(*regions, ",") {
		if r = strings.TrimSpace(r); r != "" {
			p.Regions = append(p.Regions, r)
		}
	}
	c, ctx, done, err := a.dial()
	if err != nil {
		return err
	}
	defer done()
	resp, err := c.SetPolicy(ctx, &pb.SetPolicyRequest{Policy: p})
	if err != nil {
		return fmt.Errorf("set policy: %w", err)
	}
	if resp.Result.Err() != nil {
		return fmt.Errorf("set policy %q: %s", p.Prefix, resultText(resp.Result))
	}
	fmt.Printf("policy %q set\n", p.Prefix)
	return nil
}

func policyDelete(args []string) error {
	a := newAdminFlags("policy delete")
	if err := a.fs.Parse(args); err != nil {
		return err
	}
	if a.fs.NArg() != 1 {
		return errors.New("policy delete takes exactly one PREFIX")
	}
	c, ctx, done, err := a.dial()
	if err != nil {
		return err
	}
	defer done()
	resp, err := c.DeletePolicy(ctx, &pb.DeletePolicyRequest{Prefix: a.fs.Arg(0)})
	if err != nil {
		return fmt.Errorf("delete policy: %w", err)
	}
	if resp.Result.Err() != nil {
		return fmt.Errorf("delete policy %q: %s", a.fs.Arg(0), resultText(resp.Result))
	}
	fmt.Printf("policy %q deleted\n", a.fs.Arg(0))
	return nil
}
