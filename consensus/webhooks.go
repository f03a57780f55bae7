package consensus

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"strconv"
	"strings"

	"github.com/cockroachdb/pebble/v2"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// Events and webhooks. While at least one webhook exists, every applied
// entry that changes something a user would want to hear about leaves
// events in the 'v' table, keyed by its log index, in the entry's own
// batch: the events are the log, in log order, and every replica holds the
// same ones. Each webhook has a cursor ('q') that only its delivery
// progress entries move; events every cursor has passed are dropped. The
// deliverer (the leader's) reads events after a cursor, so a node that
// dies mid-delivery loses nothing: the next leader starts from the
// committed cursor and delivers again what was not yet recorded, which is
// why delivery is at least once and receivers deduplicate by event id.

// eventKey is the key of event seq of the entry at index: fixed width, so
// keys sort in log order.
func eventKey(index uint64, seq uint32) []byte {
	k := make([]byte, 0, 2+12)
	k = append(k, layoutVersion, tableEvent)
	k = binary.BigEndian.AppendUint64(k, index)
	return binary.BigEndian.AppendUint32(k, seq)
}

// EventID names an event in CloudEvents ids and dead-letter lists.
func EventID(index uint64, seq uint32) string {
	return strconv.FormatUint(index, 10) + "-" + strconv.FormatUint(uint64(seq), 10)
}

// EventEpoch is "" for a log that was never restored from a backup, and a
// random text for one that was: delivered event ids carry it, since a
// restored log reuses indexes the old cluster had already used.
func (s *Store) EventEpoch() (string, error) {
	var epoch string
	err := s.read(func(db *pebble.DB) error {
		b, _, err := get(db, key(tableEpoch))
		epoch = string(b)
		return err
	})
	return epoch, err
}

// ParseEventID is EventID's inverse.
func ParseEventID(id string) (index uint64, seq uint32, err error) {
	i, s, ok := strings.Cut(id, "-")
	if ok {
		index, err = strconv.ParseUint(i, 10, 64)
		if err == nil {
			var s64 uint64
			s64, err = strconv.ParseUint(s, 10, 32)
			seq = uint32(s64)
		}
	}
	if !ok || err != nil {
		return 0, 0, fmt.Errorf("event id %q: want INDEX-SEQ", id)
	}
	return index, seq, nil
}

func deadLetterKey(name string, index uint64, seq uint32) []byte {
	return letterKey(tableDeadLetter, name, index, seq)
}

// replayKey marks a dead letter queued for replay, so the deliverer finds
// the queue without reading every dead letter.
func replayKey(name string, index uint64, seq uint32) []byte {
	return letterKey(tableReplayQueue, name, index, seq)
}

func letterKey(table byte, name string, index uint64, seq uint32) []byte {
	k := prefix(table, name)
	k = binary.BigEndian.AppendUint64(k, index)
	return binary.BigEndian.AppendUint32(k, seq)
}

// anyWebhook reports whether a webhook exists: only then are events kept.
func anyWebhook(r pebble.Reader) (bool, error) {
	lower, upper := tableBounds(tableWebhook)
	it, err := r.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: upper})
	if err != nil {
		return false, err
	}
	defer it.Close()
	return it.First(), it.Error()
}

// eventsOf derives the events of entry e from the state before it
// applies (a moved tag's previous manifest, the repositories of a placed
// blob); they are written only if the entry applies.
func eventsOf(r pebble.Reader, index uint64, e *pb.LogEntry) ([]*pb.Event, error) {
	var evs []*pb.Event
	add := func(ev *pb.Event) {
		ev.Index, ev.Seq, ev.TimeUnixNano = index, uint32(len(evs)), e.TimeUnixNano
		ev.Principal = e.GetActor().GetPrincipal()
		evs = append(evs, ev)
	}
	repo := func(name string) []string { return []string{name} }
	switch c := e.Command.(type) {
	case *pb.LogEntry_PutManifest:
		m := c.PutManifest
		add(&pb.Event{Kind: "manifest.pushed", Repositories: repo(m.Repository), Digest: m.Digest,
			MediaType: m.MediaType, Size: int64(len(m.Content)), Tag: strings.Join(m.Tags, ",")})
		for _, tag := range m.Tags {
			old, ok, err := get(r, key(tableTag, m.Repository, tag))
			if err != nil {
				return nil, err
			}
			if ok && string(old) == m.Digest {
				continue // pushed again under the same tag: nothing moved
			}
			add(&pb.Event{Kind: "tag.updated", Repositories: repo(m.Repository), Tag: tag, Digest: m.Digest,
				MediaType: m.MediaType, PreviousDigest: string(old)})
		}
	case *pb.LogEntry_DeleteManifest:
		add(&pb.Event{Kind: "manifest.deleted", Repositories: repo(c.DeleteManifest.Repository), Digest: c.DeleteManifest.Digest})
	case *pb.LogEntry_DeleteTag:
		old, _, err := get(r, key(tableTag, c.DeleteTag.Repository, c.DeleteTag.Tag))
		if err != nil {
			return nil, err
		}
		add(&pb.Event{Kind: "tag.deleted", Repositories: repo(c.DeleteTag.Repository), Tag: c.DeleteTag.Tag, PreviousDigest: string(old)})
	case *pb.LogEntry_UnlinkBlob:
		add(&pb.Event{Kind: "blob.deleted", Repositories: repo(c.UnlinkBlob.Repository), Digest: c.UnlinkBlob.Digest})
	case *pb.LogEntry_DeleteRepository:
		add(&pb.Event{Kind: "repository.deleted", Repositories: repo(c.DeleteRepository.Repository)})
	case *pb.LogEntry_PlaceBlob:
		repos, err := lastFields(r, prefix(tableBlobRepos, c.PlaceBlob.Digest))
		if err != nil {
			return nil, err
		}
		add(&pb.Event{Kind: "blob.placed", Repositories: repos, Digest: c.PlaceBlob.Digest, Size: c.PlaceBlob.Size, Region: c.PlaceBlob.Region})
	case *pb.LogEntry_BlobRemoved:
		add(&pb.Event{Kind: "blob.removed", Digest: c.BlobRemoved.Digest, Region: c.BlobRemoved.Region})
	case *pb.LogEntry_CollectGarbage:
		g := c.CollectGarbage
		add(&pb.Event{Kind: "gc.collected", Detail: fmt.Sprintf("run=%s blobs=%d manifests=%d", g.RunId, len(g.Blobs), len(g.Manifests))})
	case *pb.LogEntry_ApplyRetention:
		add(&pb.Event{Kind: "retention.applied", Detail: auditDetail(e)})
	case *pb.LogEntry_SetPolicy, *pb.LogEntry_DeletePolicy, *pb.LogEntry_SetImmutableRule, *pb.LogEntry_DeleteImmutableRule,
		*pb.LogEntry_SetQuota, *pb.LogEntry_DeleteQuota, *pb.LogEntry_SetRetentionRule, *pb.LogEntry_DeleteRetentionRule:
		add(&pb.Event{Kind: "policy.changed", Detail: entryName(e) + " " + auditDetail(e)})
	case *pb.LogEntry_PutUser, *pb.LogEntry_DeleteUser, *pb.LogEntry_PutTeam, *pb.LogEntry_DeleteTeam,
		*pb.LogEntry_PutRobot, *pb.LogEntry_RevokeRobot, *pb.LogEntry_PutGrant, *pb.LogEntry_DeleteGrant:
		add(&pb.Event{Kind: "access.changed", Detail: entryName(e) + " " + auditDetail(e)})
	}
	return evs, nil
}

// entryName is the command's field name ("set_quota").
func entryName(e *pb.LogEntry) string {
	if f := e.ProtoReflect().WhichOneof(commandOneof); f != nil {
		return string(f.Name())
	}
	return ""
}

// EventKinds are the kinds events have; webhooks filter on them or on
// their first part ("tag" for tag.updated and tag.deleted).
var EventKinds = []string{
	"manifest.pushed", "manifest.deleted", "tag.updated", "tag.deleted", "blob.deleted", "repository.deleted",
	"blob.placed", "blob.removed", "gc.collected", "retention.applied", "policy.changed", "access.changed",
}

// webhookCommands never produce events: a webhook hearing about its own
// delivery progress would never go quiet.
var webhookCommands = map[protoreflect.Name]bool{
	"put_webhook": true, "delete_webhook": true, "webhook_progress": true, "replay_dead_letters": true,
}

// recordEvents writes the events of an applied entry.
func recordEvents(b *pebble.Batch, evs []*pb.Event) error {
	for _, ev := range evs {
		if err := setProto(b, eventKey(ev.Index, ev.Seq), ev); err != nil {
			return err
		}
	}
	return nil
}

func applyPutWebhook(b *pebble.Batch, e *pb.LogEntry) error {
	w := e.GetPutWebhook().GetWebhook()
	if w.GetName() == "" || w.GetUrl() == "" || w.GetSecret() == "" {
		return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "a webhook needs a name, a URL and a secret")
	}
	k := key(tableWebhook, w.Name)
	exists, err := has(b, k)
	if err != nil {
		return err
	}
	if exists && !e.GetPutWebhook().GetReplace() {
		return pb.Errorf(pb.Code_CODE_PRECONDITION_FAILED, "webhook %s already exists (replace it with --replace)", w.Name)
	}
	if !exists {
		// A new webhook hears of what happens from now on: its cursor
		// starts after the newest event kept for the others.
		cur := &pb.WebhookCursor{}
		lower, upper := tableBounds(tableEvent)
		it, err := b.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: upper})
		if err != nil {
			return err
		}
		if it.Last() {
			kb := it.Key()[2:]
			cur.Index, cur.Seq = binary.BigEndian.Uint64(kb), binary.BigEndian.Uint32(kb[8:])
		}
		if err := it.Close(); err != nil {
			return err
		}
		if err := setProto(b, key(tableWebhookCursor, w.Name), cur); err != nil {
			return err
		}
	}
	w.CreatedUnixNano = e.TimeUnixNano
	return setProto(b, k, w)
}

func applyDeleteWebhook(b *pebble.Batch, e *pb.LogEntry) error {
	name := e.GetDeleteWebhook().GetName()
	k := key(tableWebhook, name)
	ok, err := has(b, k)
	if err != nil {
		return err
	}
	if !ok {
		return pb.Errorf(pb.Code_CODE_NAME_UNKNOWN, "no webhook named %q", name)
	}
	for _, d := range [][]byte{k, key(tableWebhookCursor, name)} {
		if err := b.Delete(d, nil); err != nil {
			return err
		}
	}
	for _, table := range []byte{tableDeadLetter, tableReplayQueue} {
		p := prefix(table, name)
		if err := b.DeleteRange(p, upperBound(p), nil); err != nil {
			return err
		}
	}
	return pruneEvents(b)
}

// pruneEvents drops the events every webhook's cursor has passed.
func pruneEvents(b *pebble.Batch) error {
	cursors, err := scanValues(b, key(tableWebhookCursor), "", -1, func() *pb.WebhookCursor { return &pb.WebhookCursor{} })
	if err != nil {
		return err
	}
	lower, upper := tableBounds(tableEvent)
	if len(cursors) > 0 {
		oldest := cursors[0]
		for _, c := range cursors[1:] {
			if c.Index < oldest.Index || c.Index == oldest.Index && c.Seq < oldest.Seq {
				oldest = c
			}
		}
		upper = eventKey(oldest.Index, oldest.Seq)
		upper = append(upper, 0) // through the cursor's own event
	}
	return b.DeleteRange(lower, upper, nil)
}

func applyWebhookProgress(b *pebble.Batch, e *pb.LogEntry) error {
	p := e.GetWebhookProgress()
	ck := key(tableWebhookCursor, p.Name)
	cur := &pb.WebhookCursor{}
	ok, err := getProto(b, ck, cur)
	if err != nil {
		return err
	}
	if !ok {
		return pb.Errorf(pb.Code_CODE_NAME_UNKNOWN, "no webhook named %q", p.Name)
	}
	// Only forward: progress from a leader that lost its place must not
	// undo a newer one's.
	if p.Index > cur.Index || p.Index == cur.Index && p.Seq > cur.Seq {
		cur.Index, cur.Seq = p.Index, p.Seq
	}
	cur.Delivered += p.Delivered
	if p.LastAttemptUnixNano > 0 {
		cur.LastStatus, cur.LastError, cur.LastAttemptUnixNano = p.LastStatus, p.LastError, p.LastAttemptUnixNano
	}
	for _, d := range append(p.Dead, p.FailedAgain...) {
		d.Replay = false
		i, sq := d.GetEvent().GetIndex(), d.GetEvent().GetSeq()
		if err := setProto(b, deadLetterKey(p.Name, i, sq), d); err != nil {
			return err
		}
		if err := b.Delete(replayKey(p.Name, i, sq), nil); err != nil {
			return err
		}
	}
	if p.MaxDeadLetters > 0 && len(p.Dead) > 0 {
		dropped, err := dropOldestDeadLetters(b, p.Name, p.MaxDeadLetters)
		if err != nil {
			return err
		}
		cur.DroppedDeadLetters += dropped
	}
	if err := setProto(b, ck, cur); err != nil {
		return err
	}
	for _, id := range p.Replayed {
		i, s, err := ParseEventID(id)
		if err != nil {
			return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "%v", err)
		}
		for _, k := range [][]byte{deadLetterKey(p.Name, i, s), replayKey(p.Name, i, s)} {
			if err := b.Delete(k, nil); err != nil {
				return err
			}
		}
	}
	return pruneEvents(b)
}

// dropOldestDeadLetters keeps the newest max dead letters of webhook name:
// a receiver that stays down must not grow the state without bound.
func dropOldestDeadLetters(b *pebble.Batch, name string, max int64) (int64, error) {
	p := prefix(tableDeadLetter, name)
	var keys [][]byte
	err := scan(b, p, "", -1, func(k, _ []byte) error {
		keys = append(keys, bytes.Clone(k))
		return nil
	})
	if err != nil || int64(len(keys)) <= max {
		return 0, err
	}
	excess := keys[:int64(len(keys))-max] // keys sort in log order: oldest first
	for _, k := range excess {
		queued := append(prefix(tableReplayQueue, name), k[len(p):]...)
		if err := b.Delete(k, nil); err != nil {
			return 0, err
		}
		if err := b.Delete(queued, nil); err != nil {
			return 0, err
		}
	}
	return int64(len(excess)), nil
}

func applyReplayDeadLetters(b *pebble.Batch, e *pb.LogEntry) error {
	r := e.GetReplayDeadLetters()
	ok, err := has(b, key(tableWebhook, r.Name))
	if err != nil {
		return err
	}
	if !ok {
		return pb.Errorf(pb.Code_CODE_NAME_UNKNOWN, "no webhook named %q", r.Name)
	}
	mark := func(k []byte, d *pb.DeadLetter) error {
		d.Replay = true
		if err := b.Set(replayKey(r.Name, d.GetEvent().GetIndex(), d.GetEvent().GetSeq()), nil, nil); err != nil {
			return err
		}
		return setProto(b, k, d)
	}
	if len(r.Ids) == 0 {
		letters, err := scanValues(b, prefix(tableDeadLetter, r.Name), "", -1, func() *pb.DeadLetter { return &pb.DeadLetter{} })
		if err != nil {
			return err
		}
		if len(letters) == 0 {
			return pb.Errorf(pb.Code_CODE_NAME_UNKNOWN, "webhook %s has no dead letters", r.Name)
		}
		for _, d := range letters {
			if err := mark(deadLetterKey(r.Name, d.Event.GetIndex(), d.Event.GetSeq()), d); err != nil {
				return err
			}
		}
		return nil
	}
	for _, id := range r.Ids {
		i, s, err := ParseEventID(id)
		if err != nil {
			return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "%v", err)
		}
		k := deadLetterKey(r.Name, i, s)
		d := &pb.DeadLetter{}
		found, err := getProto(b, k, d)
		if err != nil {
			return err
		}
		if !found {
			return pb.Errorf(pb.Code_CODE_NAME_UNKNOWN, "webhook %s has no dead letter %s", r.Name, id)
		}
		if err := mark(k, d); err != nil {
			return err
		}
	}
	return nil
}

// Webhooks lists the webhooks, secrets included: the deliverer signs with
// them. Callers that answer users clear them.
func (s *Store) Webhooks(context.Context) ([]*pb.Webhook, error) {
	var out []*pb.Webhook
	err := s.read(func(db *pebble.DB) error {
		var err error
		out, err = scanValues(db, key(tableWebhook), "", -1, func() *pb.Webhook { return &pb.Webhook{} })
		return err
	})
	return out, err
}

// WebhookCursor is the delivery state of webhook name (nil: no such webhook).
func (s *Store) WebhookCursor(_ context.Context, name string) (*pb.WebhookCursor, error) {
	var cur *pb.WebhookCursor
	err := s.read(func(db *pebble.DB) error {
		c := &pb.WebhookCursor{}
		ok, err := getProto(db, key(tableWebhookCursor, name), c)
		if ok {
			cur = c
		}
		return err
	})
	return cur, err
}

// EventsAfter returns up to limit events after (index, seq), in log order.
func (s *Store) EventsAfter(_ context.Context, index uint64, seq uint32, limit int) ([]*pb.Event, error) {
	var out []*pb.Event
	err := s.eachEventAfter(index, seq, func(v []byte) (bool, error) {
		ev := &pb.Event{}
		if err := proto.Unmarshal(v, ev); err != nil {
			return false, err
		}
		out = append(out, ev)
		return len(out) < limit, nil
	})
	return out, err
}

// CountEventsAfter counts the events after (index, seq), up to max.
func (s *Store) CountEventsAfter(_ context.Context, index uint64, seq uint32, max int64) (int64, error) {
	var n int64
	err := s.eachEventAfter(index, seq, func([]byte) (bool, error) {
		n++
		return n < max, nil
	})
	return n, err
}

// eachEventAfter calls fn with each stored event after (index, seq), in
// log order, while it returns true.
func (s *Store) eachEventAfter(index uint64, seq uint32, fn func(v []byte) (bool, error)) error {
	return s.read(func(db *pebble.DB) error {
		_, upper := tableBounds(tableEvent)
		it, err := db.NewIter(&pebble.IterOptions{LowerBound: append(eventKey(index, seq), 0), UpperBound: upper})
		if err != nil {
			return err
		}
		defer it.Close()
		for ok := it.First(); ok; ok = it.Next() {
			more, err := fn(it.Value())
			if err != nil || !more {
				return err
			}
		}
		return it.Error()
	})
}

// QueuedReplays returns up to limit dead letters of webhook name queued
// for replay, oldest first.
func (s *Store) QueuedReplays(_ context.Context, name string, limit int) ([]*pb.DeadLetter, error) {
	var out []*pb.DeadLetter
	err := s.read(func(db *pebble.DB) error {
		p := prefix(tableReplayQueue, name)
		return scan(db, p, "", limit, func(k, _ []byte) error {
			d := &pb.DeadLetter{}
			ok, err := getProto(db, append(prefix(tableDeadLetter, name), k[len(p):]...), d)
			if err == nil && ok {
				out = append(out, d)
			}
			return err
		})
	})
	return out, err
}

// DeadLetterCount counts the dead letters of webhook name.
func (s *Store) DeadLetterCount(_ context.Context, name string) (int64, error) {
	var n int64
	err := s.read(func(db *pebble.DB) error {
		return scan(db, prefix(tableDeadLetter, name), "", -1, func(_, _ []byte) error {
			n++
			return nil
		})
	})
	return n, err
}

// DeadLetters lists up to limit dead letters of webhook name (limit < 0: all).
func (s *Store) DeadLetters(_ context.Context, name string, limit int) ([]*pb.DeadLetter, error) {
	var out []*pb.DeadLetter
	err := s.read(func(db *pebble.DB) error {
		var err error
		out, err = scanValues(db, prefix(tableDeadLetter, name), "", limit, func() *pb.DeadLetter { return &pb.DeadLetter{} })
		return err
	})
	return out, err
}
