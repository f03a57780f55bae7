package main

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

const webhookUsage = `Webhooks (admin: an admin certificate, --tls-*, or an admin user,
MERIDIAN_USERNAME and MERIDIAN_PASSWORD or --username and --password-file):

  meridian webhook add NAME --url URL [--repositories PATTERN] [--events KIND,...]
                      [--secret-file FILE] [--ca-file FILE] [--insecure-http] [--replace]
                      deliver the events of the repositories PATTERN covers (default: all, and
                      the cluster-wide ones: GC runs, policy and access changes) to URL as
                      CloudEvents 1.0 JSON, signed with HMAC-SHA256 in X-Meridian-Signature-256;
                      without --secret-file a secret is generated and printed once
  meridian webhook delete NAME
  meridian webhook list [--json]
                      webhooks with their delivery state (never their secrets)
  meridian webhook test NAME
                      send a webhook.test event from the node asked, once, and show the answer
  meridian webhook deliveries NAME [--json] [--replay [--id INDEX-SEQ]...]
                      delivery cursor, events pending and the dead letters (events given up
                      on after their retries); --replay queues them (or those named) again

Event kinds: manifest.pushed, manifest.deleted, tag.updated, tag.deleted, blob.deleted,
repository.deleted, blob.placed, blob.removed, gc.collected, retention.applied,
policy.changed, access.changed (--events takes these or their first part: tag, blob, ...).

Every command takes --addr (any node's gRPC address).
`

func webhookCmd(args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, webhookUsage)
		return errors.New("webhook: want add, delete, list, test or deliveries")
	}
	a := newAdminFlags("webhook " + args[0])
	a.fs.Usage = func() { fmt.Fprint(a.fs.Output(), webhookUsage) }
	switch args[0] {
	case "add":
		u := a.fs.String("url", "", "where events are POSTed (https; http needs --insecure-http)")
		repos := a.fs.String("repositories", "", `repository pattern: a prefix ("team/app") or glob ("team/*"); empty: every repository`)
		events := a.fs.String("events", "", "comma-separated event kinds (default: all)")
		secretFile := a.fs.String("secret-file", "", "file holding the HMAC secret (at least 16 characters; default: generated)")
		caFile := a.fs.String("ca-file", "", "PEM CA certificates to trust for the receiver, besides the system roots")
		insecure := a.fs.Bool("insecure-http", false, "allow a plain-HTTP URL: events and signatures cross the network in the clear")
		replace := a.fs.Bool("replace", false, "replace a webhook of the same name (its cursor and dead letters stay)")
		name, err := parseName(a.fs, args[1:], "webhook add")
		if err != nil {
			return err
		}
		if *u == "" {
			return errors.New("webhook add: --url is required")
		}
		h := &pb.Webhook{Name: name, Url: *u, Repositories: *repos, AllowInsecureHttp: *insecure}
		if *events != "" {
			for _, k := range strings.Split(*events, ",") {
				h.Events = append(h.Events, strings.TrimSpace(k))
			}
		}
		generated := false
		if *secretFile != "" {
			b, err := os.ReadFile(*secretFile)
			if err != nil {
				return fmt.Errorf("webhook add: %w", err)
			}
			h.Secret = strings.TrimSpace(string(b))
		} else {
			var raw [32]byte
			if _, err := rand.Read(raw[:]); err != nil {
				return err
			}
			h.Secret, generated = hex.EncodeToString(raw[:]), true
		}
		if *caFile != "" {
			b, err := os.ReadFile(*caFile)
			if err != nil {
				return fmt.Errorf("webhook add: %w", err)
			}
			h.CaPem = string(b)
		}
		if err := manageWebhook(a, &pb.ManageWebhookRequest{Change: &pb.ManageWebhookRequest_Put{Put: &pb.PutWebhook{Webhook: h, Replace: *replace}}}); err != nil {
			return fmt.Errorf("webhook add %s: %w", name, err)
		}
		fmt.Printf("webhook %s delivers to %s\n", name, *u)
		if generated {
			fmt.Printf("secret (shown once; receivers verify X-Meridian-Signature-256 with it): %s\n", h.Secret)
		}
		return nil
	case "delete":
		name, err := parseName(a.fs, args[1:], "webhook delete")
		if err != nil {
			return err
		}
		if err := manageWebhook(a, &pb.ManageWebhookRequest{Change: &pb.ManageWebhookRequest_Delete{Delete: &pb.DeleteWebhook{Name: name}}}); err != nil {
			return fmt.Errorf("webhook delete %s: %w", name, err)
		}
		fmt.Printf("deleted webhook %s\n", name)
		return nil
	case "list":
		asJSON := a.fs.Bool("json", false, "print JSON")
		if err := flagsOnly(a, args[1:], "webhook list"); err != nil {
			return err
		}
		resp, err := listWebhooks(a, &pb.ListWebhooksRequest{})
		if err != nil {
			return fmt.Errorf("webhook list: %w", err)
		}
		if *asJSON {
			printJSON(resp)
			return nil
		}
		w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(w, "NAME\tURL\tREPOSITORIES\tEVENTS\tDELIVERED\tPENDING\tDEAD\tLAST")
		for _, st := range resp.Webhooks {
			h := st.Webhook
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%d\t%d\t%d\t%s\n", h.Name, h.Url, orAll(h.Repositories), orAll(strings.Join(h.Events, ",")),
				st.GetCursor().GetDelivered(), st.Pending, st.DeadLetterCount, lastAttempt(st.GetCursor()))
		}
		return w.Flush()
	case "test":
		name, err := parseName(a.fs, args[1:], "webhook test")
		if err != nil {
			return err
		}
		c, ctx, done, err := a.dial()
		if err != nil {
			return err
		}
		defer done()
		resp, err := c.TestWebhook(ctx, &pb.TestWebhookRequest{Name: name})
		if err != nil {
			return fmt.Errorf("webhook test %s: %w", name, readable(err))
		}
		if err := resp.Result.Err(); err != nil {
			return fmt.Errorf("webhook test %s: %w", name, readable(err))
		}
		took := time.Duration(resp.DurationNanos).Round(time.Millisecond)
		if resp.Error != "" {
			return fmt.Errorf("webhook test %s: event %s failed after %v: %s", name, resp.EventId, took, resp.Error)
		}
		fmt.Printf("event %s delivered: HTTP %d in %v\n", resp.EventId, resp.StatusCode, took)
		return nil
	case "deliveries":
		asJSON := a.fs.Bool("json", false, "print JSON")
		replay := a.fs.Bool("replay", false, "queue the dead letters (all, or those --id names) for delivery again")
		var ids stringList
		a.fs.Var(&ids, "id", "a dead letter to replay, INDEX-SEQ (repeatable; with --replay)")
		name, err := parseName(a.fs, args[1:], "webhook deliveries")
		if err != nil {
			return err
		}
		if len(ids) > 0 && !*replay {
			return errors.New("webhook deliveries: --id goes with --replay")
		}
		if *replay {
			if err := manageWebhook(a, &pb.ManageWebhookRequest{Change: &pb.ManageWebhookRequest_Replay{Replay: &pb.ReplayDeadLetters{Name: name, Ids: ids}}}); err != nil {
				return fmt.Errorf("webhook deliveries %s --replay: %w", name, err)
			}
			fmt.Printf("queued the dead letters of %s for delivery again\n", name)
			return nil
		}
		resp, err := listWebhooks(a, &pb.ListWebhooksRequest{Name: name, DeadLetters: true})
		if err != nil {
			return fmt.Errorf("webhook deliveries %s: %w", name, err)
		}
		if *asJSON {
			printJSON(resp)
			return nil
		}
		st := resp.Webhooks[0]
		cur := st.GetCursor()
		fmt.Printf("webhook %s: delivered %d, through event %d-%d; %d events after it (not all for this webhook); %d dead letters\n",
			name, cur.GetDelivered(), cur.GetIndex(), cur.GetSeq(), st.Pending, st.DeadLetterCount)
		if d := cur.GetDroppedDeadLetters(); d > 0 {
			fmt.Printf("%d older dead letters were dropped (webhooks.max_dead_letters)\n", d)
		}
		fmt.Printf("last attempt: %s\n", lastAttempt(cur))
		if len(st.DeadLetters) > 0 {
			w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "ID\tKIND\tSUBJECT\tATTEMPTS\tFAILED\tREPLAY\tLAST ERROR")
			for _, d := range st.DeadLetters {
				ev := d.Event
				subject := strings.Join(ev.Repositories, ",")
				if ev.Tag != "" {
					subject += ":" + ev.Tag
				} else if ev.Digest != "" {
					subject += "@" + ev.Digest
				}
				fmt.Fprintf(w, "%d-%d\t%s\t%s\t%d\t%s\t%v\t%s\n", ev.Index, ev.Seq, ev.Kind, subject, d.Attempts,
					time.Unix(0, d.FailedUnixNano).UTC().Format(time.RFC3339), d.Replay, d.LastError)
			}
			return w.Flush()
		}
		return nil
	default:
		fmt.Fprint(os.Stderr, webhookUsage)
		return fmt.Errorf("webhook: unknown command %q (want add, delete, list, test or deliveries)", args[0])
	}
}

func manageWebhook(a adminFlags, req *pb.ManageWebhookRequest) error {
	c, ctx, done, err := a.dial()
	if err != nil {
		return err
	}
	defer done()
	resp, err := c.ManageWebhook(ctx, req)
	if err != nil {
		return readable(err)
	}
	return readable(resp.Result.Err())
}

func listWebhooks(a adminFlags, req *pb.ListWebhooksRequest) (*pb.ListWebhooksResponse, error) {
	c, ctx, done, err := a.dial()
	if err != nil {
		return nil, err
	}
	defer done()
	resp, err := c.ListWebhooks(ctx, req)
	return resp, readable(err)
}

func orAll(s string) string {
	if s == "" {
		return "(all)"
	}
	return s
}

func lastAttempt(c *pb.WebhookCursor) string {
	if c.GetLastAttemptUnixNano() == 0 {
		return "none yet"
	}
	at := time.Unix(0, c.LastAttemptUnixNano).UTC().Format(time.RFC3339)
	if c.LastError != "" {
		return fmt.Sprintf("%s failed: %s", at, c.LastError)
	}
	return fmt.Sprintf("%s HTTP %d", at, c.LastStatus)
}
