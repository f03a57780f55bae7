package membership

import (
	"fmt"
	"slices"
	"time"

	"github.com/hashicorp/memberlist"
)

// memberRecord is a member as tracked from memberlist's callbacks.
type memberRecord struct {
	Member
	instance uint64 // from its metadata; see leave.go
}

// delegate receives memberlist's callbacks. The EventDelegate methods,
// NotifyAlive and NotifyConflict run with memberlist's node lock held: they
// must be quick, must not block, and must not call back into memberlist.
type delegate struct{ m *Membership }

var (
	_ memberlist.Delegate         = delegate{}
	_ memberlist.EventDelegate    = delegate{}
	_ memberlist.MergeDelegate    = delegate{}
	_ memberlist.AliveDelegate    = delegate{}
	_ memberlist.ConflictDelegate = delegate{}
)

// NodeMeta returns the local metadata; New and UpdateMeta checked its size.
func (d delegate) NodeMeta(limit int) []byte {
	d.m.mu.Lock()
	defer d.m.mu.Unlock()
	return encodeMeta(d.m.meta)
}

// NotifyMsg receives user messages: leave notices (leave.go) and keyring
// operations (keyring_ops.go).
func (d delegate) NotifyMsg(msg []byte) {
	if len(msg) == 0 {
		return
	}
	switch msg[0] {
	case msgKeyringRequest:
		d.m.receiveKeyringRequest(msg)
	case msgKeyringResponse:
		d.m.receiveKeyringAnswer(msg)
	default:
		d.m.receiveLeaveNotice(msg)
	}
}

// GetBroadcasts is unused: nothing is gossiped besides memberlist's own
// messages.
func (d delegate) GetBroadcasts(overhead, limit int) [][]byte { return nil }

// LocalState sends the recent leave notices in a push/pull state sync.
func (d delegate) LocalState(join bool) []byte { return d.m.localState() }

// MergeRemoteState records the leave notices of a peer's state sync.
func (d delegate) MergeRemoteState(buf []byte, join bool) { d.m.mergeState(buf) }

// NotifyJoin records a member that appeared or came back.
func (d delegate) NotifyJoin(n *memberlist.Node) { d.m.observe(n, EventJoin) }

// NotifyUpdate records a member's new metadata.
func (d delegate) NotifyUpdate(n *memberlist.Node) { d.m.observe(n, EventUpdate) }

// NotifyLeave records a member that left or died; a leave notice for its
// instance tells the two apart (see leave.go).
func (d delegate) NotifyLeave(n *memberlist.Node) { d.m.observe(n, EventLeave) }

// NotifyMerge refuses to join, or be joined by, a cluster in which a live
// member has another cluster id or protocol version. It runs on both sides
// of a join: in the joining member's Join call and in the seed's listener.
func (d delegate) NotifyMerge(peers []*memberlist.Node) error {
	m := d.m
	m.mu.Lock()
	a := m.attempt
	m.mu.Unlock()
	var refusal error
	for _, p := range peers {
		if p.State != memberlist.StateAlive && p.State != memberlist.StateSuspect {
			continue // gone members do not make a cluster incompatible
		}
		err := m.compatible(p)
		if err == nil {
			continue
		}
		if refusal == nil {
			refusal = err
		}
		if a != nil && slices.Contains(a.seeds, p.Address()) {
			refusal = err // name the seed itself when it is one of them
			break
		}
	}
	if refusal == nil {
		return nil
	}
	m.log.Warn("refusing to merge with another cluster", "err", refusal)
	m.mu.Lock()
	if a != nil && a.refusal == nil {
		a.refusal = refusal
	}
	m.mu.Unlock()
	return refusal
}

// NotifyAlive refuses gossip about members of another cluster or version,
// which could otherwise leak in without a join.
func (d delegate) NotifyAlive(n *memberlist.Node) error {
	return d.m.compatible(n) // memberlist logs a refusal
}

// NotifyConflict reports two processes claiming one ID. memberlist keeps the
// member it already knows and ignores the other.
func (d delegate) NotifyConflict(existing, other *memberlist.Node) {
	m := d.m
	if existing.Name == m.cfg.Meta.ID {
		m.log.Error("another process uses this member's ID; the cluster keeps the instance it knows and ignores this one until that instance leaves or is declared dead",
			"id", existing.Name, "this_addr", existing.Address(), "other_addr", other.Address())
		m.mu.Lock()
		if a := m.attempt; a != nil && a.duplicate == "" {
			a.duplicate = other.Address()
		}
		m.mu.Unlock()
		return
	}
	m.log.Error("two processes claim one member ID; keeping the known one, ignoring the other",
		"id", existing.Name, "known_addr", existing.Address(), "ignored_addr", other.Address())
}

// compatible checks a remote member's metadata against ours.
func (m *Membership) compatible(n *memberlist.Node) error {
	w, err := decodeMeta(n.Name, n.Meta)
	if err != nil {
		return fmt.Errorf("%w: cannot read the metadata of node %q at %s: %v",
			ErrIncompatibleVersion, n.Name, n.Address(), err)
	}
	local := m.cfg.Meta // ClusterID and Version never change
	if w.ClusterID != local.ClusterID {
		return fmt.Errorf("%w: cluster id %q of this node does not match cluster id %q of node %q at %s",
			ErrClusterMismatch, local.ClusterID, w.ClusterID, n.Name, n.Address())
	}
	if w.Version != local.Version {
		return fmt.Errorf("%w: protocol version %d of this node does not match protocol version %d of node %q at %s",
			ErrIncompatibleVersion, local.Version, w.Version, n.Name, n.Address())
	}
	if w.Topology != local.Topology {
		return fmt.Errorf("%w: the region list of this node (%s) differs from that of node %q at %s (%s); every member must list the same regions and stores",
			ErrClusterMismatch, topologyName(local.Topology), n.Name, n.Address(), topologyName(w.Topology))
	}
	return nil
}

// observe applies one memberlist event to the member table and emits ours.
// For EventLeave it decides between EventLeave and EventFailed.
func (m *Membership) observe(n *memberlist.Node, kind EventKind) {
	w, err := decodeMeta(n.Name, n.Meta)
	if err != nil {
		// NotifyAlive refuses such members, so this is not expected.
		m.log.Warn("member with unreadable metadata", "id", n.Name, "addr", n.Address(), "err", err)
	}
	now := time.Now()

	m.mu.Lock()
	defer m.mu.Unlock()
	m.forgetLocked(now)
	r := m.members[n.Name]
	if r == nil {
		r = &memberRecord{}
		m.members[n.Name] = r
	}
	before := r.Meta
	r.Meta, r.GossipAddr, r.instance = w.Meta, n.Address(), w.instance

	switch kind {
	case EventJoin:
		r.State, r.Since = StateAlive, now
	case EventUpdate:
		if r.State == StateAlive && before == r.Meta {
			return // nothing callers can see changed
		}
		r.State, r.Since = StateAlive, now
	case EventLeave:
		r.State, r.Since = StateLeft, now
		if notice, ok := m.notices[n.Name]; !ok || notice.instance != w.instance {
			r.State, kind = StateDead, EventFailed
		}
	}
	m.log.Info(eventMessages[kind], "id", r.ID, "addr", r.GossipAddr, "role", r.Role,
		"region", r.Region, "zone", r.Zone, "state", r.State)
	m.emitLocked(Event{Kind: kind, Member: r.Member})
}

var eventMessages = map[EventKind]string{
	EventJoin:   "member joined",
	EventUpdate: "member updated",
	EventLeave:  "member left",
	EventFailed: "member failed",
}

// emitLocked queues ev without ever blocking: if the channel is full the
// oldest event is dropped. Callers hold mu, which also orders the sends.
func (m *Membership) emitLocked(ev Event) {
	if m.eventsClosed {
		return
	}
	select {
	case m.events <- ev:
		return
	default:
	}
	select {
	case <-m.events:
		if m.dropped.Add(1) == 1 {
			m.log.Warn("membership events are not being read fast enough; dropping the oldest (see Members for the current view)")
		}
	default:
	}
	select {
	case m.events <- ev:
	default:
		m.dropped.Add(1)
	}
}

// forgetLocked drops dead and left members older than cfg.Forget, and leave
// notices older than noticeTTL.
func (m *Membership) forgetLocked(now time.Time) {
	for id, r := range m.members {
		if (r.State == StateDead || r.State == StateLeft) && id != m.cfg.Meta.ID && now.Sub(r.Since) > m.cfg.Forget {
			delete(m.members, id)
		}
	}
	for id, n := range m.notices {
		if now.Sub(n.at) > noticeTTL {
			delete(m.notices, id)
		}
	}
}

func topologyName(fingerprint string) string {
	if fingerprint == "" {
		return "no regions configured"
	}
	return "fingerprint " + fingerprint
}
