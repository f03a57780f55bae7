package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/meridian-registry/meridian/node"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

const lifecycleUsage = `Lifecycle (admin: an admin certificate, --tls-*, or an admin user,
MERIDIAN_USERNAME and MERIDIAN_PASSWORD or --username and --password-file):

  meridian gc run [--dry-run] [--grace DURATION] [--untagged DURATION] [--json]
                      collect blobs no manifest has referenced for --grace (default: the
                      cluster's gc.grace) and, with --untagged, manifests untagged that long;
                      --dry-run lists what a run would take and changes nothing
  meridian gc status [--json]
                      the last run, and per region the bytes freed and still to remove
  meridian repo delete NAME
                      delete a repository: its tags, manifests and blob links
  meridian immutable add --repositories PATTERN --tags GLOB
  meridian immutable delete --repositories PATTERN --tags GLOB
  meridian immutable list
                      tags a rule covers cannot be moved or deleted once they exist
  meridian quota set --repositories PATTERN [--max-bytes 10GiB] [--max-repositories N] [--max-tags N]
  meridian quota delete --repositories PATTERN
  meridian quota list [--json]
                      limits on what the covered repositories hold together, and their usage
  meridian retention set --repositories PATTERN [--keep-tags N] [--tag-pattern GLOB]
                      [--untagged-after DURATION] [--keep-pulled-within DURATION] [--protect GLOB]...
  meridian retention delete --repositories PATTERN
  meridian retention list [--json]
  meridian retention run [--dry-run] [--json]
                      apply the rules now (they also run every gc.interval); --dry-run lists
                      exactly what a run would delete

Every command takes --addr (any node's gRPC address).
`

func printJSON(m proto.Message) {
	b, _ := protojson.MarshalOptions{Multiline: true, EmitUnpopulated: true}.Marshal(m)
	fmt.Println(string(b))
}

func gcCmd(args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, lifecycleUsage)
		return errors.New("gc: want run or status")
	}
	a := newAdminFlags("gc " + args[0])
	a.fs.Usage = func() { fmt.Fprint(a.fs.Output(), lifecycleUsage) }
	asJSON := a.fs.Bool("json", false, "print JSON")
	switch args[0] {
	case "run":
		dry := a.fs.Bool("dry-run", false, "list what a run would collect; change nothing")
		grace := a.fs.Duration("grace", 0, "collect blobs unreferenced this long (default: the cluster's gc.grace)")
		untagged := a.fs.Duration("untagged", 0, "also collect manifests untagged this long (default: the cluster's gc.untagged)")
		if err := a.fs.Set("timeout", "10m"); err != nil {
			return err
		}
		if err := flagsOnly(a, args[1:], "gc run"); err != nil {
			return err
		}
		req := &pb.RunGCRequest{DryRun: *dry}
		a.fs.Visit(func(f *flag.Flag) {
			switch f.Name {
			case "grace":
				req.GraceNanos = proto.Int64(int64(*grace))
			case "untagged":
				req.UntaggedNanos = proto.Int64(int64(*untagged))
			}
		})
		if (req.GraceNanos != nil && *req.GraceNanos < 0) || (req.UntaggedNanos != nil && *req.UntaggedNanos < 0) {
			return errors.New("gc run: --grace and --untagged cannot be negative")
		}
		c, ctx, done, err := a.dial()
		if err != nil {
			return err
		}
		defer done()
		resp, err := c.RunGC(ctx, req)
		if err != nil {
			return fmt.Errorf("gc run: %w", readable(err))
		}
		if err := resp.Result.Err(); err != nil {
			return fmt.Errorf("gc run: %w", readable(err))
		}
		if *asJSON {
			printJSON(resp)
			return nil
		}
		printGCRun(resp)
		return nil
	case "status":
		if err := flagsOnly(a, args[1:], "gc status"); err != nil {
			return err
		}
		c, ctx, done, err := a.dial()
		if err != nil {
			return err
		}
		defer done()
		resp, err := c.GCStatus(ctx, &pb.GCStatusRequest{})
		if err != nil {
			return fmt.Errorf("gc status: %w", readable(err))
		}
		if *asJSON {
			printJSON(resp)
			return nil
		}
		printGCStatus(resp)
		return nil
	default:
		fmt.Fprint(os.Stderr, lifecycleUsage)
		return fmt.Errorf("gc: unknown command %q (want run or status)", args[0])
	}
}

// bytesOf prints a byte count in binary units (1.5 MiB).
func bytesOf(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func printGCRun(r *pb.RunGCResponse) {
	what := "run " + r.RunId
	if r.DryRun {
		what = "dry run (nothing changed)"
	}
	fmt.Printf("%s: blobs unreferenced since before %s", what, stamp(r.UnreferencedBeforeUnixNano))
	if r.UntaggedBeforeUnixNano != 0 {
		fmt.Printf(", manifests untagged since before %s", stamp(r.UntaggedBeforeUnixNano))
	}
	fmt.Println()
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	var condemned, bytes, links int64
	for _, m := range r.Manifests {
		fmt.Fprintf(w, "manifest\t%s@%s\tuntagged\n", m.Repository, m.Digest)
	}
	for _, b := range r.Blobs {
		links += int64(len(b.Unlinked))
		if b.Condemned {
			condemned++
			bytes += b.Size
			fmt.Fprintf(w, "blob\t%s\t%s\tfreed in every region\n", b.Digest, bytesOf(b.Size))
		} else {
			fmt.Fprintf(w, "link\t%s\t%s\tunlinked from %v; other repositories still use it\n", b.Digest, bytesOf(b.Size), b.Unlinked)
		}
	}
	w.Flush()
	if r.DryRun {
		fmt.Printf("would delete %d manifests, drop %d blob links and free %d blobs (%s)\n", len(r.Manifests), links, condemned, bytesOf(bytes))
		return
	}
	run := r.Run
	fmt.Printf("deleted %d manifests, dropped %d blob links, condemned %d blobs (%s) in %v\n",
		run.GetManifestsDeleted(), run.GetLinksDropped(), run.GetBlobsCondemned(), bytesOf(run.GetBytesCondemned()),
		time.Duration(r.DurationNanos).Round(time.Millisecond))
	if run.GetBlobsCondemned() < condemned || run.GetManifestsDeleted() < int64(len(r.Manifests)) {
		fmt.Println("(pushes during the run kept some candidates)")
	}
	if run.GetBlobsCondemned() > 0 {
		fmt.Println("each region now deletes the condemned bytes; meridian gc status shows the progress")
	}
}

func printGCStatus(s *pb.GCStatusResponse) {
	every := "only on demand"
	if s.IntervalNanos > 0 {
		every = "every " + time.Duration(s.IntervalNanos).String()
	}
	untagged := "kept"
	if s.UntaggedNanos > 0 {
		untagged = "collected after " + time.Duration(s.UntaggedNanos).String()
	}
	fmt.Printf("schedule: %s, grace %v, untagged manifests %s\n", every, time.Duration(s.GraceNanos), untagged)
	if r := s.LastRun; r != nil {
		fmt.Printf("last run %s at %s: %d candidates, %d manifests deleted, %d links dropped, %d blobs condemned (%s)\n",
			r.RunId, stamp(r.StartedUnixNano), r.Candidates, r.ManifestsDeleted, r.LinksDropped, r.BlobsCondemned, bytesOf(r.BytesCondemned))
	} else {
		fmt.Println("no run yet")
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "REGION\tFREED BLOBS\tFREED\tPENDING BLOBS\tPENDING")
	for _, g := range s.Regions {
		fmt.Fprintf(w, "%s\t%d\t%s\t%d\t%s\n", g.Region, g.BlobsFreed, bytesOf(g.BytesFreed), g.BlobsPending, bytesOf(g.BytesPending))
	}
	w.Flush()
}

// flagsOnly parses a command that takes flags but no arguments.
func flagsOnly(a adminFlags, args []string, cmd string) error {
	pos, err := parseMixed(a.fs, args)
	if err == nil && len(pos) > 0 {
		err = fmt.Errorf("%s takes flags only (got %v)", cmd, pos)
	}
	return err
}

// listLifecycle runs a list command: its --json flag, no arguments, and
// the lifecycle rules from the node.
func listLifecycle(a adminFlags, args []string, cmd string) (resp *pb.ListLifecycleResponse, asJSON bool, err error) {
	jsonFlag := a.fs.Bool("json", false, "print JSON")
	if err := flagsOnly(a, args, cmd); err != nil {
		return nil, false, err
	}
	c, ctx, done, err := a.dial()
	if err != nil {
		return nil, false, err
	}
	defer done()
	if resp, err = c.ListLifecycle(ctx, &pb.ListLifecycleRequest{}); err != nil {
		return nil, false, fmt.Errorf("%s: %w", cmd, readable(err))
	}
	return resp, *jsonFlag, nil
}

func manageLifecycle(a adminFlags, req *pb.ManageLifecycleRequest) error {
	c, ctx, done, err := a.dial()
	if err != nil {
		return err
	}
	defer done()
	resp, err := c.ManageLifecycle(ctx, req)
	if err != nil {
		return readable(err)
	}
	return readable(resp.Result.Err())
}

func repoCmd(args []string) error {
	if len(args) == 0 || args[0] != "delete" {
		fmt.Fprint(os.Stderr, lifecycleUsage)
		return errors.New("repo: want delete NAME")
	}
	a := newAdminFlags("repo delete")
	a.fs.Usage = func() { fmt.Fprint(a.fs.Output(), lifecycleUsage) }
	name, err := parseName(a.fs, args[1:], "repo delete")
	if err != nil {
		return err
	}
	if err := manageLifecycle(a, &pb.ManageLifecycleRequest{Change: &pb.ManageLifecycleRequest_DeleteRepository{
		DeleteRepository: &pb.DeleteRepository{Repository: name}}}); err != nil {
		return fmt.Errorf("repo delete %s: %w", name, err)
	}
	fmt.Printf("deleted repository %s; garbage collection frees the blobs no other repository uses\n", name)
	return nil
}

func immutableCmd(args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, lifecycleUsage)
		return errors.New("immutable: want add, delete or list")
	}
	a := newAdminFlags("immutable " + args[0])
	a.fs.Usage = func() { fmt.Fprint(a.fs.Output(), lifecycleUsage) }
	switch args[0] {
	case "add", "delete":
		repos := a.fs.String("repositories", "", `repository pattern: a prefix ("team/app") or glob ("team/*"); empty: every repository`)
		tags := a.fs.String("tags", "", `tag glob, e.g. "v*" or "*"`)
		if err := flagsOnly(a, args[1:], "immutable "+args[0]); err != nil {
			return err
		}
		if *tags == "" {
			return fmt.Errorf("immutable %s: --tags is required", args[0])
		}
		rule := &pb.ImmutableRule{Repositories: *repos, Tags: *tags}
		req := &pb.ManageLifecycleRequest{Change: &pb.ManageLifecycleRequest_SetImmutableRule{SetImmutableRule: &pb.SetImmutableRule{Rule: rule}}}
		if args[0] == "delete" {
			req.Change = &pb.ManageLifecycleRequest_DeleteImmutableRule{DeleteImmutableRule: &pb.DeleteImmutableRule{Rule: rule}}
		}
		if err := manageLifecycle(a, req); err != nil {
			return fmt.Errorf("immutable %s: %w", args[0], err)
		}
		fmt.Printf("%s immutability rule: %s\n", map[string]string{"add": "added", "delete": "deleted"}[args[0]], rule.Describe())
		return nil
	case "list":
		resp, asJSON, err := listLifecycle(a, args[1:], "immutable list")
		if err != nil {
			return err
		}
		if asJSON {
			printJSON(&pb.ListLifecycleResponse{ImmutableRules: resp.ImmutableRules})
			return nil
		}
		w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(w, "REPOSITORIES\tTAGS")
		for _, r := range resp.ImmutableRules {
			repos := r.Repositories
			if repos == "" {
				repos = "*"
			}
			fmt.Fprintf(w, "%s\t%s\n", repos, r.Tags)
		}
		return w.Flush()
	default:
		fmt.Fprint(os.Stderr, lifecycleUsage)
		return fmt.Errorf("immutable: unknown command %q (want add, delete or list)", args[0])
	}
}

func quotaCmd(args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, lifecycleUsage)
		return errors.New("quota: want set, delete or list")
	}
	a := newAdminFlags("quota " + args[0])
	a.fs.Usage = func() { fmt.Fprint(a.fs.Output(), lifecycleUsage) }
	switch args[0] {
	case "set", "delete":
		repos := a.fs.String("repositories", "", `repository pattern: a prefix ("team") or glob ("team/*"); empty: every repository`)
		maxBytes := a.fs.String("max-bytes", "0", "storage limit (suffixes KiB, MiB, GiB, TiB; 0: none)")
		maxRepos := a.fs.Int64("max-repositories", 0, "repository limit (0: none)")
		maxTags := a.fs.Int64("max-tags", 0, "tag limit (0: none)")
		if err := flagsOnly(a, args[1:], "quota "+args[0]); err != nil {
			return err
		}
		var req *pb.ManageLifecycleRequest
		if args[0] == "delete" {
			req = &pb.ManageLifecycleRequest{Change: &pb.ManageLifecycleRequest_DeleteQuota{DeleteQuota: &pb.DeleteQuota{Repositories: *repos}}}
		} else {
			b, err := node.ParseByteSize(*maxBytes)
			if err != nil {
				return fmt.Errorf("quota set: --max-bytes: %w", err)
			}
			req = &pb.ManageLifecycleRequest{Change: &pb.ManageLifecycleRequest_SetQuota{SetQuota: &pb.SetQuota{Quota: &pb.Quota{
				Repositories: *repos, MaxBytes: int64(b), MaxRepositories: *maxRepos, MaxTags: *maxTags}}}}
		}
		if err := manageLifecycle(a, req); err != nil {
			return fmt.Errorf("quota %s: %w", args[0], err)
		}
		fmt.Printf("%s the quota on repositories %q\n", map[string]string{"set": "set", "delete": "deleted"}[args[0]], *repos)
		return nil
	case "list":
		resp, asJSON, err := listLifecycle(a, args[1:], "quota list")
		if err != nil {
			return err
		}
		if asJSON {
			printJSON(&pb.ListLifecycleResponse{Quotas: resp.Quotas})
			return nil
		}
		limit := func(used, max int64, format func(int64) string) string {
			if max == 0 {
				return format(used) + " (no limit)"
			}
			return fmt.Sprintf("%s of %s", format(used), format(max))
		}
		count := func(n int64) string { return fmt.Sprint(n) }
		w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(w, "REPOSITORIES\tSTORAGE\tREPOSITORIES USED\tTAGS")
		for _, u := range resp.Quotas {
			q := u.Quota
			repos := q.Repositories
			if repos == "" {
				repos = "*"
			}
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", repos, limit(u.Bytes, q.MaxBytes, bytesOf), limit(u.Repositories, q.MaxRepositories, count), limit(u.Tags, q.MaxTags, count))
		}
		return w.Flush()
	default:
		fmt.Fprint(os.Stderr, lifecycleUsage)
		return fmt.Errorf("quota: unknown command %q (want set, delete or list)", args[0])
	}
}

func retentionCmd(args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, lifecycleUsage)
		return errors.New("retention: want set, delete, list or run")
	}
	a := newAdminFlags("retention " + args[0])
	a.fs.Usage = func() { fmt.Fprint(a.fs.Output(), lifecycleUsage) }
	switch args[0] {
	case "set", "delete":
		repos := a.fs.String("repositories", "", `repository pattern: a prefix ("team") or glob ("team/*"); empty: every repository`)
		keep := a.fs.Int("keep-tags", 0, "keep the newest N tags of each repository by push time (0: no count rule)")
		pattern := a.fs.String("tag-pattern", "", `count only tags matching this glob, e.g. "v*" (others are kept)`)
		untagged := a.fs.Duration("untagged-after", 0, "delete manifests untagged and unreferenced this long (0: keep them)")
		pulled := a.fs.Duration("keep-pulled-within", 0, "keep anything pulled within this window (0: pulls do not count)")
		var protect repeated
		a.fs.Var(&protect, "protect", "never delete tags matching this glob (repeatable)")
		if err := flagsOnly(a, args[1:], "retention "+args[0]); err != nil {
			return err
		}
		var req *pb.ManageLifecycleRequest
		if args[0] == "delete" {
			req = &pb.ManageLifecycleRequest{Change: &pb.ManageLifecycleRequest_DeleteRetentionRule{DeleteRetentionRule: &pb.DeleteRetentionRule{Repositories: *repos}}}
		} else {
			req = &pb.ManageLifecycleRequest{Change: &pb.ManageLifecycleRequest_SetRetentionRule{SetRetentionRule: &pb.SetRetentionRule{Rule: &pb.RetentionRule{
				Repositories: *repos, KeepTags: int32(*keep), TagPattern: *pattern, UntaggedAfterNanos: int64(*untagged),
				KeepPulledWithinNanos: int64(*pulled), ProtectedTags: protect}}}}
		}
		if err := manageLifecycle(a, req); err != nil {
			return fmt.Errorf("retention %s: %w", args[0], err)
		}
		fmt.Printf("%s the retention rule on repositories %q\n", map[string]string{"set": "set", "delete": "deleted"}[args[0]], *repos)
		return nil
	case "list":
		resp, asJSON, err := listLifecycle(a, args[1:], "retention list")
		if err != nil {
			return err
		}
		if asJSON {
			printJSON(&pb.ListLifecycleResponse{RetentionRules: resp.RetentionRules})
			return nil
		}
		w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(w, "REPOSITORIES\tKEEP TAGS\tTAG PATTERN\tUNTAGGED AFTER\tKEEP PULLED WITHIN\tPROTECTED")
		dur := func(n int64) string {
			if n == 0 {
				return "-"
			}
			return time.Duration(n).String()
		}
		for _, r := range resp.RetentionRules {
			repos, keep, pattern := r.Repositories, "-", r.TagPattern
			if repos == "" {
				repos = "*"
			}
			if r.KeepTags > 0 {
				keep = fmt.Sprint(r.KeepTags)
			}
			if pattern == "" {
				pattern = "*"
			}
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%v\n", repos, keep, pattern, dur(r.UntaggedAfterNanos), dur(r.KeepPulledWithinNanos), r.ProtectedTags)
		}
		return w.Flush()
	case "run":
		dry := a.fs.Bool("dry-run", false, "list what a run would delete; change nothing")
		asJSON := a.fs.Bool("json", false, "print JSON")
		if err := a.fs.Set("timeout", "10m"); err != nil {
			return err
		}
		if err := flagsOnly(a, args[1:], "retention "+args[0]); err != nil {
			return err
		}
		c, ctx, done, err := a.dial()
		if err != nil {
			return err
		}
		defer done()
		resp, err := c.RunRetention(ctx, &pb.RunRetentionRequest{DryRun: *dry})
		if err == nil {
			err = resp.Result.Err()
		}
		if err != nil {
			return fmt.Errorf("retention run: %w", readable(err))
		}
		if *asJSON {
			printJSON(resp)
			return nil
		}
		w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		for _, t := range resp.Tags {
			fmt.Fprintf(w, "tag\t%s:%s\t%s\n", t.Repository, t.Tag, t.Digest)
		}
		for _, m := range resp.Manifests {
			fmt.Fprintf(w, "manifest\t%s@%s\tuntagged\n", m.Repository, m.Digest)
		}
		w.Flush()
		if resp.DryRun {
			fmt.Printf("dry run (nothing changed): would delete %d tags and %d untagged manifests\n", len(resp.Tags), len(resp.Manifests))
			return nil
		}
		fmt.Printf("deleted %d tags and %d manifests (a manifest goes with its last tag); garbage collection frees their blobs\n",
			resp.Run.GetTagsDeleted(), resp.Run.GetManifestsDeleted())
		if resp.Run.GetTagsDeleted() < int64(len(resp.Tags)) {
			fmt.Println("(pushes or pulls during the run kept some of them)")
		}
		return nil
	default:
		fmt.Fprint(os.Stderr, lifecycleUsage)
		return fmt.Errorf("retention: unknown command %q (want set, delete, list or run)", args[0])
	}
}
