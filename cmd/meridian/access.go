package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

const accessUsage = `Access control (admin: an admin certificate, --tls-*, or an admin user,
MERIDIAN_USERNAME and MERIDIAN_PASSWORD or --username and --password-file):

  meridian user add NAME [--password-stdin]   without a password given, prints a generated one
                                              alone on stdout's last line
  meridian user list | passwd NAME | delete NAME
  meridian team add TEAM --member NAME ...
  meridian robot create NAME --scope PREFIX:ACTIONS ... [--expires 720h]
                                              prints the secret once, alone on stdout's last line;
                                              the robot logs in as robot+NAME
  meridian robot list | revoke NAME
  meridian access grant (--user NAME | --team TEAM | --anonymous) --prefix PREFIX --actions pull,push,delete,admin
  meridian access revoke (--user NAME | --team TEAM | --anonymous) --prefix PREFIX
  meridian access list
  meridian audit [--since 24h|RFC3339] [--repo NAME] [--user NAME] [--denied] [--json]

Every command takes --addr (any node's gRPC address).
`

// parseMixed parses flags that may come before, between or after the
// positional arguments ("user add NAME --password-stdin"), and returns the
// positionals.
func parseMixed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			return pos, nil
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

// parseName parses args (flags anywhere) and returns the one NAME they
// must hold.
func parseName(fs *flag.FlagSet, args []string, cmd string) (string, error) {
	pos, err := parseMixed(fs, args)
	if err != nil {
		return "", err
	}
	if len(pos) != 1 {
		return "", fmt.Errorf("%s: want exactly one NAME, got %d arguments", cmd, len(pos))
	}
	return pos[0], nil
}

// nameChange runs a change of the one NAME in args and prints done.
func nameChange(a adminFlags, args []string, cmd, done string, req func(name string) *pb.ManageAccessRequest) error {
	name, err := parseName(a.fs, args, cmd)
	if err != nil {
		return err
	}
	if _, err := manage(a, req(name)); err != nil {
		return fmt.Errorf("%s %s: %w", cmd, name, err)
	}
	fmt.Printf(done, name)
	return nil
}

func manage(a adminFlags, req *pb.ManageAccessRequest) (*pb.ManageAccessResponse, error) {
	c, ctx, done, err := a.dial()
	if err != nil {
		return nil, err
	}
	defer done()
	resp, err := c.ManageAccess(ctx, req)
	return resp, readable(err)
}

// businessPrefix is how a node's business errors start ("CODE_DENIED: ").
var businessPrefix = regexp.MustCompile(`^(remote: )?CODE_[A-Z_]+: `)

// readable is a refusal as the operator should read it: the node's reason
// without gRPC's wrapping.
func readable(err error) error {
	if err == nil {
		return nil
	}
	s, ok := status.FromError(err)
	if !ok {
		return err
	}
	switch s.Code() {
	case codes.Unavailable, codes.DeadlineExceeded:
		return err // the hint about TLS or the node's address stays
	}
	return errors.New(businessPrefix.ReplaceAllString(s.Message(), ""))
}

// listAccess parses the list command's flags (no arguments) and lists.
func listAccess(a adminFlags, args []string) (*pb.ListAccessResponse, error) {
	pos, err := parseMixed(a.fs, args)
	if err != nil {
		return nil, err
	}
	if len(pos) > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", pos)
	}
	c, ctx, done, err := a.dial()
	if err != nil {
		return nil, err
	}
	defer done()
	resp, err := c.ListAccess(ctx, &pb.ListAccessRequest{})
	return resp, readable(err)
}

// readNewPassword reads one line from stdin: the new password of
// --password-stdin (admin credentials never come from stdin).
func readNewPassword(in io.Reader) (string, error) {
	line, err := bufio.NewReader(in).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return "", err
	}
	pw := strings.TrimRight(line, "\r\n")
	if pw == "" {
		return "", errors.New("--password-stdin: no password on standard input")
	}
	return pw, nil
}

func userCmd(args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, accessUsage)
		return errors.New("user: want add, list, passwd or delete")
	}
	a := newAdminFlags("user " + args[0])
	a.fs.Init("meridian user "+args[0], flag.ContinueOnError)
	switch args[0] {
	case "add":
		stdin := a.fs.Bool("password-stdin", false, "read the password from standard input (one line)")
		name, err := parseName(a.fs, args[1:], "user add")
		if err != nil {
			return err
		}
		op := &pb.AddUserOp{Name: name}
		if *stdin {
			if op.Password, err = readNewPassword(os.Stdin); err != nil {
				return err
			}
		}
		resp, err := manage(a, &pb.ManageAccessRequest{Op: &pb.ManageAccessRequest_AddUser{AddUser: op}})
		if err != nil {
			return fmt.Errorf("user add %s: %w", name, err)
		}
		fmt.Printf("added user %s\n", name)
		if resp.Secret != "" {
			fmt.Println("its generated password (shown once):")
			fmt.Println(resp.Secret)
		}
		return nil
	case "passwd":
		name, err := parseName(a.fs, args[1:], "user passwd")
		if err != nil {
			return err
		}
		pw, err := readNewPassword(os.Stdin)
		if err != nil {
			return fmt.Errorf("user passwd: the new password is read from standard input: %w", err)
		}
		if _, err := manage(a, &pb.ManageAccessRequest{Op: &pb.ManageAccessRequest_SetPassword{SetPassword: &pb.SetPasswordOp{Name: name, Password: pw}}}); err != nil {
			return fmt.Errorf("user passwd %s: %w", name, err)
		}
		fmt.Printf("changed the password of %s\n", name)
		return nil
	case "delete":
		return nameChange(a, args[1:], "user delete", "deleted user %s and its grants\n", func(name string) *pb.ManageAccessRequest {
			return &pb.ManageAccessRequest{Op: &pb.ManageAccessRequest_DeleteUser{DeleteUser: name}}
		})
	case "list":
		l, err := listAccess(a, args[1:])
		if err != nil {
			return err
		}
		teams := map[string][]string{}
		for _, t := range l.Teams {
			for _, m := range t.Members {
				teams[m] = append(teams[m], t.Name)
			}
		}
		w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(w, "USER\tTEAMS\tCREATED\tPASSWORD CHANGED")
		for _, u := range l.Users {
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", u.Name, orDash(strings.Join(teams[u.Name], ",")), stamp(u.CreatedUnixNano), stamp(u.UpdatedUnixNano))
		}
		return w.Flush()
	}
	return fmt.Errorf("user: unknown subcommand %q (want add, list, passwd or delete)", args[0])
}

func teamCmd(args []string) error {
	if len(args) == 0 || args[0] != "add" {
		fmt.Fprint(os.Stderr, accessUsage)
		return errors.New("team: want add TEAM --member NAME ...")
	}
	a := newAdminFlags("team add")
	a.fs.Init("meridian team add", flag.ContinueOnError)
	var members stringList
	a.fs.Var(&members, "member", "a user in the team; repeat for more (the team's members are exactly these)")
	name, err := parseName(a.fs, args[1:], "team add")
	if err != nil {
		return err
	}
	if _, err := manage(a, &pb.ManageAccessRequest{Op: &pb.ManageAccessRequest_PutTeam{PutTeam: &pb.Team{Name: name, Members: members}}}); err != nil {
		return fmt.Errorf("team add %s: %w", name, err)
	}
	fmt.Printf("team %s: %s\n", name, orDash(strings.Join(members, ", ")))
	return nil
}

func robotCmd(args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, accessUsage)
		return errors.New("robot: want create, list or revoke")
	}
	a := newAdminFlags("robot " + args[0])
	a.fs.Init("meridian robot "+args[0], flag.ContinueOnError)
	switch args[0] {
	case "create":
		var scopes stringList
		a.fs.Var(&scopes, "scope", "PREFIX:ACTIONS the robot may do (e.g. ci/app:pull,push); repeat for more")
		expires := a.fs.Duration("expires", 0, "lifetime (e.g. 720h); 0: never expires")
		name, err := parseName(a.fs, args[1:], "robot create")
		if err != nil {
			return err
		}
		if len(scopes) == 0 {
			return errors.New("robot create: give at least one --scope PREFIX:ACTIONS")
		}
		if *expires < 0 {
			return errors.New("robot create: --expires must not be negative")
		}
		op := &pb.CreateRobotOp{Name: name, ExpiresInSeconds: int64(expires.Seconds())}
		for _, s := range scopes {
			i := strings.LastIndex(s, ":")
			if i < 0 {
				return fmt.Errorf("--scope %q: want PREFIX:ACTIONS, e.g. ci/app:pull,push", s)
			}
			op.Scopes = append(op.Scopes, &pb.Scope{Prefix: s[:i], Actions: splitList(s[i+1:])})
		}
		resp, err := manage(a, &pb.ManageAccessRequest{Op: &pb.ManageAccessRequest_CreateRobot{CreateRobot: op}})
		if err != nil {
			return fmt.Errorf("robot create %s: %w", name, err)
		}
		fmt.Printf("created robot %s; it logs in as %s with this secret (shown once):\n", name, "robot+"+name)
		fmt.Println(resp.Secret)
		return nil
	case "revoke":
		return nameChange(a, args[1:], "robot revoke", "revoked robot %s\n", func(name string) *pb.ManageAccessRequest {
			return &pb.ManageAccessRequest{Op: &pb.ManageAccessRequest_RevokeRobot{RevokeRobot: name}}
		})
	case "list":
		l, err := listAccess(a, args[1:])
		if err != nil {
			return err
		}
		w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(w, "ROBOT\tSCOPES\tEXPIRES\tSTATE")
		for _, r := range l.Robots {
			var sc []string
			for _, s := range r.Scopes {
				sc = append(sc, prefixName(s.Prefix)+":"+strings.Join(s.Actions, ","))
			}
			state := "active"
			switch {
			case r.Revoked:
				state = "revoked"
			case r.ExpiresUnixNano != 0 && time.Now().UnixNano() >= r.ExpiresUnixNano:
				state = "expired"
			}
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", r.Name, strings.Join(sc, " "), stampOr(r.ExpiresUnixNano, "never"), state)
		}
		return w.Flush()
	}
	return fmt.Errorf("robot: unknown subcommand %q (want create, list or revoke)", args[0])
}

func accessCmd(args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, accessUsage)
		return errors.New("access: want grant, revoke or list")
	}
	a := newAdminFlags("access " + args[0])
	a.fs.Init("meridian access "+args[0], flag.ContinueOnError)
	switch args[0] {
	case "grant", "revoke":
		user := a.fs.String("user", "", "a user")
		team := a.fs.String("team", "", "a team")
		anon := a.fs.Bool("anonymous", false, "callers without credentials (public repositories)")
		prefix := a.fs.String("prefix", "", `repository prefix ("team/app" covers team/app and team/app/…) or glob ("team/*"); "" or "*": every repository`)
		actions := a.fs.String("actions", "", "comma-separated: pull, push, delete, admin")
		pos, err := parseMixed(a.fs, args[1:])
		if err != nil {
			return err
		}
		if len(pos) > 0 {
			return fmt.Errorf("access %s: unexpected arguments %q", args[0], pos)
		}
		subject, err := subjectOf(*user, *team, *anon)
		if err != nil {
			return fmt.Errorf("access %s: %w", args[0], err)
		}
		if args[0] == "revoke" {
			if _, err := manage(a, &pb.ManageAccessRequest{Op: &pb.ManageAccessRequest_Revoke{Revoke: &pb.DeleteGrant{Subject: subject, Prefix: *prefix}}}); err != nil {
				return fmt.Errorf("access revoke: %w", err)
			}
			fmt.Printf("revoked %s on %s\n", subject, prefixName(*prefix))
			return nil
		}
		if *actions == "" {
			return errors.New("access grant: give --actions, e.g. pull,push")
		}
		g := &pb.Grant{Subject: subject, Prefix: *prefix, Actions: splitList(*actions)}
		if _, err := manage(a, &pb.ManageAccessRequest{Op: &pb.ManageAccessRequest_Grant{Grant: g}}); err != nil {
			return fmt.Errorf("access grant: %w", err)
		}
		fmt.Printf("granted %s %s on %s\n", subject, strings.Join(g.Actions, ","), prefixName(*prefix))
		return nil
	case "list":
		asJSON := a.fs.Bool("json", false, "print JSON")
		l, err := listAccess(a, args[1:])
		if err != nil {
			return err
		}
		if *asJSON {
			b, _ := protojson.MarshalOptions{Multiline: true}.Marshal(l)
			fmt.Println(string(b))
			return nil
		}
		w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(w, "SUBJECT\tPREFIX\tACTIONS")
		for _, g := range l.Grants {
			fmt.Fprintf(w, "%s\t%s\t%s\n", g.Subject, prefixName(g.Prefix), strings.Join(g.Actions, ","))
		}
		return w.Flush()
	}
	return fmt.Errorf("access: unknown subcommand %q (want grant, revoke or list)", args[0])
}

func subjectOf(user, team string, anon bool) (string, error) {
	n := 0
	for _, set := range []bool{user != "", team != "", anon} {
		if set {
			n++
		}
	}
	if n != 1 {
		return "", errors.New("give exactly one of --user NAME, --team TEAM or --anonymous")
	}
	switch {
	case user != "":
		return "user:" + user, nil
	case team != "":
		return "team:" + team, nil
	}
	return "anonymous", nil
}

func auditCmd(args []string) error {
	a := newAdminFlags("audit")
	a.fs.Init("meridian audit", flag.ContinueOnError)
	since := a.fs.String("since", "", "only records newer than this: a duration back from now (24h) or an RFC 3339 time")
	repo := a.fs.String("repo", "", "only changes to this repository (a prefix when it ends in /)")
	user := a.fs.String("user", "", "only changes by this principal (user:NAME, robot:NAME, or a bare name)")
	limit := a.fs.Int("limit", 0, "at most this many records, the newest (0: all)")
	denied := a.fs.Bool("denied", false, "also list the requests the answering node refused")
	asJSON := a.fs.Bool("json", false, "print one JSON record per line")
	pos, err := parseMixed(a.fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("audit: unexpected arguments %q", pos)
	}
	req := &pb.ReadAuditRequest{Repository: *repo, Principal: *user, Limit: int32(*limit), Denied: *denied}
	if *since != "" {
		if d, err := time.ParseDuration(*since); err == nil {
			req.SinceUnixNano = time.Now().Add(-d).UnixNano()
		} else if t, err := time.Parse(time.RFC3339, *since); err == nil {
			req.SinceUnixNano = t.UnixNano()
		} else {
			return fmt.Errorf("--since %q: want a duration (24h) or an RFC 3339 time", *since)
		}
	}
	c, ctx, done, err := a.dial()
	if err != nil {
		return err
	}
	defer done()
	resp, err := c.ReadAudit(ctx, req)
	if err != nil {
		return fmt.Errorf("audit: %w", err)
	}
	if *asJSON {
		for _, r := range resp.Records {
			b, _ := protojson.Marshal(r)
			fmt.Println(string(b))
		}
		return nil
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "TIME\tINDEX\tWHO\tFROM\tVIA\tACTION\tREPOSITORY\tDETAIL")
	for _, r := range resp.Records {
		idx := "-"
		if r.Index > 0 {
			idx = fmt.Sprint(r.Index)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", stamp(r.TimeUnixNano), idx, orDash(r.GetActor().GetPrincipal()),
			orDash(r.GetActor().GetAddress()), orDash(r.GetActor().GetVia()), r.Action, orDash(r.Repository), r.Detail)
	}
	return w.Flush()
}

// stringList is a repeatable flag.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" && !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out
}

func prefixName(p string) string {
	if p == "" {
		return "* (every repository)"
	}
	return p
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func stamp(ns int64) string { return stampOr(ns, "-") }

func stampOr(ns int64, zero string) string {
	if ns == 0 {
		return zero
	}
	return time.Unix(0, ns).UTC().Format(time.RFC3339)
}
