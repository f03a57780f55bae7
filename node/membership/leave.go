package membership

import (
	"encoding/binary"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// Telling a graceful leave from a failure.
//
// memberlist knows the difference (a member's own "dead" message means it
// left) but v0.7.0 does not pass it on: the Node handed to NotifyLeave never
// has its State filled in. So Close first sends a leave notice of its own,
// naming the member and its instance, straight to every member it knows over
// TCP, and only then calls memberlist's Leave. A member that departs after
// its notice arrived is reported as StateLeft, any other as StateDead.
//
// Notices are also exchanged in memberlist's periodic push/pull state sync,
// so a member that missed the direct send (it joined meanwhile, or the send
// failed) still learns of it; a notice that arrives after the departure
// turns StateDead into StateLeft. Gossiping the notice instead would not do:
// memberlist's dead message cancels the relaying of an alive message about
// the same member, and gossip reaches every member only with high
// probability, not before the dead message.

// noticeTTL is how long a leave notice is kept and re-sent in state syncs:
// many push/pull intervals, so that every member has seen it.
const noticeTTL = 10 * time.Minute

// maxNoticeSends bounds the concurrent direct sends of a leave notice.
const maxNoticeSends = 32

// maxStateNotices bounds the notices sent in one state sync.
const maxStateNotices = 1024

// msgLeaveNotice is the first byte of a leave notice message; the rest is
// the 8-byte instance and then the member ID.
const msgLeaveNotice byte = 1

// stateV1 is the first byte of the push/pull user state; then for each
// notice a uvarint ID length, the ID and the 8-byte instance.
const stateV1 byte = 1

// leaveNotice is a recorded leave notice.
type leaveNotice struct {
	instance uint64
	at       time.Time // when it was recorded, to expire it after noticeTTL
}

func encodeLeaveNotice(id string, instance uint64) []byte {
	b := make([]byte, 0, 9+len(id))
	b = append(b, msgLeaveNotice)
	b = binary.BigEndian.AppendUint64(b, instance)
	return append(b, id...)
}

func decodeLeaveNotice(b []byte) (id string, instance uint64, ok bool) {
	if len(b) < 10 || b[0] != msgLeaveNotice {
		return "", 0, false
	}
	return string(b[9:]), binary.BigEndian.Uint64(b[1:9]), true
}

// receiveLeaveNotice handles a notice sent by a leaving member.
func (m *Membership) receiveLeaveNotice(msg []byte) {
	id, instance, ok := decodeLeaveNotice(msg)
	if !ok {
		m.log.Debug("ignoring an unknown gossip message", "len", len(msg))
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.recordNoticeLocked(id, instance, time.Now())
}

// recordNoticeLocked keeps a notice and applies it to a member already
// declared dead.
func (m *Membership) recordNoticeLocked(id string, instance uint64, now time.Time) {
	if n, seen := m.notices[id]; seen && n.instance == instance {
		return
	}
	m.notices[id] = leaveNotice{instance: instance, at: now}
	if r := m.members[id]; r != nil && r.instance == instance && r.State == StateDead {
		r.State, r.Since = StateLeft, now
		m.log.Info("member left (its leave notice arrived after it was declared dead)", "id", id, "addr", r.GossipAddr)
		m.emitLocked(Event{Kind: EventLeave, Member: r.Member})
	}
}

// localState encodes the unexpired notices for a push/pull state sync.
func (m *Membership) localState() []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	now := time.Now()
	b := []byte{stateV1}
	n := 0
	for id, nt := range m.notices {
		if now.Sub(nt.at) > noticeTTL || n == maxStateNotices {
			continue
		}
		b = binary.AppendUvarint(b, uint64(len(id)))
		b = append(b, id...)
		b = binary.BigEndian.AppendUint64(b, nt.instance)
		n++
	}
	return b
}

// mergeState records the notices of a peer's state sync.
func (m *Membership) mergeState(b []byte) {
	if len(b) == 0 || b[0] != stateV1 {
		return // an empty or newer state: nothing we understand
	}
	b = b[1:]
	now := time.Now()
	m.mu.Lock()
	defer m.mu.Unlock()
	for len(b) > 0 {
		l, n := binary.Uvarint(b)
		if n <= 0 || l > maxIDLen || uint64(len(b)-n) < l+8 {
			m.log.Debug("ignoring the rest of a malformed state sync")
			return
		}
		id := string(b[n : n+int(l)])
		b = b[n+int(l):]
		m.recordNoticeLocked(id, binary.BigEndian.Uint64(b[:8]), now)
		b = b[8:]
	}
}

// leave sends this member's leave notice, then memberlist's leave message,
// within leaveTimeout.
func (m *Membership) leave(list *memberlist.Memberlist) {
	deadline := time.Now().Add(leaveTimeout)
	m.mu.Lock()
	id, instance := m.meta.ID, m.meta.instance
	m.notices[id] = leaveNotice{instance: instance, at: time.Now()}
	// Addresses come from our table: memberlist's Members returns nodes
	// that it keeps updating without a lock we could take.
	var peers []*memberlist.Node
	for _, r := range m.members {
		if r.ID != id && r.State == StateAlive {
			if n := nodeAt(r.ID, r.GossipAddr); n != nil {
				peers = append(peers, n)
			}
		}
	}
	m.mu.Unlock()

	// Sends to a member that is down end after Timings.TCPTimeout, possibly
	// after Close has returned.
	msg := encodeLeaveNotice(id, instance)
	var wg sync.WaitGroup
	slots := make(chan struct{}, maxNoticeSends)
	for _, n := range peers {
		wg.Go(func() {
			slots <- struct{}{}
			defer func() { <-slots }()
			if err := list.SendReliable(n, msg); err != nil {
				m.log.Debug("leave notice not delivered; that member may report this one as failed", "to", n.Name, "err", err)
			}
		})
	}
	sent := make(chan struct{})
	go func() { wg.Wait(); close(sent) }()
	select {
	case <-sent:
	case <-time.After(leaveTimeout / 2):
		m.log.Warn("leave notices not all delivered in time; some members may report this one as failed")
	}
	// Leave(0) would wait forever: keep a small positive bound.
	if err := list.Leave(max(time.Until(deadline), 100*time.Millisecond)); err != nil {
		m.log.Warn("leave not gossiped in time; peers will report this member as failed", "err", err)
	}
}

// nodeAt returns a memberlist node to send to, or nil if addr is not ip:port.
func nodeAt(name, addr string) *memberlist.Node {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil
	}
	ip := net.ParseIP(host)
	p, err := strconv.ParseUint(port, 10, 16)
	if ip == nil || err != nil {
		return nil
	}
	return &memberlist.Node{Name: name, Addr: ip, Port: uint16(p)}
}
