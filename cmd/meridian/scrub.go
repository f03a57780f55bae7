package main

import (
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

const scrubUsage = `Usage:
  meridian scrub [--addr HOST:PORT] [--region NAME]… [--json] [--timeout 1h]

Re-hashes every placed copy of every blob (in the named regions, all when
none), through the node at --addr, and replaces a copy whose bytes do not
match its digest with a verified copy from another region. It prints what it
checked and every mismatch, and exits 1 if a mismatch could not be repaired.
Nodes also scrub their share of their own region in the background
(--scrub-interval, --scrub-rate). Takes the admin certificate like the
cluster commands (--tls-* or MERIDIAN_TLS_*).
`

func scrub(args []string) error {
	a := newAdminFlags("scrub")
	a.fs.Usage = func() { fmt.Fprint(a.fs.Output(), scrubUsage) }
	var regions repeated
	a.fs.Var(&regions, "region", "scrub this region only (repeatable)")
	asJSON := a.fs.Bool("json", false, "print JSON")
	if err := a.fs.Set("timeout", "1h"); err != nil {
		return err
	}
	if err := a.fs.Parse(args); err != nil {
		return err
	}
	if a.fs.NArg() > 0 {
		return fmt.Errorf("scrub takes no arguments (got %v)", a.fs.Args())
	}
	c, ctx, done, err := a.dial()
	if err != nil {
		return err
	}
	defer done()
	resp, err := c.Scrub(ctx, &pb.ScrubRequest{Regions: regions})
	if err != nil {
		return fmt.Errorf("scrub through %s: %w", *a.addr, err)
	}
	if *asJSON {
		b, _ := protojson.MarshalOptions{Multiline: true, EmitUnpopulated: true}.Marshal(resp)
		fmt.Println(string(b))
	} else {
		fmt.Printf("checked %d copies (%d bytes) in %v; %d unreadable, %d mismatched\n",
			resp.Checked, resp.Bytes, time.Duration(resp.TookNanos).Round(time.Millisecond), resp.Unreadable, len(resp.Mismatches))
		if len(resp.Mismatches) > 0 {
			w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "DIGEST\tREGION\tREPAIRED\tDETAIL")
			for _, m := range resp.Mismatches {
				fmt.Fprintf(w, "%s\t%s\t%v\t%s\n", m.Digest, m.Region, m.Repaired, m.Detail)
			}
			w.Flush()
		}
	}
	for _, m := range resp.Mismatches {
		if !m.Repaired {
			return fmt.Errorf("scrub: %s in %s does not match its digest and could not be repaired", m.Digest, m.Region)
		}
	}
	return nil
}
