package membership

import (
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
)

var (
	// ErrClusterMismatch means a member of another cluster (another
	// ClusterID) was refused, or refused this one.
	ErrClusterMismatch = errors.New("membership: cluster id mismatch")
	// ErrIncompatibleVersion means a member speaking another protocol
	// version (or with unreadable metadata) was refused, or refused this one.
	ErrIncompatibleVersion = errors.New("membership: incompatible protocol version")
	// ErrDuplicateID means another member that the cluster considers alive
	// already uses this member's ID; Join keeps retrying while it does.
	ErrDuplicateID = errors.New("membership: member id already in use")
	// ErrClosed is returned by calls on a Membership after Close.
	ErrClosed = errors.New("membership: closed")
)

const (
	// leaveTimeout bounds the whole graceful part of Close.
	leaveTimeout = 2 * time.Second
	// updateTimeout bounds how long UpdateMeta waits for its broadcast.
	updateTimeout = 2 * time.Second
)

// State is what this member believes about another member.
type State int

const (
	// StateAlive means the member answers probes.
	StateAlive State = iota
	// StateSuspect means probes failed and the member may still refute.
	// memberlist v0.7.0 does not expose suspicion, so it is not reported yet.
	StateSuspect
	// StateDead means the member stopped answering without leaving.
	StateDead
	// StateLeft means the member left gracefully (Close).
	StateLeft
)

func (s State) String() string {
	switch s {
	case StateAlive:
		return "alive"
	case StateSuspect:
		return "suspect"
	case StateDead:
		return "dead"
	case StateLeft:
		return "left"
	}
	return fmt.Sprintf("State(%d)", int(s))
}

// Member is a member as seen by this one.
type Member struct {
	Meta
	// GossipAddr is the member's advertised gossip host:port.
	GossipAddr string
	// State is the member's state.
	State State
	// Since is when this member observed the member enter State.
	Since time.Time
}

// EventKind says what happened to a member.
type EventKind int

const (
	// EventJoin: a member appeared, or came back after leaving or dying.
	EventJoin EventKind = iota
	// EventUpdate: an alive member changed its metadata.
	EventUpdate
	// EventLeave: a member left gracefully.
	EventLeave
	// EventFailed: a member was declared dead.
	EventFailed
)

func (k EventKind) String() string {
	switch k {
	case EventJoin:
		return "join"
	case EventUpdate:
		return "update"
	case EventLeave:
		return "leave"
	case EventFailed:
		return "failed"
	}
	return fmt.Sprintf("EventKind(%d)", int(k))
}

// Event reports a change of one member; Member is its state after the change.
type Event struct {
	Kind   EventKind
	Member Member
}

type phase int

const (
	phaseNew phase = iota
	phaseStarted
	phaseClosed
)

// Membership is this process's view of, and presence in, the cluster's gossip.
type Membership struct {
	cfg       Config // validated, defaults applied; cfg.Meta is the initial metadata
	log       *slog.Logger
	events    chan Event
	dropped   atomic.Uint64
	closing   chan struct{} // closed when Close starts; stops Join
	lifecycle sync.Mutex    // serializes Start, UpdateMeta and Close

	// mu guards the fields below. It is taken inside memberlist's callbacks,
	// which hold memberlist's own lock, so memberlist must never be called
	// with mu held.
	mu           sync.Mutex
	phase        phase
	list         *memberlist.Memberlist
	ring         *memberlist.Keyring // nil without gossip encryption
	pending      pendingOps          // keyring operations awaiting answers
	meta         wireMeta            // what NodeMeta gossips
	addr         string
	since        time.Time // when the local member entered its state
	members      map[string]*memberRecord
	notices      map[string]leaveNotice // by member ID
	attempt      *joinAttempt
	refusedAsDup bool // the last Join gave up because our ID was taken
	eventsClosed bool
}

// New validates cfg and returns a Membership that is not yet listening.
func New(cfg Config) (*Membership, error) {
	if cfg.Meta.Version == 0 {
		cfg.Meta.Version = ProtocolVersion
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg.Timings = cfg.Timings.withDefaults()
	if cfg.Forget == 0 {
		cfg.Forget = defaultForget
	}
	if cfg.EventBuffer == 0 {
		cfg.EventBuffer = defaultEventBuffer
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Membership{
		cfg:     cfg,
		log:     cfg.Logger,
		events:  make(chan Event, cfg.EventBuffer),
		closing: make(chan struct{}),
		meta:    wireMeta{Meta: cfg.Meta, instance: rand.Uint64()},
		since:   time.Now(),
		members: make(map[string]*memberRecord),
		notices: make(map[string]leaveNotice),
	}, nil
}

// Start creates the gossip listeners (UDP and TCP) and announces this member
// to itself; it contacts nobody (see Join).
func (m *Membership) Start() error {
	m.lifecycle.Lock()
	defer m.lifecycle.Unlock()
	m.mu.Lock()
	p := m.phase
	m.mu.Unlock()
	switch p {
	case phaseClosed:
		return ErrClosed
	case phaseStarted:
		return errors.New("membership: already started")
	}

	ring, err := newKeyring(m.cfg.Keys)
	if err != nil {
		return err
	}
	list, err := memberlist.Create(m.cfg.memberlistConfig(delegate{m}, ring, m.log))
	if err != nil {
		return fmt.Errorf("membership: start gossip on %s: %w", m.cfg.BindAddr, err)
	}
	addr := list.LocalNode().Address()

	m.mu.Lock()
	m.list, m.ring, m.addr, m.phase, m.since = list, ring, addr, phaseStarted, time.Now()
	m.mu.Unlock()
	m.log.Info("gossip started", "id", m.cfg.Meta.ID, "addr", addr, "cluster", m.cfg.Meta.ClusterID, "encrypted", ring != nil)
	return nil
}

// Addr returns the advertised gossip host:port, with the actual port when
// the bind port was 0; empty before Start.
func (m *Membership) Addr() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.addr
}

// Local returns this member: StateAlive until Close, StateLeft after.
func (m *Membership) Local() Member {
	m.mu.Lock()
	defer m.mu.Unlock()
	st := StateAlive
	if m.phase == phaseClosed {
		st = StateLeft
	}
	return Member{Meta: m.meta.Meta, GossipAddr: m.addr, State: st, Since: m.since}
}

// Members returns every member this one has seen, itself included once
// started, sorted by ID. Dead and left members stay listed with their State
// and Since until Config.Forget has passed.
func (m *Membership) Members() []Member {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.forgetLocked(time.Now())
	out := make([]Member, 0, len(m.members))
	for _, r := range m.members {
		out = append(out, r.Member)
	}
	slices.SortFunc(out, func(a, b Member) int { return strings.Compare(a.ID, b.ID) })
	return out
}

// Member returns the member with the given ID, if this one has seen it and
// not yet forgotten it.
func (m *Membership) Member(id string) (Member, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.forgetLocked(time.Now())
	r, ok := m.members[id]
	if !ok {
		return Member{}, false
	}
	return r.Member, true
}

// Events returns the channel of membership changes, including this member's
// own join at Start and leave at Close. It is closed by Close.
//
// Gossip never waits for the reader: when the channel is full the oldest
// event is dropped to make room for the newest, and DroppedEvents counts
// it. Events are a change feed; after drops, Members is the truth.
func (m *Membership) Events() <-chan Event { return m.events }

// DroppedEvents returns how many events were dropped because the Events
// channel was full.
func (m *Membership) DroppedEvents() uint64 { return m.dropped.Load() }

// UpdateMeta replaces this member's metadata and gossips it. ID, ClusterID
// and Version cannot change (a zero Version keeps the current one). It waits
// up to 2s for the update to be sent; an update that is still queued then
// keeps propagating and UpdateMeta returns nil.
func (m *Membership) UpdateMeta(meta Meta) error {
	m.lifecycle.Lock()
	defer m.lifecycle.Unlock()

	m.mu.Lock()
	cur, p, list := m.meta.Meta, m.phase, m.list
	m.mu.Unlock()
	if p == phaseClosed {
		return ErrClosed
	}
	if meta.Version == 0 {
		meta.Version = cur.Version
	}
	if meta.ID != cur.ID || meta.ClusterID != cur.ClusterID || meta.Version != cur.Version {
		return fmt.Errorf("membership: UpdateMeta cannot change ID, ClusterID or Version (have %q/%q/%d, got %q/%q/%d)",
			cur.ID, cur.ClusterID, cur.Version, meta.ID, meta.ClusterID, meta.Version)
	}
	if err := validateMeta(meta); err != nil {
		return err
	}

	m.mu.Lock()
	m.meta.Meta = meta
	m.mu.Unlock()
	if list == nil {
		return nil
	}
	if err := list.UpdateNode(updateTimeout); err != nil {
		m.log.Warn("metadata update not yet gossiped; it stays queued", "err", err)
	}
	return nil
}

// Close leaves the gossip gracefully (peers see StateLeft), waiting at most
// 2s for the leave to be sent, then stops listening and closes Events. It
// does nothing else: Raft membership is untouched. Close is idempotent.
func (m *Membership) Close() error { return m.stop(true) }

// Shutdown stops gossip without leaving: peers see this member fail, as
// after a crash (node.Node.Kill uses it). It is idempotent, and a no-op
// after Close.
func (m *Membership) Shutdown() error { return m.stop(false) }

// stop is Close; leave=false (Shutdown) skips the graceful part, so peers
// see a failure.
func (m *Membership) stop(leave bool) error {
	m.lifecycle.Lock()
	defer m.lifecycle.Unlock()
	m.mu.Lock()
	p, list := m.phase, m.list
	m.mu.Unlock()
	if p == phaseClosed {
		return nil
	}
	close(m.closing)

	m.mu.Lock()
	if m.refusedAsDup && leave {
		// The cluster never accepted this instance: its leave message would
		// make the cluster drop the live member that owns the ID.
		leave = false
		m.log.Warn("not leaving gracefully: the cluster knows another instance under this ID")
	}
	m.mu.Unlock()

	var err error
	if list != nil {
		if leave {
			m.leave(list)
		}
		if err = list.Shutdown(); err != nil {
			err = fmt.Errorf("membership: shutdown: %w", err)
		}
	}

	m.mu.Lock()
	m.phase, m.since, m.eventsClosed = phaseClosed, time.Now(), true
	close(m.events)
	m.mu.Unlock()
	m.log.Info("gossip stopped", "id", m.cfg.Meta.ID, "left", leave)
	return err
}
