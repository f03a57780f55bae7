package consensus

import (
	"errors"
	"fmt"
	"io"
	"log/slog"

	"github.com/cockroachdb/pebble/v2"
	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// LogVersion is the newest LogEntry format this binary applies. An entry with
// a newer version panics the node rather than being applied wrongly, so the
// leader proposes one only when every server advertises that it applies it
// (versions.go).
const LogVersion uint32 = 3

// applyFunc applies one command to batch. It returns a business error (a
// *meridianpb.Error) to reject the command; the batch is then discarded except
// for the applied index.
type applyFunc func(b *pebble.Batch, e *pb.LogEntry) error

// commands maps each LogEntry command (its oneof field name) to the function
// that applies it. TestEveryCommandHasAnApplyFunc keeps it complete.
var commands = map[protoreflect.Name]applyFunc{
	"put_manifest":    applyPutManifest,
	"delete_manifest": applyDeleteManifest,
	"delete_tag":      applyDeleteTag,
	"link_blob":       applyLinkBlob,
	"unlink_blob":     applyUnlinkBlob,
	"set_upload_key":  applySetUploadKey,
	"place_blob":      applyPlaceBlob,
	"set_policy":      applySetPolicy,
	"delete_policy":   applyDeletePolicy,
	"set_regions":     applySetRegions,

	"rotate_upload_key": applyRotateUploadKey,

	"put_user":         applyPutUser,
	"delete_user":      applyDeleteUser,
	"put_team":         applyPutTeam,
	"delete_team":      applyDeleteTeam,
	"put_robot":        applyPutRobot,
	"revoke_robot":     applyRevokeRobot,
	"put_grant":        applyPutGrant,
	"delete_grant":     applyDeleteGrant,
	"rotate_token_key": applyRotateTokenKey,
	"trim_audit":       applyTrimAudit,

	"collect_garbage":   applyCollectGarbage,
	"blob_removed":      applyBlobRemoved,
	"delete_repository": applyDeleteRepository,

	"set_immutable_rule":    applySetImmutableRule,
	"delete_immutable_rule": applyDeleteImmutableRule,
	"set_quota":             applySetQuota,
	"delete_quota":          applyDeleteQuota,
	"set_retention_rule":    applySetRetentionRule,
	"delete_retention_rule": applyDeleteRetentionRule,
	"apply_retention":       applyApplyRetention,
	"record_pulls":          applyRecordPulls,

	"put_webhook":         applyPutWebhook,
	"delete_webhook":      applyDeleteWebhook,
	"webhook_progress":    applyWebhookProgress,
	"replay_dead_letters": applyReplayDeadLetters,
}

// unaudited are entries the audit log leaves out: members' batched pull
// times are bookkeeping, not changes anyone asked for.
var unaudited = map[protoreflect.Name]bool{"record_pulls": true, "webhook_progress": true}

var commandOneof = (&pb.LogEntry{}).ProtoReflect().Descriptor().Oneofs().ByName("command")

// fsm applies committed log entries to the Store.
type fsm struct {
	store  *Store
	logger *slog.Logger
	// onApplied, when set, learns each index once its batch is committed.
	onApplied func(index uint64)
	// webhooks caches whether a webhook exists (only then are events
	// derived), so the apply loop does not look it up for every entry. It
	// is read from the store again after a webhook command or a restore,
	// the only things that change it; Apply and Restore run one at a time.
	webhooks      bool
	webhooksKnown bool
}

// Apply decodes and applies one entry. An entry that does not decode, or
// whose version or command this binary does not know, panics: crashing is
// safe, diverging from the other replicas is not.
func (f *fsm) Apply(l *raft.Log) any {
	f.store.mu.RLock()
	defer f.store.mu.RUnlock()
	db := f.store.db
	if db == nil {
		panic("consensus: apply on a closed state store")
	}
	applied, _, err := appliedIndex(db)
	if err != nil {
		panic(fmt.Sprintf("consensus: read applied index: %v", err))
	}
	if l.Index <= applied {
		// Replayed after a restart: the store already holds this entry's effect.
		return nil
	}
	e := &pb.LogEntry{}
	if err := proto.Unmarshal(l.Data, e); err != nil {
		panic(fmt.Sprintf("consensus: entry %d does not decode: %v", l.Index, err))
	}
	if e.Version == 0 || e.Version > appliesUpTo() {
		panic(fmt.Sprintf("consensus: entry %d has format version %d; this binary applies up to %d", l.Index, e.Version, appliesUpTo()))
	}
	which := e.ProtoReflect().WhichOneof(commandOneof)
	if which == nil {
		panic(fmt.Sprintf("consensus: entry %d carries no command this binary knows", l.Index))
	}
	apply, ok := commands[which.Name()]
	if !ok {
		panic(fmt.Sprintf("consensus: entry %d: no apply function for %s", l.Index, which.Name()))
	}

	b := db.NewIndexedBatch()
	defer func() { b.Close() }()
	// Events are derived before the entry applies (they name what a tag
	// pointed at before) and kept only if it applies.
	var events []*pb.Event
	if webhookCommands[which.Name()] {
		f.webhooksKnown = false // this entry may add or delete one
	} else {
		var err error
		if !f.webhooksKnown {
			f.webhooks, err = anyWebhook(b)
			f.webhooksKnown = err == nil
		}
		if err == nil && f.webhooks {
			events, err = eventsOf(b, l.Index, e)
		}
		if err != nil {
			panic(fmt.Sprintf("consensus: events of entry %d: %v", l.Index, err))
		}
	}
	// The entry's own index, readable while it applies (garbage collection
	// stamps a removal with it, lifecycle.go), and the applied index once
	// the batch commits. A batch replaced below sets it again.
	setApplied := func() {
		if err := b.Set(key(tableApplied), encodeUint64s(l.Index, l.Term), nil); err != nil {
			panic(err)
		}
	}
	setApplied()
	result := apply(b, e)
	var kept keptRejection
	if errors.As(result, &kept) {
		// Refused, but a fresh batch records what must not be lost (see
		// keptRejection).
		b.Close()
		b = db.NewIndexedBatch()
		setApplied()
		if err := kept.keep(b); err != nil {
			panic(fmt.Sprintf("consensus: apply entry %d: %v", l.Index, err))
		}
		result = kept.refused
	} else if result != nil {
		var rejected *pb.Error
		if !errors.As(result, &rejected) {
			// A storage failure, not a business answer: other replicas applied
			// this entry, so carrying on would diverge from them.
			panic(fmt.Sprintf("consensus: apply entry %d: %v", l.Index, result))
		}
		// Rejected: keep nothing but the applied index.
		b.Close()
		b = db.NewBatch()
		setApplied()
	} else {
		if accessCommands[which.Name()] {
			if err := b.Set(key(tableAccessMeta, "version"), encodeUint64s(l.Index), nil); err != nil {
				panic(err)
			}
		}
		if err := noteLogFormat(b, e.Version); err != nil {
			panic(fmt.Sprintf("consensus: apply entry %d: %v", l.Index, err))
		}
		if err := recordEvents(b, events); err != nil {
			panic(fmt.Sprintf("consensus: events of entry %d: %v", l.Index, err))
		}
		// Who made the change is written with it: the audit log and the
		// state cannot disagree.
		if e.Actor != nil && !unaudited[which.Name()] {
			if err := writeAudit(b, l.Index, e, which); err != nil {
				panic(fmt.Sprintf("consensus: audit entry %d: %v", l.Index, err))
			}
		}
	}
	// The Raft log is synced; a crash that loses this unsynced batch replays
	// the entry. Snapshot() syncs before the log behind it is compacted.
	if err := b.Commit(pebble.NoSync); err != nil {
		panic(fmt.Sprintf("consensus: commit entry %d: %v", l.Index, err))
	}
	if result == nil && accessCommands[which.Name()] {
		f.store.accessChanged(l.Index)
	}
	if f.onApplied != nil {
		f.onApplied(l.Index)
	}
	return result
}

// Snapshot captures the store at the current applied index.
func (f *fsm) Snapshot() (raft.FSMSnapshot, error) {
	return f.store.snapshot()
}

// Restore replaces the store's contents with a snapshot stream.
func (f *fsm) Restore(r io.ReadCloser) error {
	defer r.Close()
	f.webhooksKnown = false
	if err := f.store.restore(r); err != nil {
		return err
	}
	if f.onApplied != nil {
		index, _, err := f.store.AppliedIndex()
		if err != nil {
			return err
		}
		f.onApplied(index)
	}
	return nil
}

func ensureRepo(b *pebble.Batch, repo string, now int64) error {
	ok, err := has(b, key(tableRepo, repo))
	if err != nil || ok {
		return err
	}
	if err := chargeRepository(b, repo, 1); err != nil {
		return err
	}
	return b.Set(key(tableRepo, repo), encodeUint64s(uint64(now)), nil)
}

func setProto(b *pebble.Batch, k []byte, m proto.Message) error {
	v, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		return err
	}
	return b.Set(k, v, nil)
}

func applyPutManifest(b *pebble.Batch, e *pb.LogEntry) error {
	c := e.GetPutManifest()
	repo := c.Repository
	if len(c.Tags) > 0 && (c.IfMatch != "" || c.IfNoneMatch) {
		if len(c.Tags) != 1 {
			return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "a conditional tag update names exactly one tag")
		}
		current, exists, err := get(b, key(tableTag, repo, c.Tags[0]))
		if err != nil {
			return err
		}
		if c.IfNoneMatch && exists {
			return pb.Errorf(pb.Code_CODE_PRECONDITION_FAILED, "tag %s already exists", c.Tags[0])
		}
		if c.IfMatch != "" && (!exists || (c.IfMatch != "*" && string(current) != c.IfMatch)) {
			return pb.Errorf(pb.Code_CODE_PRECONDITION_FAILED, "tag %s does not point at %s", c.Tags[0], c.IfMatch)
		}
	}
	if len(c.Tags) > 0 {
		rules, err := immutableRules(b)
		if err != nil {
			return err
		}
		for _, tag := range c.Tags {
			current, exists, err := get(b, key(tableTag, repo, tag))
			if err != nil {
				return err
			}
			if exists && string(current) != c.Digest {
				if err := refuseImmutable(rules, repo, tag, "moving it to "+c.Digest); err != nil {
					return err
				}
			}
		}
	}
	for _, d := range c.Blobs {
		ok, err := has(b, key(tableLink, repo, d))
		if err != nil {
			return err
		}
		if !ok {
			return pb.Errorf(pb.Code_CODE_MANIFEST_BLOB_UNKNOWN, "blob %s is not in %s", d, repo)
		}
	}
	for _, d := range c.Manifests {
		ok, err := has(b, key(tableManifest, repo, d))
		if err != nil {
			return err
		}
		if !ok {
			return pb.Errorf(pb.Code_CODE_MANIFEST_BLOB_UNKNOWN, "manifest %s is not in %s", d, repo)
		}
	}
	if err := ensureRepo(b, repo, e.TimeUnixNano); err != nil {
		return err
	}
	mk := key(tableManifest, repo, c.Digest)
	existing := &pb.ManifestRecord{}
	found, err := getProto(b, mk, existing)
	if err != nil {
		return err
	}
	created, blobs, children := e.TimeUnixNano, c.Blobs, c.Manifests
	if found {
		// Same digest, same content: what it references was recorded when
		// it was first put.
		created, blobs, children = existing.CreatedUnixNano, existing.Blobs, existing.Manifests
	}
	rec := &pb.ManifestRecord{
		Digest: c.Digest, MediaType: c.MediaType, Content: c.Content,
		Subject: c.Subject, ArtifactType: c.ArtifactType, Annotations: c.Annotations,
		CreatedUnixNano: created, Blobs: blobs, Manifests: children,
	}
	if err := setProto(b, mk, rec); err != nil {
		return err
	}
	if err := addReferences(b, repo, c.Digest, blobs, children); err != nil {
		return err
	}
	if c.Subject != "" {
		ref := &pb.Referrer{
			MediaType: c.MediaType, Digest: c.Digest, Size: int64(len(c.Content)),
			ArtifactType: c.ArtifactType, Annotations: c.Annotations,
		}
		if err := setProto(b, key(tableReferrer, repo, c.Subject, c.Digest), ref); err != nil {
			return err
		}
	}
	for _, tag := range c.Tags {
		if err := setTag(b, repo, tag, c.Digest, e.TimeUnixNano); err != nil {
			return err
		}
	}
	// A manifest pushed by digest alone starts (or restarts) its time as
	// untagged.
	return markIfUntagged(b, repo, c.Digest, e.TimeUnixNano)
}

// setTag points tag at digest, keeping the reverse index and the untagged
// candidates in step.
func setTag(b *pebble.Batch, repo, tag, digest string, now int64) error {
	tk := key(tableTag, repo, tag)
	old, ok, err := get(b, tk)
	if err != nil {
		return err
	}
	if ok {
		if err := b.Delete(key(tableTagIndex, repo, string(old), tag), nil); err != nil {
			return err
		}
	} else if err := chargeTags(b, repo, 1); err != nil {
		return err
	}
	if err := b.Set(tk, []byte(digest), nil); err != nil {
		return err
	}
	if err := b.Set(key(tableTagIndex, repo, digest, tag), nil, nil); err != nil {
		return err
	}
	if !ok || string(old) != digest {
		// Retention counts tags by when they were pushed here.
		if err := putTime(b, key(tableTagTime, repo, tag), now); err != nil {
			return err
		}
	}
	if err := b.Delete(key(tableUntagged, repo, digest), nil); err != nil {
		return err
	}
	if ok && string(old) != digest {
		return markIfUntagged(b, repo, string(old), now)
	}
	return nil
}

func applyDeleteManifest(b *pebble.Batch, e *pb.LogEntry) error {
	c := e.GetDeleteManifest()
	repo := c.Repository
	mk := key(tableManifest, repo, c.Digest)
	rec := &pb.ManifestRecord{}
	found, err := getProto(b, mk, rec)
	if err != nil {
		return err
	}
	if !found {
		return pb.Errorf(pb.Code_CODE_MANIFEST_UNKNOWN, "manifest %s not found in %s", c.Digest, repo)
	}
	if err := refusedWhileReferenced(b, tableChildRef, repo, c.Digest, "manifest", "index"); err != nil {
		return err
	}
	if err := refuseImmutableTagsOf(b, repo, c.Digest, "deleting its manifest"); err != nil {
		return err
	}
	return removeManifest(b, repo, rec, e.TimeUnixNano)
}

func applyDeleteTag(b *pebble.Batch, e *pb.LogEntry) error {
	c := e.GetDeleteTag()
	tk := key(tableTag, c.Repository, c.Tag)
	d, ok, err := get(b, tk)
	if err != nil {
		return err
	}
	if !ok {
		return pb.Errorf(pb.Code_CODE_MANIFEST_UNKNOWN, "tag %s not found in %s", c.Tag, c.Repository)
	}
	rules, err := immutableRules(b)
	if err != nil {
		return err
	}
	if err := refuseImmutable(rules, c.Repository, c.Tag, "deleting it"); err != nil {
		return err
	}
	if err := chargeTags(b, c.Repository, -1); err != nil {
		return err
	}
	if err := b.Delete(key(tableTagIndex, c.Repository, string(d), c.Tag), nil); err != nil {
		return err
	}
	if err := b.Delete(key(tableTagTime, c.Repository, c.Tag), nil); err != nil {
		return err
	}
	if err := b.Delete(tk, nil); err != nil {
		return err
	}
	return markIfUntagged(b, c.Repository, string(d), e.TimeUnixNano)
}

func applyLinkBlob(b *pebble.Batch, e *pb.LogEntry) error {
	c := e.GetLinkBlob()
	bk := key(tableBlob, c.Digest)
	rec := &pb.BlobRecord{}
	found, err := getProto(b, bk, rec)
	if err != nil {
		return err
	}
	if found && rec.CondemnedUnixNano != 0 {
		// Garbage collection took it: a mount finds nothing, and a new push
		// must wait until every region has removed the old copy, since
		// a removal still under way could delete the new bytes.
		if c.PlacedRegion == "" {
			return pb.Errorf(pb.Code_CODE_BLOB_UNKNOWN, "blob %s not found", c.Digest)
		}
		return pb.Errorf(pb.Code_CODE_UNAVAILABLE, "blob %s is being garbage-collected; push it again in a moment", c.Digest)
	}
	if c.PlacedRegion != "" && e.Version >= 3 {
		if err := refuseIfRemovedSince(b, c.Digest, c.WrittenAfterIndex); err != nil {
			return err
		}
	}
	if c.PlacedRegion == "" {
		// A mount: the bytes must already be somewhere, and in the source
		// repository when one is named.
		if !found {
			return pb.Errorf(pb.Code_CODE_BLOB_UNKNOWN, "blob %s not found", c.Digest)
		}
		if c.MountFrom != "" {
			ok, err := has(b, key(tableLink, c.MountFrom, c.Digest))
			if err != nil {
				return err
			}
			if !ok {
				return pb.Errorf(pb.Code_CODE_BLOB_UNKNOWN, "blob %s not found in %s", c.Digest, c.MountFrom)
			}
		}
	} else {
		if !found {
			rec = &pb.BlobRecord{Digest: c.Digest, Size: c.Size, CreatedUnixNano: e.TimeUnixNano}
		} else if rec.Size != c.Size {
			// Same digest, different size: the proposer's verification failed.
			return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "blob %s has size %d, not %d", c.Digest, rec.Size, c.Size)
		}
		if err := addPlacement(b, rec, c.PlacedRegion); err != nil {
			return err
		}
	}
	linked, err := has(b, key(tableLink, c.Repository, c.Digest))
	if err != nil {
		return err
	}
	err = ensureRepo(b, c.Repository, e.TimeUnixNano)
	if err == nil && !linked {
		err = chargeLink(b, c.Repository, c.Digest, rec.Size, 1)
	}
	if err != nil {
		var refused *pb.Error
		if c.PlacedRegion == "" || !errors.As(err, &refused) {
			return err
		}
		// A push over a quota: its bytes are in the region's store
		// already, so the record stays, unlinked, for garbage collection
		// to free them.
		return keptRejection{refused: refused, keep: func(b *pebble.Batch) error {
			if !found {
				if err := putTime(b, key(tableOrphanBlob, c.Digest), e.TimeUnixNano); err != nil {
					return err
				}
			}
			return addPlacement(b, rec, c.PlacedRegion)
		}}
	}
	if err := b.Set(key(tableLink, c.Repository, c.Digest), nil, nil); err != nil {
		return err
	}
	if err := b.Set(key(tableBlobRepos, c.Digest, c.Repository), nil, nil); err != nil {
		return err
	}
	if err := b.Delete(key(tableOrphanBlob, c.Digest), nil); err != nil {
		return err
	}
	// A (re)link starts the grace period of a blob no manifest uses yet.
	if err := markIfUnreferenced(b, c.Repository, c.Digest, e.TimeUnixNano); err != nil {
		return err
	}
	return recomputeBlob(b, c.Digest, e.TimeUnixNano)
}

// recomputeBlob refreshes one blob's Wanted rows after its links or
// placements changed.
func recomputeBlob(b *pebble.Batch, digest string, now int64) error {
	rules, err := loadRules(b)
	if err != nil {
		return err
	}
	return recomputeWanted(b, rules, digest, now)
}

func applyUnlinkBlob(b *pebble.Batch, e *pb.LogEntry) error {
	c := e.GetUnlinkBlob()
	lk := key(tableLink, c.Repository, c.Digest)
	ok, err := has(b, lk)
	if err != nil {
		return err
	}
	if !ok {
		return pb.Errorf(pb.Code_CODE_BLOB_UNKNOWN, "blob %s not found in %s", c.Digest, c.Repository)
	}
	if err := refusedWhileReferenced(b, tableBlobRef, c.Repository, c.Digest, "blob", "manifest"); err != nil {
		return err
	}
	if err := unlink(b, c.Repository, c.Digest, e.TimeUnixNano); err != nil {
		return err
	}
	return recomputeBlob(b, c.Digest, e.TimeUnixNano)
}

// applyRotateUploadKey appends a key to the ring (id one past the newest)
// and drops keys whose successor was created before the entry's retire
// time. The first key of a cluster that predates the ring becomes id 0.
func applyRotateUploadKey(b *pebble.Batch, e *pb.LogEntry) error {
	c := e.GetRotateUploadKey()
	if len(c.Key) < 32 {
		return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "upload key shorter than 32 bytes")
	}
	ring, err := uploadKeyRing(b)
	if err != nil {
		return err
	}
	next := uint32(0)
	if n := len(ring.Keys); n > 0 {
		next = ring.Keys[n-1].Id + 1
	}
	ring.Keys = retire(append(ring.Keys, &pb.UploadKey{Id: next, Key: c.Key, CreatedUnixNano: e.TimeUnixNano}), c.RetireBeforeUnixNano)
	return setProto(b, key(tableUploadKey, "ring"), ring)
}

// retire drops the keys of a ring (oldest first) whose successor was
// created before the cut-off: no token they signed or sealed is still
// valid. The newest key always stays.
func retire[K interface{ GetCreatedUnixNano() int64 }](keys []K, before int64) []K {
	kept := keys[:0]
	for i, k := range keys {
		if i == len(keys)-1 || keys[i+1].GetCreatedUnixNano() >= before {
			kept = append(kept, k)
		}
	}
	return kept
}

// uploadKeyRing reads the ring, or makes one of a cluster's first key.
func uploadKeyRing(r pebble.Reader) (*pb.UploadKeyRing, error) {
	ring := &pb.UploadKeyRing{}
	ok, err := getProto(r, key(tableUploadKey, "ring"), ring)
	if err != nil || ok {
		return ring, err
	}
	first, _, err := get(r, key(tableUploadKey))
	if err != nil || first == nil {
		return ring, err
	}
	ring.Keys = []*pb.UploadKey{{Id: 0, Key: first}}
	return ring, nil
}

func applySetUploadKey(b *pebble.Batch, e *pb.LogEntry) error {
	k := key(tableUploadKey)
	ok, err := has(b, k)
	if err != nil || ok {
		return err
	}
	if len(e.GetSetUploadKey().Key) < 32 {
		return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "upload key shorter than 32 bytes")
	}
	return b.Set(k, e.GetSetUploadKey().Key, nil)
}
