package membership

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

var verboseLogs = flag.Bool("membership.log", false, "print membership and memberlist logs")

// fastTimings detect a failure in about a second on loopback.
func fastTimings() Timings {
	return Timings{
		ProbeInterval:    200 * time.Millisecond,
		ProbeTimeout:     100 * time.Millisecond,
		SuspicionMult:    3,
		GossipInterval:   50 * time.Millisecond,
		PushPullInterval: time.Second,
		TCPTimeout:       time.Second,
	}
}

// recorder is a slog handler that keeps records for assertions and prints
// them with -membership.log.
type recorder struct {
	mu      *sync.Mutex
	records *[]slog.Record
	out     slog.Handler
}

func newRecorder(t *testing.T) *recorder {
	r := &recorder{mu: new(sync.Mutex), records: new([]slog.Record)}
	if *verboseLogs {
		r.out = slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}).
			WithAttrs([]slog.Attr{slog.String("test", t.Name())})
	}
	return r
}

func (r *recorder) Enabled(context.Context, slog.Level) bool { return true }

func (r *recorder) Handle(ctx context.Context, rec slog.Record) error {
	r.mu.Lock()
	*r.records = append(*r.records, rec.Clone())
	r.mu.Unlock()
	if r.out != nil {
		return r.out.Handle(ctx, rec)
	}
	return nil
}

func (r *recorder) WithAttrs(as []slog.Attr) slog.Handler {
	c := *r
	if r.out != nil {
		c.out = r.out.WithAttrs(as)
	}
	return &c
}

func (r *recorder) WithGroup(name string) slog.Handler {
	c := *r
	if r.out != nil {
		c.out = r.out.WithGroup(name)
	}
	return &c
}

// count returns how many records at level or above contain msg.
func (r *recorder) count(level slog.Level, msg string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, rec := range *r.records {
		if rec.Level >= level && strings.Contains(rec.Message, msg) {
			n++
		}
	}
	return n
}

type testMember struct {
	*Membership
	logs *recorder
}

// startMember starts a member on 127.0.0.1:0 with fast timings; it is
// closed when the test ends.
func startMember(t *testing.T, id string, opts ...func(*Config)) testMember {
	t.Helper()
	rec := newRecorder(t)
	cfg := Config{
		Meta: Meta{
			ID: id, ClusterID: "test", Region: "eu-west", Zone: "eu-west-1a", Role: RoleServer,
			RaftAddr: "127.0.0.1:5002", GRPCAddr: "127.0.0.1:5001", HTTPAddr: "127.0.0.1:5000",
		},
		BindAddr: "127.0.0.1:0",
		Timings:  fastTimings(),
		Logger:   slog.New(rec).With("member", id),
	}
	for _, o := range opts {
		o(&cfg)
	}
	m, err := New(cfg)
	if err != nil {
		t.Fatalf("New(%s): %v", id, err)
	}
	if err := m.Start(); err != nil {
		t.Fatalf("Start(%s): %v", id, err)
	}
	t.Cleanup(func() { _ = m.Close() })
	return testMember{m, rec}
}

func joinTo(t *testing.T, m testMember, seed testMember) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := m.Join(ctx, []string{seed.Addr()}); err != nil {
		t.Fatalf("%s joins %s: %v", m.Local().ID, seed.Local().ID, err)
	}
}

// waitFor polls cond until it returns nil or the deadline passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not reached after %v: %v", what, timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stillTrue fails the test if cond returns an error at any poll during d.
func stillTrue(t *testing.T, d time.Duration, what string, cond func() error) {
	t.Helper()
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if err := cond(); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
}

// sees checks that m has a member id in state st at gossip address addr
// (any address when addr is empty).
func sees(m testMember, id string, st State, addr string) error {
	got, ok := m.Member(id)
	switch {
	case !ok:
		return fmt.Errorf("%s does not know %s", m.Local().ID, id)
	case got.State != st:
		return fmt.Errorf("%s sees %s %v, want %v", m.Local().ID, id, got.State, st)
	case addr != "" && got.GossipAddr != addr:
		return fmt.Errorf("%s sees %s at %s, want %s", m.Local().ID, id, got.GossipAddr, addr)
	}
	return nil
}

// waitEvent reads m's events until one matches.
func waitEvent(t *testing.T, m testMember, timeout time.Duration, kind EventKind, id string) []Event {
	t.Helper()
	var seen []Event
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		select {
		case ev, ok := <-m.Events():
			if !ok {
				t.Fatalf("%s: events closed before %v of %s", m.Local().ID, kind, id)
			}
			seen = append(seen, ev)
			if ev.Kind == kind && ev.Member.ID == id {
				return seen
			}
		case <-timer.C:
			t.Fatalf("%s: no %v event for %s within %v; saw %v", m.Local().ID, kind, id, timeout, seen)
		}
	}
}

func startCluster(t *testing.T, ids ...string) []testMember {
	t.Helper()
	ms := make([]testMember, len(ids))
	for i, id := range ids {
		ms[i] = startMember(t, id)
		if i > 0 {
			joinTo(t, ms[i], ms[0])
		}
	}
	for _, m := range ms {
		for _, o := range ms {
			waitFor(t, 5*time.Second, "convergence", func() error { return sees(m, o.Local().ID, StateAlive, o.Addr()) })
		}
	}
	return ms
}

func TestThreeMembersJoinThroughOneSeed(t *testing.T) {
	ms := startCluster(t, "n1", "n2", "n3")
	for _, m := range ms {
		got := m.Members()
		if len(got) != 3 {
			t.Fatalf("%s sees %d members, want 3: %+v", m.Local().ID, len(got), got)
		}
		for i, g := range got {
			want := ms[i].Local()
			if g.Meta != want.Meta || g.GossipAddr != want.GossipAddr || g.State != StateAlive || g.Since.IsZero() {
				t.Errorf("%s sees %+v, want %+v alive", m.Local().ID, g, want)
			}
		}
	}
	if v := ms[0].Local().Version; v != ProtocolVersion {
		t.Errorf("default version %d, want %d", v, ProtocolVersion)
	}
	if ms[0].Addr() == "" || ms[0].Addr() == ms[1].Addr() || strings.HasSuffix(ms[0].Addr(), ":0") {
		t.Errorf("addresses %q %q: want distinct actual ports", ms[0].Addr(), ms[1].Addr())
	}
}

func TestUpdateMetaPropagates(t *testing.T) {
	ms := startCluster(t, "n1", "n2", "n3")
	meta := ms[1].Local().Meta
	meta.Zone, meta.HTTPAddr = "eu-west-1b", "127.0.0.1:6000"
	if err := ms[1].UpdateMeta(meta); err != nil {
		t.Fatal(err)
	}
	for _, m := range ms {
		waitFor(t, 5*time.Second, "meta update", func() error {
			if got, _ := m.Member("n2"); got.Meta != meta {
				return fmt.Errorf("%s sees %+v", m.Local().ID, got.Meta)
			}
			return nil
		})
	}
	evs := waitEvent(t, ms[0], 5*time.Second, EventUpdate, "n2")
	if got := evs[len(evs)-1].Member; got.Zone != "eu-west-1b" || got.State != StateAlive {
		t.Errorf("update event member %+v", got)
	}

	bad := meta
	bad.ClusterID = "other"
	if err := ms[1].UpdateMeta(bad); err == nil {
		t.Error("UpdateMeta changing the cluster id succeeded")
	}
}

func TestGracefulLeaveAndFailure(t *testing.T) {
	tests := []struct {
		name      string
		stop      func(*Membership) error
		wantState State
		wantEvent EventKind
	}{
		{"close leaves", (*Membership).Close, StateLeft, EventLeave},
		{"crash fails", func(m *Membership) error { return m.stop(false) }, StateDead, EventFailed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ms := startCluster(t, "n1", "n2", "n3")
			gone := ms[2]
			addr := gone.Addr()
			stopped := time.Now()
			if err := tc.stop(gone.Membership); err != nil {
				t.Fatal(err)
			}
			evs := waitEvent(t, ms[0], 10*time.Second, tc.wantEvent, "n3")
			for _, ev := range evs {
				if ev.Member.ID == "n3" && (ev.Kind == EventLeave || ev.Kind == EventFailed) && ev.Kind != tc.wantEvent {
					t.Errorf("unexpected %v event before %v", ev.Kind, tc.wantEvent)
				}
			}
			for _, m := range ms[:2] {
				waitFor(t, 10*time.Second, "departure seen", func() error { return sees(m, "n3", tc.wantState, addr) })
				got, _ := m.Member("n3")
				if got.Since.Before(stopped) {
					t.Errorf("%s: Since %v is before the stop at %v", m.Local().ID, got.Since, stopped)
				}
				if got.Meta != gone.Local().Meta {
					t.Errorf("%s keeps meta %+v, want %+v", m.Local().ID, got.Meta, gone.Local().Meta)
				}
			}
			t.Logf("%v seen after %v", tc.wantState, time.Since(stopped).Round(time.Millisecond))
		})
	}
}

func TestJoinRefusesOtherClusterOrVersion(t *testing.T) {
	tests := []struct {
		name    string
		change  func(*Config)
		wantErr error
		wantMsg string
	}{
		{"cluster id", func(c *Config) { c.Meta.ClusterID = "other" }, ErrClusterMismatch,
			`cluster id "other" of this node does not match cluster id "test" of node "n1" at `},
		{"version", func(c *Config) { c.Meta.Version = ProtocolVersion + 1 }, ErrIncompatibleVersion,
			fmt.Sprintf(`protocol version %d of this node does not match protocol version %d of node "n1" at `, ProtocolVersion+1, ProtocolVersion)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ms := startCluster(t, "n1", "n2")
			x := startMember(t, "x", tc.change)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			start := time.Now()
			err := x.Join(ctx, []string{ms[0].Addr()})
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("Join: %v, want %v", err, tc.wantErr)
			}
			if !strings.Contains(err.Error(), tc.wantMsg+ms[0].Addr()) {
				t.Errorf("error %q does not say %q", err, tc.wantMsg+ms[0].Addr())
			}
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("refusal took %v: it must not be retried", d)
			}
			if n := x.logs.count(slog.LevelWarn, "join attempt failed"); n != 0 {
				t.Errorf("refused join was retried %d times", n)
			}
			stillTrue(t, time.Second, "refused member stays out", func() error {
				for _, m := range ms {
					if _, ok := m.Member("x"); ok {
						return fmt.Errorf("%s lists the refused member", m.Local().ID)
					}
				}
				if n := len(x.Members()); n != 1 {
					return fmt.Errorf("refused member sees %d members", n)
				}
				return nil
			})
			// The seed refused the merge on its side too.
			if n := ms[0].logs.count(slog.LevelWarn, "refusing to merge"); n == 0 {
				t.Error("seed did not refuse the joining member")
			}
		})
	}
}

func TestJoinRetriesUntilContextEnds(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	nobody := l.Addr().String()
	l.Close()

	m := startMember(t, "lonely")
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	start := time.Now()
	err = m.Join(ctx, []string{nobody})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Join: %v, want context.DeadlineExceeded", err)
	}
	if d := time.Since(start); d < 1400*time.Millisecond || d > 3*time.Second {
		t.Errorf("Join returned after %v, want about 1.5s", d)
	}
	if !strings.Contains(err.Error(), nobody) {
		t.Errorf("error %q does not name the seed", err)
	}
	if n := m.logs.count(slog.LevelWarn, "join attempt failed"); n < 3 {
		t.Errorf("%d failed attempts logged, want several", n)
	}
	if errors.Is(err, ErrClusterMismatch) || errors.Is(err, ErrDuplicateID) {
		t.Errorf("unreachable seed reported as %v", err)
	}
}

func TestRestartWithSameIDOnNewPort(t *testing.T) {
	tests := []struct {
		name string
		stop func(*Membership) error
	}{
		{"after close", (*Membership).Close},
		{"after crash", func(m *Membership) error { return m.stop(false) }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ms := startCluster(t, "n1", "n2", "n3")
			old := ms[2].Addr()
			if err := tc.stop(ms[2].Membership); err != nil {
				t.Fatal(err)
			}
			again := startMember(t, "n3")
			if again.Addr() == old {
				t.Fatalf("restarted member got the old address %s", old)
			}
			joinTo(t, again, ms[0]) // retries while the old instance is still thought alive
			for _, m := range []testMember{ms[0], ms[1], again} {
				for _, o := range []testMember{ms[0], ms[1], again} {
					waitFor(t, 10*time.Second, "restart seen", func() error { return sees(m, o.Local().ID, StateAlive, o.Addr()) })
				}
			}
			waitEvent(t, ms[1], 5*time.Second, EventJoin, "n3")
		})
	}
}

func TestDuplicateIDIsRefusedWhileAlive(t *testing.T) {
	ms := startCluster(t, "n1", "n2")
	dup := startMember(t, "n2")
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	err := dup.Join(ctx, []string{ms[0].Addr()})
	if !errors.Is(err, ErrDuplicateID) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Join: %v, want ErrDuplicateID and context.DeadlineExceeded", err)
	}
	if n := dup.logs.count(slog.LevelError, "another process uses this member's ID"); n == 0 {
		t.Error("the duplicate did not log the conflict")
	}
	if n := ms[0].logs.count(slog.LevelError, "Conflicting address"); n == 0 {
		t.Error("the seed did not log the conflict")
	}
	stillTrue(t, 500*time.Millisecond, "original kept", func() error { return sees(ms[0], "n2", StateAlive, ms[1].Addr()) })

	// The rejected duplicate goes away without taking the original with it.
	if err := dup.Close(); err != nil {
		t.Fatal(err)
	}
	stillTrue(t, time.Second, "original kept after the duplicate closed", func() error { return sees(ms[0], "n2", StateAlive, ms[1].Addr()) })
}

func TestNewValidates(t *testing.T) {
	valid := func() Config {
		return Config{
			Meta:     Meta{ID: "n1", ClusterID: "c", Role: RoleGateway},
			BindAddr: "127.0.0.1:0",
		}
	}
	tests := []struct {
		name    string
		change  func(*Config)
		wantMsg string // empty: valid
	}{
		{"valid", func(*Config) {}, ""},
		{"all interfaces with advertise", func(c *Config) { c.BindAddr, c.AdvertiseAddr = "0.0.0.0:7000", "10.0.0.1:0" }, ""},
		{"metadata too large", func(c *Config) { c.Meta.Region = strings.Repeat("r", 500) }, "over memberlist's limit of 512"},
		{"id too long", func(c *Config) { c.Meta.ID = strings.Repeat("n", 200) }, "ID is 200 bytes"},
		{"no id", func(c *Config) { c.Meta.ID = "" }, "ID is required"},
		{"id with slash", func(c *Config) { c.Meta.ID = "a/b" }, "'/'"},
		{"no cluster", func(c *Config) { c.Meta.ClusterID = "" }, "ClusterID is required"},
		{"bad role", func(c *Config) { c.Meta.Role = "leader" }, `role "leader"`},
		{"unspecified bind without advertise", func(c *Config) { c.BindAddr = "0.0.0.0:7000" }, "set the advertise address"},
		{"empty bind host without advertise", func(c *Config) { c.BindAddr = ":7000" }, "set the advertise address"},
		{"bind host name", func(c *Config) { c.BindAddr = "localhost:7000" }, "must be an IP address"},
		{"bind without port", func(c *Config) { c.BindAddr = "127.0.0.1" }, "missing port"},
		{"unspecified advertise", func(c *Config) { c.AdvertiseAddr = "0.0.0.0:7000" }, "must name an IP"},
		{"fixed advertise port, dynamic bind", func(c *Config) { c.AdvertiseAddr = "10.0.0.1:7000" }, "bind port is 0"},
		{"negative timing", func(c *Config) { c.Timings.ProbeTimeout = -1 }, "negative"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := valid()
			tc.change(&cfg)
			_, err := New(cfg)
			switch {
			case tc.wantMsg == "" && err != nil:
				t.Fatalf("New: %v", err)
			case tc.wantMsg != "" && (err == nil || !strings.Contains(err.Error(), tc.wantMsg)):
				t.Fatalf("New: %v, want an error containing %q", err, tc.wantMsg)
			}
		})
	}
}

func TestCloseIsIdempotent(t *testing.T) {
	m := startMember(t, "n1")
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if got := m.Local().State; got != StateLeft {
		t.Errorf("Local().State after Close = %v", got)
	}
	if err := m.Start(); !errors.Is(err, ErrClosed) {
		t.Errorf("Start after Close: %v", err)
	}
	if err := m.Join(context.Background(), []string{"127.0.0.1:1"}); !errors.Is(err, ErrClosed) {
		t.Errorf("Join after Close: %v", err)
	}
	if err := m.UpdateMeta(m.Local().Meta); !errors.Is(err, ErrClosed) {
		t.Errorf("UpdateMeta after Close: %v", err)
	}
	// The channel is closed after the member's own join and leave.
	var kinds []EventKind
	for ev := range m.Events() {
		kinds = append(kinds, ev.Kind)
	}
	if fmt.Sprint(kinds) != fmt.Sprint([]EventKind{EventJoin, EventLeave}) {
		t.Errorf("own events %v, want [join leave]", kinds)
	}

	never, err := New(Config{Meta: Meta{ID: "n2", ClusterID: "c", Role: RoleServer}, BindAddr: "127.0.0.1:0", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if err := never.Close(); err != nil {
		t.Errorf("Close before Start: %v", err)
	}
}

func TestJoinBeforeStartAndWithoutOtherSeeds(t *testing.T) {
	m, err := New(Config{Meta: Meta{ID: "n1", ClusterID: "c", Role: RoleServer}, BindAddr: "127.0.0.1:0", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Join(context.Background(), []string{"127.0.0.1:1"}); err == nil {
		t.Error("Join before Start succeeded")
	}
	s := startMember(t, "n2")
	if err := s.Join(context.Background(), []string{s.Addr(), " "}); err == nil || !strings.Contains(err.Error(), "no seed") {
		t.Errorf("Join with only its own address: %v", err)
	}
}

func TestForgetsDepartedMembers(t *testing.T) {
	a := startMember(t, "n1", func(c *Config) { c.Forget = 300 * time.Millisecond })
	b := startMember(t, "n2")
	joinTo(t, b, a)
	waitFor(t, 5*time.Second, "join seen", func() error { return sees(a, "n2", StateAlive, b.Addr()) })
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "leave seen", func() error { return sees(a, "n2", StateLeft, b.Addr()) })
	waitFor(t, 5*time.Second, "forgotten", func() error {
		if _, ok := a.Member("n2"); ok {
			return errors.New("still listed")
		}
		return nil
	})
	if got := a.Members(); len(got) != 1 || got[0].ID != "n1" {
		t.Errorf("Members after forgetting: %+v", got)
	}
}

// Nobody reads Events on any member while members join, update and leave:
// gossip must not stall, and Members must still converge.
func TestUnreadEventsNeverBlockGossip(t *testing.T) {
	small := func(c *Config) { c.EventBuffer = 2 }
	core := []testMember{startMember(t, "c1", small), startMember(t, "c2", small), startMember(t, "c3", small)}
	joinTo(t, core[1], core[0])
	joinTo(t, core[2], core[0])

	const rounds, perRound = 3, 3
	for r := range rounds {
		var temps []testMember
		for i := range perRound {
			tm := startMember(t, fmt.Sprintf("t%d-%d", r, i), small)
			joinTo(t, tm, core[(r+i)%len(core)])
			temps = append(temps, tm)
		}
		meta := core[r%len(core)].Local().Meta
		meta.Zone = fmt.Sprintf("zone-%d", r)
		if err := core[r%len(core)].UpdateMeta(meta); err != nil {
			t.Fatal(err)
		}
		for _, tm := range temps {
			if err := tm.Close(); err != nil {
				t.Fatal(err)
			}
		}
	}
	last := startMember(t, "last", small)
	joinTo(t, last, core[2])

	for _, m := range core {
		waitFor(t, 10*time.Second, "convergence without readers", func() error {
			for _, o := range slices.Concat(core, []testMember{last}) {
				if err := sees(m, o.Local().ID, StateAlive, o.Addr()); err != nil {
					return err
				}
			}
			for r := range rounds {
				for i := range perRound {
					if err := sees(m, fmt.Sprintf("t%d-%d", r, i), StateLeft, ""); err != nil {
						return err
					}
				}
			}
			if got, _ := m.Member(core[rounds-1].Local().ID); got.Zone != fmt.Sprintf("zone-%d", rounds-1) {
				return fmt.Errorf("%s sees zone %q", m.Local().ID, got.Zone)
			}
			return nil
		})
		if m.DroppedEvents() == 0 {
			t.Errorf("%s dropped no events with a buffer of 2", m.Local().ID)
		}
		if n := len(m.Events()); n != 2 {
			t.Errorf("%s holds %d buffered events, want a full buffer of 2", m.Local().ID, n)
		}
	}
	// The oldest events were dropped, not the newest: c1's own join at
	// Start is long gone from its buffer.
	for range 2 {
		if ev := <-core[0].Events(); ev.Member.ID == "c1" && ev.Kind == EventJoin {
			t.Errorf("buffer kept the oldest event %+v", ev)
		}
	}
}

func TestMetaEncoding(t *testing.T) {
	m := Meta{ID: "n1", ClusterID: "c", Region: "eu", Zone: "eu-1", Role: RoleGateway,
		RaftAddr: "10.0.0.1:5002", GRPCAddr: "[::1]:5001", HTTPAddr: "10.0.0.1:5000", Version: 7, Topology: "0123456789ab", LogVersion: 2}
	b := encodeMeta(wireMeta{Meta: m, instance: 42})
	// Metadata of a binary that predates Topology ends before it, and one
	// that predates LogVersion applies log format 1.
	old := b[:len(b)-2-len(m.Topology)]
	if got, err := decodeMeta("n1", old); err != nil || got.Topology != "" || got.HTTPAddr != m.HTTPAddr || got.LogVersion != 1 {
		t.Errorf("without topology: %+v %v", got, err)
	}
	noLog := b[:len(b)-1]
	if got, err := decodeMeta("n1", noLog); err != nil || got.Topology != m.Topology || got.LogVersion != 1 {
		t.Errorf("without log version: %+v %v, want topology %q and log version 1", got, err, m.Topology)
	}
	got, err := decodeMeta("n1", b)
	if err != nil || got.Meta != m || got.instance != 42 {
		t.Fatalf("round trip: %+v %v, want %+v instance 42", got, err, m)
	}
	// Later versions may append fields.
	if got, err := decodeMeta("n1", append(b, 0xff, 0x01)); err != nil || got.Meta != m {
		t.Errorf("with trailing bytes: %+v %v", got, err)
	}
	for i := range len(b) {
		if i == len(old) || i == len(noLog) {
			continue
		}
		if _, err := decodeMeta("n1", b[:i]); err == nil {
			t.Errorf("truncated to %d bytes: no error", i)
		}
	}
	if _, err := decodeMeta("n1", []byte{2, 0}); err == nil {
		t.Error("unknown encoding version: no error")
	}
}

// A peer that missed a leave notice and declared the member dead corrects
// itself when the notice arrives in a state sync.
func TestLeaveNoticeInStateSyncTurnsDeadIntoLeft(t *testing.T) {
	newIdle := func(id string) *Membership {
		m, err := New(Config{Meta: Meta{ID: id, ClusterID: "c", Role: RoleServer}, BindAddr: "127.0.0.1:0",
			Logger: slog.New(newRecorder(t))})
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	a, b := newIdle("a"), newIdle("b")
	a.mu.Lock()
	a.notices["gone"] = leaveNotice{instance: 7, at: time.Now()}
	a.notices["other-run"] = leaveNotice{instance: 8, at: time.Now()}
	a.mu.Unlock()
	b.mu.Lock()
	b.members["gone"] = &memberRecord{Member: Member{Meta: Meta{ID: "gone"}, State: StateDead, Since: time.Now()}, instance: 7}
	b.members["other-run"] = &memberRecord{Member: Member{Meta: Meta{ID: "other-run"}, State: StateDead, Since: time.Now()}, instance: 9}
	b.mu.Unlock()

	b.mergeState(a.localState())

	if got, _ := b.Member("gone"); got.State != StateLeft {
		t.Errorf("gone is %v, want left", got.State)
	}
	if got, ok := b.Member("other-run"); !ok || got.State != StateDead {
		t.Errorf("a notice for another run of other-run made it %v", got.State)
	}
	select {
	case ev := <-b.Events():
		if ev.Kind != EventLeave || ev.Member.ID != "gone" {
			t.Errorf("event %+v, want leave of gone", ev)
		}
	default:
		t.Error("no leave event")
	}
	b.mergeState([]byte{stateV1, 200, 1}) // malformed: ignored
}

func TestMemberlistLogLevels(t *testing.T) {
	rec := newRecorder(t)
	l := memberlistLogger(slog.New(rec))
	l.Printf("[DEBUG] memberlist: Stream connection from=x")
	l.Printf("[ERR] memberlist: Conflicting address for n2")
	l.Printf("[ERR] memberlist: Failed to send gossip: use of closed network connection")
	if rec.count(slog.LevelError, "Conflicting address for n2") != 1 {
		t.Error("conflict not logged at error level")
	}
	if rec.count(slog.LevelDebug, "Stream connection") != 1 || rec.count(slog.LevelInfo, "Stream connection") != 0 {
		t.Error("debug line not logged at debug level")
	}
	if rec.count(slog.LevelInfo, "use of closed network connection") != 0 {
		t.Error("shutdown noise not demoted to debug")
	}
	if rec.count(slog.LevelDebug, "memberlist:") != 0 {
		t.Error("prefix not stripped")
	}
}
