package membership

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"github.com/hashicorp/memberlist"
)

// Cluster-wide keyring changes, the Serf/Consul way: the member asked
// applies the change, then sends it to every live member over gossip's
// reliable (TCP) channel, itself sealed with the current keyring, so only
// key holders can ask. Each member applies it, records its keys (Config
// OnKeysChanged, for the key file) and answers. Rotation is: install the
// new key everywhere, use it everywhere, remove the old one.

// KeyOp is a keyring change, or a listing.
type KeyOp byte

// Keyring operations.
const (
	KeyList KeyOp = iota + 1
	KeyInstall
	KeyUse
	KeyRemove
)

func (op KeyOp) String() string {
	switch op {
	case KeyList:
		return "list"
	case KeyInstall:
		return "install"
	case KeyUse:
		return "use"
	case KeyRemove:
		return "remove"
	}
	return fmt.Sprintf("KeyOp(%d)", byte(op))
}

// Gossip user messages of keyring operations (leave notices are 1).
const (
	msgKeyringRequest  byte = 2
	msgKeyringResponse byte = 3
)

// KeyringAnswer is one member's answer to a keyring operation.
type KeyringAnswer struct {
	Member string
	Err    string   // empty on success
	Keys   [][]byte // the member's keyring afterwards, primary first
}

// pendingOps are the operations this member sent and waits answers for.
type pendingOps struct {
	mu   sync.Mutex
	byID map[uint64]chan KeyringAnswer
}

// ChangeKeyring applies op to this member's keyring and to every live
// member's, and returns every member's answer (this one first). Members
// that do not answer before ctx ends are reported with an error. A local
// failure stops the operation before anything is sent.
func (m *Membership) ChangeKeyring(ctx context.Context, op KeyOp, key []byte) ([]KeyringAnswer, error) {
	local := m.applyKeyOp(op, key)
	if local.Err != "" {
		return []KeyringAnswer{local}, errors.New(local.Err)
	}
	m.mu.Lock()
	list := m.list
	m.mu.Unlock()
	if list == nil {
		return nil, ErrClosed
	}
	var id [8]byte
	rand.Read(id[:])
	reqID := binary.BigEndian.Uint64(id[:])
	self := m.cfg.Meta.ID
	msg := append([]byte{msgKeyringRequest, byte(op)}, id[:]...)
	msg = binary.AppendUvarint(msg, uint64(len(self)))
	msg = append(append(msg, self...), key...)

	answers := make(chan KeyringAnswer, 64)
	m.pending.mu.Lock()
	if m.pending.byID == nil {
		m.pending.byID = map[uint64]chan KeyringAnswer{}
	}
	m.pending.byID[reqID] = answers
	m.pending.mu.Unlock()
	defer func() {
		m.pending.mu.Lock()
		delete(m.pending.byID, reqID)
		m.pending.mu.Unlock()
	}()

	out := []KeyringAnswer{local}
	waiting := map[string]bool{}
	for _, n := range list.Members() {
		if n.Name == self || n.State != memberlist.StateAlive {
			continue
		}
		if err := list.SendReliable(n, msg); err != nil {
			out = append(out, KeyringAnswer{Member: n.Name, Err: "not reached: " + err.Error()})
			continue
		}
		waiting[n.Name] = true
	}
	for len(waiting) > 0 {
		select {
		case a := <-answers:
			if waiting[a.Member] {
				delete(waiting, a.Member)
				out = append(out, a)
			}
		case <-ctx.Done():
			for name := range waiting {
				out = append(out, KeyringAnswer{Member: name, Err: "no answer: " + ctx.Err().Error()})
			}
			return out, nil
		}
	}
	return out, nil
}

// applyKeyOp runs op on this member's keyring and reports the outcome.
func (m *Membership) applyKeyOp(op KeyOp, key []byte) KeyringAnswer {
	a := KeyringAnswer{Member: m.cfg.Meta.ID}
	var err error
	switch op {
	case KeyList:
	case KeyInstall:
		err = m.InstallKey(key)
	case KeyUse:
		err = m.UseKey(key)
	case KeyRemove:
		err = m.RemoveKey(key)
	default:
		err = fmt.Errorf("unknown keyring operation %d", op)
	}
	if err == nil {
		a.Keys, err = m.Keys()
	}
	if err == nil && op != KeyList && m.cfg.OnKeysChanged != nil {
		// The keyring changed in memory either way: failing here would
		// leave this member out of step with the others.
		if serr := m.cfg.OnKeysChanged(a.Keys); serr != nil {
			m.log.Warn("gossip keyring changed but not saved", "err", serr)
		}
	}
	if err != nil {
		a.Err = err.Error()
	}
	return a
}

// receiveKeyringRequest applies a request from another member and answers
// it. memberlist calls it from its network loop: the answer goes out on a
// goroutine of its own.
func (m *Membership) receiveKeyringRequest(b []byte) {
	if len(b) < 10 {
		return
	}
	op, id := KeyOp(b[1]), b[2:10]
	n, k := binary.Uvarint(b[10:])
	if k <= 0 || uint64(len(b)-10-k) < n {
		return
	}
	from := string(b[10+k : 10+k+int(n)])
	key := bytes.Clone(b[10+k+int(n):])
	go func() {
		a := m.applyKeyOp(op, key)
		m.log.Info("gossip keyring change from a member", "op", op, "from", from, "err", a.Err)
		m.mu.Lock()
		list := m.list
		m.mu.Unlock()
		if list == nil {
			return
		}
		for _, node := range list.Members() {
			if node.Name == from {
				if err := list.SendReliable(node, encodeKeyringAnswer(id, a)); err != nil {
					m.log.Warn("answer a gossip keyring change", "to", from, "err", err)
				}
				return
			}
		}
	}()
}

func encodeKeyringAnswer(id []byte, a KeyringAnswer) []byte {
	b := append([]byte{msgKeyringResponse}, id...)
	for _, s := range [][]byte{[]byte(a.Member), []byte(a.Err)} {
		b = binary.AppendUvarint(b, uint64(len(s)))
		b = append(b, s...)
	}
	for _, k := range a.Keys {
		b = binary.AppendUvarint(b, uint64(len(k)))
		b = append(b, k...)
	}
	return b
}

// receiveKeyringAnswer hands an answer to the operation waiting for it.
func (m *Membership) receiveKeyringAnswer(b []byte) {
	if len(b) < 9 {
		return
	}
	reqID := binary.BigEndian.Uint64(b[1:9])
	rest := b[9:]
	var fields [][]byte
	for len(rest) > 0 {
		n, k := binary.Uvarint(rest)
		if k <= 0 || uint64(len(rest)-k) < n {
			return
		}
		fields = append(fields, bytes.Clone(rest[k:k+int(n)]))
		rest = rest[k+int(n):]
	}
	if len(fields) < 2 {
		return
	}
	a := KeyringAnswer{Member: string(fields[0]), Err: string(fields[1]), Keys: fields[2:]}
	m.pending.mu.Lock()
	ch := m.pending.byID[reqID]
	m.pending.mu.Unlock()
	if ch != nil {
		select {
		case ch <- a:
		default: // more answers than members: drop
		}
	}
}
