package node

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/meridian-registry/meridian/consensus"
	"github.com/meridian-registry/meridian/node/webhook"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// WebhookConfig tunes webhook delivery (docs/operations.md#webhooks).
// Events of one webhook are delivered in log order, so an event that keeps
// failing holds the ones behind it until its retries run out and it
// becomes a dead letter.
type WebhookConfig struct {
	// MaxAttempts is how many times an event is sent before it becomes a
	// dead letter.
	MaxAttempts int `yaml:"max_attempts"`
	// Backoff is the wait after the first failed attempt; it doubles with
	// each attempt up to MaxBackoff.
	Backoff    time.Duration `yaml:"backoff"`
	MaxBackoff time.Duration `yaml:"max_backoff"`
	// Timeout bounds one attempt.
	Timeout time.Duration `yaml:"timeout"`
	// MaxDeadLetters bounds the dead letters kept per webhook; the oldest
	// go first (0: no limit).
	MaxDeadLetters int `yaml:"max_dead_letters"`
}

func defaultWebhookConfig() WebhookConfig {
	return WebhookConfig{MaxAttempts: 8, Backoff: time.Second, MaxBackoff: 5 * time.Minute, Timeout: 10 * time.Second, MaxDeadLetters: 10000}
}

func (c WebhookConfig) validate() error {
	if c.MaxAttempts < 1 || c.Backoff <= 0 || c.MaxBackoff < c.Backoff || c.Timeout <= 0 || c.MaxDeadLetters < 0 {
		return errors.New("webhooks: max_attempts must be at least 1, backoff and timeout positive, max_backoff at least backoff, max_dead_letters not negative")
	}
	return nil
}

const (
	// webhookBatch bounds the events read at once; progress is committed
	// at least once per batch, which bounds what a new leader sends again.
	webhookBatch = 100
	// webhookProgressEvery bounds how long delivered events go unrecorded.
	webhookProgressEvery = 500 * time.Millisecond
	webhookSecretMin     = 16
)

var webhookNameRE = idRE

// webhookMetrics count deliveries by webhook and outcome.
type webhookMetrics struct {
	deliveries *prometheus.CounterVec
	dead       *prometheus.CounterVec
}

func newWebhookMetrics(reg prometheus.Registerer) (*webhookMetrics, error) {
	m := &webhookMetrics{
		deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "meridian", Subsystem: "webhook", Name: "attempts_total",
			Help: "Webhook delivery attempts this node made, by webhook and result (ok, failed).",
		}, []string{"webhook", "result"}),
		dead: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "meridian", Subsystem: "webhook", Name: "dead_letters_total",
			Help: "Events this node gave up on after their retries, by webhook.",
		}, []string{"webhook"}),
	}
	for _, c := range []prometheus.Collector{m.deliveries, m.dead} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// runWebhooks delivers events while this node leads: one worker per
// webhook, restarted when its configuration changes, all stopped when
// leadership goes (the next leader starts from the committed cursors).
func (n *Node) runWebhooks() {
	defer n.wg.Done()
	type worker struct {
		hook   *pb.Webhook
		cancel context.CancelFunc
		done   chan struct{}
	}
	workers := map[string]*worker{}
	stopWorker := func(name string) {
		w := workers[name]
		w.cancel()
		<-w.done
		delete(workers, name)
	}
	defer func() {
		for name := range workers {
			stopWorker(name)
		}
	}()
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-n.stop:
			return
		case <-t.C:
		}
		var hooks []*pb.Webhook
		if n.consensus.IsLeader() {
			var err error
			if hooks, err = n.consensus.Store().Webhooks(context.Background()); err != nil {
				n.logger.Warn("webhooks: read configuration", "err", err)
				continue
			}
		}
		want := map[string]*pb.Webhook{}
		for _, h := range hooks {
			want[h.Name] = h
		}
		for name, w := range workers {
			select {
			case <-w.done:
				// It stopped on an error (after a pause): start it again.
				w.cancel()
				delete(workers, name)
				continue
			default:
			}
			if h, ok := want[name]; !ok || !proto.Equal(h, w.hook) {
				stopWorker(name)
			}
		}
		for name, h := range want {
			if _, ok := workers[name]; ok {
				continue
			}
			ctx, cancel := context.WithCancel(context.Background())
			w := &worker{hook: h, cancel: cancel, done: make(chan struct{})}
			workers[name] = w
			go func() {
				defer close(w.done)
				n.deliverWebhook(ctx, h)
			}()
		}
	}
}

// webhookClient is the HTTP client of one webhook: the system roots plus
// the webhook's own CA, no redirects (a receiver that moved is a
// configuration error to see, not to follow with a signed body).
func webhookClient(h *pb.Webhook, timeout time.Duration) (*http.Client, error) {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	if h.CaPem != "" {
		pool, err := x509.SystemCertPool()
		if err != nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM([]byte(h.CaPem)) {
			return nil, fmt.Errorf("webhook %s: its CA certificates do not parse", h.Name)
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	return &http.Client{Transport: tr, Timeout: timeout,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}, nil
}

// webhookMatches reports whether h wants ev: its repositories pattern
// covers one of the event's repositories (events naming none go to
// webhooks covering every repository), and its kind filter lets it by.
func webhookMatches(h *pb.Webhook, ev *pb.Event) bool {
	if len(h.Events) > 0 && !slices.ContainsFunc(h.Events, func(k string) bool {
		return ev.Kind == k || strings.HasPrefix(ev.Kind, k+".")
	}) {
		return false
	}
	all := h.Repositories == "" || h.Repositories == "*"
	if len(ev.Repositories) == 0 {
		return all
	}
	return slices.ContainsFunc(ev.Repositories, func(r string) bool { return pb.MatchRepository(h.Repositories, r) })
}

// attempt is one delivery's outcome.
type attempt struct {
	status int
	err    error
}

// send POSTs one event once.
func (n *Node) send(ctx context.Context, client *http.Client, h *pb.Webhook, ce webhook.CloudEvent) attempt {
	body, err := webhook.Marshal(ce)
	if err != nil {
		return attempt{err: err}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, h.Url, bytes.NewReader(body))
	if err != nil {
		return attempt{err: err}
	}
	req.Header.Set("Content-Type", webhook.ContentType)
	req.Header.Set(webhook.SignatureHeader, webhook.Sign(h.Secret, body))
	req.Header.Set(webhook.WebhookHeader, h.Name)
	req.Header.Set("User-Agent", "meridian/"+Version)
	resp, err := client.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			// Not the URL: its path or query may hold a token, and the
			// error lands in the state, the CLI and the log.
			err = fmt.Errorf("%s %s: %w", ue.Op, redactURL(h.Url), ue.Err)
		}
		return attempt{err: err}
	}
	defer resp.Body.Close()
	detail, _ := io.ReadAll(io.LimitReader(resp.Body, 256))
	// Drained (boundedly), the connection serves the next delivery.
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode/100 != 2 {
		return attempt{status: resp.StatusCode, err: fmt.Errorf("receiver answered %s: %s", resp.Status, strings.TrimSpace(string(detail)))}
	}
	return attempt{status: resp.StatusCode}
}

// sendWithRetries sends an event until it is accepted, its attempts run
// out, or ctx ends (then ok is false and nothing may be recorded).
func (n *Node) sendWithRetries(ctx context.Context, client *http.Client, h *pb.Webhook, ev *pb.Event, maxAttempts int) (last attempt, tries int, ok bool) {
	id := consensus.EventID(ev.Index, ev.Seq)
	if epoch, err := n.consensus.Store().EventEpoch(); err != nil {
		return attempt{err: err}, 0, false
	} else if epoch != "" {
		id = epoch + "-" + id
	}
	ce := webhook.FromEvent(n.cfg.ClusterID, id, ev)
	wait := n.cfg.Webhooks.Backoff
	for tries = 1; ; tries++ {
		last = n.send(ctx, client, h, ce)
		if ctx.Err() != nil {
			return last, tries, false
		}
		result := "ok"
		if last.err != nil {
			result = "failed"
		}
		n.webhookMetrics.deliveries.WithLabelValues(h.Name, result).Inc()
		if last.err == nil || tries >= maxAttempts {
			return last, tries, true
		}
		n.logger.Debug("webhook delivery failed; retrying", "webhook", h.Name, "event", ce.ID, "attempt", tries, "in", wait, "err", last.err)
		select {
		case <-ctx.Done():
			return last, tries, false
		case <-time.After(wait):
		}
		wait = min(2*wait, n.cfg.Webhooks.MaxBackoff)
	}
}

// deliverWebhook delivers h's events in log order until ctx ends:
// replays of dead letters first, then the events after its cursor.
// Progress is committed through the log, so whichever node leads next
// continues from it.
func (n *Node) deliverWebhook(ctx context.Context, h *pb.Webhook) {
	client, err := webhookClient(h, n.cfg.Webhooks.Timeout)
	if err != nil {
		n.logger.Error("webhooks: cannot deliver", "webhook", h.Name, "err", err)
		return
	}
	defer client.CloseIdleConnections()
	store := n.consensus.Store()
	// down is set once an event ran out of attempts: the receiver is
	// likely gone, so each later event gets one attempt until one goes
	// through. A receiver that stays down turns the backlog into dead
	// letters in minutes instead of holding every event for its retries.
	down := false
	for ctx.Err() == nil {
		changed := n.consensus.Changed()
		cur, err := store.WebhookCursor(ctx, h.Name)
		if err != nil || cur == nil {
			return // deleted; the supervisor notices too
		}
		replays, err := store.QueuedReplays(ctx, h.Name, webhookBatch)
		if err != nil {
			n.logger.Warn("webhooks: read dead letters", "webhook", h.Name, "err", err)
			pause(ctx, time.Second)
			return
		}
		if len(replays) > 0 {
			n.replayDeadLetters(ctx, client, h, cur, replays)
			continue
		}
		evs, err := store.EventsAfter(ctx, cur.Index, cur.Seq, webhookBatch)
		if err != nil {
			n.logger.Warn("webhooks: read events", "webhook", h.Name, "err", err)
			pause(ctx, time.Second)
			return
		}
		if len(evs) == 0 {
			select {
			case <-ctx.Done():
			case <-changed:
			case <-time.After(time.Second):
			}
			continue
		}
		prog := &pb.WebhookProgress{Name: h.Name, MaxDeadLetters: int64(n.cfg.Webhooks.MaxDeadLetters)}
		flushed := time.Now()
		for _, ev := range evs {
			if webhookMatches(h, ev) {
				attempts := n.cfg.Webhooks.MaxAttempts
				if down {
					attempts = 1
				}
				last, tries, ok := n.sendWithRetries(ctx, client, h, ev, attempts)
				if !ok {
					return // leadership or the configuration changed: record nothing
				}
				down = last.err != nil
				prog.LastStatus, prog.LastAttemptUnixNano, prog.LastError = int32(last.status), time.Now().UnixNano(), errText(last.err)
				if last.err != nil {
					n.webhookMetrics.dead.WithLabelValues(h.Name).Inc()
					n.logger.Warn("webhook event dead-lettered", "webhook", h.Name, "event", consensus.EventID(ev.Index, ev.Seq), "attempts", tries, "err", last.err)
					prog.Dead = append(prog.Dead, &pb.DeadLetter{Event: ev, Attempts: int32(tries), LastError: errText(last.err), FailedUnixNano: time.Now().UnixNano()})
				} else {
					prog.Delivered++
				}
			}
			prog.Index, prog.Seq = ev.Index, ev.Seq
			if time.Since(flushed) >= webhookProgressEvery {
				if !n.commitProgress(ctx, prog) {
					return
				}
				prog, flushed = &pb.WebhookProgress{Name: h.Name, MaxDeadLetters: int64(n.cfg.Webhooks.MaxDeadLetters)}, time.Now()
			}
		}
		if prog.Index > 0 && !n.commitProgress(ctx, prog) {
			return
		}
	}
}

// replayDeadLetters tries each queued dead letter once more (with the
// usual retries) and records which went through.
func (n *Node) replayDeadLetters(ctx context.Context, client *http.Client, h *pb.Webhook, cur *pb.WebhookCursor, letters []*pb.DeadLetter) {
	prog := &pb.WebhookProgress{Name: h.Name, Index: cur.Index, Seq: cur.Seq}
	for _, d := range letters {
		last, tries, ok := n.sendWithRetries(ctx, client, h, d.Event, n.cfg.Webhooks.MaxAttempts)
		if !ok {
			return
		}
		prog.LastStatus, prog.LastAttemptUnixNano, prog.LastError = int32(last.status), time.Now().UnixNano(), errText(last.err)
		if last.err == nil {
			prog.Delivered++
			prog.Replayed = append(prog.Replayed, consensus.EventID(d.Event.GetIndex(), d.Event.GetSeq()))
			continue
		}
		prog.FailedAgain = append(prog.FailedAgain, &pb.DeadLetter{Event: d.Event, Attempts: d.Attempts + int32(tries),
			LastError: errText(last.err), FailedUnixNano: time.Now().UnixNano()})
	}
	n.commitProgress(ctx, prog)
}

// commitProgress records delivery through the log. It reports false when
// the worker should stop; a failure leaves the cursor where it was, and
// the events are sent again.
func (n *Node) commitProgress(ctx context.Context, prog *pb.WebhookProgress) bool {
	err := n.commit(ctx, &pb.Command{Intent: &pb.Command_WebhookProgress{WebhookProgress: prog}})
	if err != nil {
		if ctx.Err() == nil {
			n.logger.Warn("webhooks: record progress", "webhook", prog.Name, "err", err)
			pause(ctx, time.Second)
		}
		return false
	}
	return true
}

// redactURL keeps a webhook URL's scheme and host: enough to tell
// receivers apart, without a token its path or query may carry.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return "(webhook URL)"
	}
	if u.Path == "" && u.RawQuery == "" {
		return u.Scheme + "://" + u.Host
	}
	return u.Scheme + "://" + u.Host + "/…"
}

// pause waits d or until ctx ends.
func pause(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// checkWebhook validates a webhook's configuration.
func checkWebhook(h *pb.Webhook) error {
	if h == nil {
		return invalid("no webhook")
	}
	if !webhookNameRE.MatchString(h.Name) {
		return invalid("webhook name %q: use 1-63 letters, digits, '.', '_' or '-'", h.Name)
	}
	u, err := url.Parse(h.Url)
	if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
		return invalid("webhook URL %q: want an absolute http(s) URL", h.Url)
	}
	if u.Scheme == "http" && !h.AllowInsecureHttp {
		return invalid("webhook URL %q is plain HTTP: events and their signatures would cross the network in the clear; use https, or --insecure-http to allow it", h.Url)
	}
	if u.User != nil {
		return invalid("webhook URL: credentials in the URL would be stored and shown; authenticate the receiver by the signature header")
	}
	if len(h.Secret) < webhookSecretMin {
		return invalid("webhook secret: at least %d characters", webhookSecretMin)
	}
	if h.CaPem != "" && !x509.NewCertPool().AppendCertsFromPEM([]byte(h.CaPem)) {
		return invalid("webhook CA: no PEM certificate in it")
	}
	if err := checkRepoPattern(h.Repositories); err != nil {
		return err
	}
	for _, k := range h.Events {
		if !slices.ContainsFunc(consensus.EventKinds, func(kind string) bool { return kind == k || strings.HasPrefix(kind, k+".") }) {
			return invalid("webhook event kind %q: want one of %s, or their first part (tag, manifest, blob, ...)", k, strings.Join(consensus.EventKinds, ", "))
		}
	}
	return nil
}

// manageWebhook commits an admin's webhook change.
func (n *Node) manageWebhook(ctx context.Context, req *pb.ManageWebhookRequest) error {
	cmd := &pb.Command{}
	switch c := req.GetChange().(type) {
	case *pb.ManageWebhookRequest_Put:
		cmd.Intent = &pb.Command_PutWebhook{PutWebhook: c.Put}
	case *pb.ManageWebhookRequest_Delete:
		cmd.Intent = &pb.Command_DeleteWebhook{DeleteWebhook: c.Delete}
	case *pb.ManageWebhookRequest_Replay:
		cmd.Intent = &pb.Command_ReplayDeadLetters{ReplayDeadLetters: c.Replay}
	default:
		return invalid("no webhook change in the request")
	}
	return n.commit(ctx, cmd)
}

func (s adminServer) ManageWebhook(ctx context.Context, req *pb.ManageWebhookRequest) (*pb.ManageWebhookResponse, error) {
	r, gerr := answer(adminError(s.n.manageWebhook(ctx, req)))
	if gerr != nil {
		return nil, gerr
	}
	return &pb.ManageWebhookResponse{Result: r}, nil
}

// ListWebhooks answers from this node's state: configuration without
// secrets, cursors, pending counts and (asked for) dead letters.
func (s adminServer) ListWebhooks(ctx context.Context, req *pb.ListWebhooksRequest) (*pb.ListWebhooksResponse, error) {
	store := s.n.consensus.Store()
	hooks, err := store.Webhooks(ctx)
	if err != nil {
		return nil, pb.ToStatus(err)
	}
	resp := &pb.ListWebhooksResponse{}
	resp.AppliedIndex, _, _ = store.AppliedIndex()
	for _, h := range hooks {
		if req.Name != "" && h.Name != req.Name {
			continue
		}
		h.Secret = ""
		st := &pb.WebhookStatus{Webhook: h}
		if st.Cursor, err = store.WebhookCursor(ctx, h.Name); err != nil {
			return nil, pb.ToStatus(err)
		}
		if st.Cursor != nil {
			if st.Pending, err = store.CountEventsAfter(ctx, st.Cursor.Index, st.Cursor.Seq, 1_000_000); err != nil {
				return nil, pb.ToStatus(err)
			}
		}
		if st.DeadLetterCount, err = store.DeadLetterCount(ctx, h.Name); err != nil {
			return nil, pb.ToStatus(err)
		}
		if req.DeadLetters {
			if st.DeadLetters, err = store.DeadLetters(ctx, h.Name, -1); err != nil {
				return nil, pb.ToStatus(err)
			}
		}
		resp.Webhooks = append(resp.Webhooks, st)
	}
	if req.Name != "" && len(resp.Webhooks) == 0 {
		return &pb.ListWebhooksResponse{}, pb.ToStatus(pb.Errorf(pb.Code_CODE_NAME_UNKNOWN, "no webhook named %q", req.Name))
	}
	return resp, nil
}

// TestWebhook sends a webhook.test event from this node, once, and
// reports the receiver's answer. It goes around the log: nothing is
// recorded.
func (s adminServer) TestWebhook(ctx context.Context, req *pb.TestWebhookRequest) (*pb.TestWebhookResponse, error) {
	hooks, err := s.n.consensus.Store().Webhooks(ctx)
	if err != nil {
		return nil, pb.ToStatus(err)
	}
	i := slices.IndexFunc(hooks, func(h *pb.Webhook) bool { return h.Name == req.Name })
	if i < 0 {
		return &pb.TestWebhookResponse{Result: &pb.Result{Code: pb.Code_CODE_NAME_UNKNOWN, Detail: fmt.Sprintf("no webhook named %q", req.Name)}}, nil
	}
	h := hooks[i]
	client, err := webhookClient(h, s.n.cfg.Webhooks.Timeout)
	if err != nil {
		return &pb.TestWebhookResponse{Result: &pb.Result{Code: pb.Code_CODE_INVALID_ARGUMENT, Detail: err.Error()}}, nil
	}
	var nonce [8]byte
	_, _ = rand.Read(nonce[:])
	id := "test-" + hex.EncodeToString(nonce[:])
	actor := pb.ActorFrom(ctx)
	ce := webhook.FromEvent(s.n.cfg.ClusterID, id, &pb.Event{Kind: "webhook.test", TimeUnixNano: time.Now().UnixNano(),
		Principal: actor.GetPrincipal(), Detail: "a test delivery from " + s.n.cfg.NodeID})
	defer client.CloseIdleConnections()
	start := time.Now()
	a := s.n.send(ctx, client, h, ce)
	return &pb.TestWebhookResponse{Result: &pb.Result{}, EventId: id, StatusCode: int32(a.status), Error: errText(a.err),
		DurationNanos: int64(time.Since(start))}, nil
}
