package consensus

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"net/url"
	"sort"
	"strings"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// Access control state: users, teams, robots, grants, the token signing
// key ring, and the audit log. The node validated every field before the
// entry was built; the apply functions below only check what depends on
// the state (a team member who exists, a robot to revoke).

// accessCommands are the entries that change the access state: applying
// one moves the access version to its index, which gateways poll.
var accessCommands = map[protoreflect.Name]bool{
	"put_user": true, "delete_user": true, "put_team": true, "delete_team": true,
	"put_robot": true, "revoke_robot": true, "put_grant": true, "delete_grant": true,
	"rotate_token_key": true,
}

func notFound(format string, args ...any) error {
	return pb.Errorf(pb.Code_CODE_NAME_UNKNOWN, format, args...)
}

func applyPutUser(b *pebble.Batch, e *pb.LogEntry) error {
	c := e.GetPutUser()
	u := c.GetUser()
	if u.GetName() == "" || len(u.GetPasswordHash()) == 0 {
		return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "user without a name or password hash")
	}
	if c.Bootstrap {
		done, err := has(b, key(tableAccessMeta, "bootstrapped"))
		if err != nil {
			return err
		}
		if done {
			return pb.Errorf(pb.Code_CODE_DENIED, "the cluster's first admin was already created")
		}
		if err := b.Set(key(tableAccessMeta, "bootstrapped"), nil, nil); err != nil {
			return err
		}
		// The first admin may administer everything.
		g := &pb.Grant{Subject: "user:" + u.Name, Prefix: "", Actions: []string{"pull", "push", "delete", "admin"}}
		if err := setProto(b, key(tableGrant, g.Subject, g.Prefix), g); err != nil {
			return err
		}
	}
	old := &pb.User{}
	ok, err := getProto(b, key(tableUser, u.Name), old)
	if err != nil {
		return err
	}
	stored := proto.Clone(u).(*pb.User)
	stored.UpdatedUnixNano = e.TimeUnixNano
	stored.CreatedUnixNano = e.TimeUnixNano
	if ok {
		stored.CreatedUnixNano = old.CreatedUnixNano
	}
	return setProto(b, key(tableUser, u.Name), stored)
}

func applyDeleteUser(b *pebble.Batch, e *pb.LogEntry) error {
	name := e.GetDeleteUser().GetName()
	ok, err := has(b, key(tableUser, name))
	if err != nil {
		return err
	}
	if !ok {
		return notFound("user %q does not exist", name)
	}
	if err := b.Delete(key(tableUser, name), nil); err != nil {
		return err
	}
	// Its grants go with it, and it leaves every team: a user created
	// later under the same name starts with nothing.
	if err := deleteGrantsOf(b, "user:"+name); err != nil {
		return err
	}
	lo, hi := tableBounds(tableTeam)
	it, err := b.NewIter(&pebble.IterOptions{LowerBound: lo, UpperBound: hi})
	if err != nil {
		return err
	}
	defer it.Close()
	for it.First(); it.Valid(); it.Next() {
		t := &pb.Team{}
		if err := proto.Unmarshal(it.Value(), t); err != nil {
			return err
		}
		kept := t.Members[:0]
		for _, m := range t.Members {
			if m != name {
				kept = append(kept, m)
			}
		}
		if len(kept) != len(t.Members) {
			t.Members = kept
			if err := setProto(b, bytes.Clone(it.Key()), t); err != nil {
				return err
			}
		}
	}
	return it.Error()
}

func deleteGrantsOf(b *pebble.Batch, subject string) error {
	p := prefix(tableGrant, subject)
	return b.DeleteRange(p, upperBound(p), nil)
}

func applyPutTeam(b *pebble.Batch, e *pb.LogEntry) error {
	t := e.GetPutTeam().GetTeam()
	if t.GetName() == "" {
		return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "team without a name")
	}
	for _, m := range t.Members {
		ok, err := has(b, key(tableUser, m))
		if err != nil {
			return err
		}
		if !ok {
			return notFound("team %s: user %q does not exist", t.Name, m)
		}
	}
	return setProto(b, key(tableTeam, t.Name), t)
}

func applyDeleteTeam(b *pebble.Batch, e *pb.LogEntry) error {
	name := e.GetDeleteTeam().GetName()
	ok, err := has(b, key(tableTeam, name))
	if err != nil {
		return err
	}
	if !ok {
		return notFound("team %q does not exist", name)
	}
	if err := b.Delete(key(tableTeam, name), nil); err != nil {
		return err
	}
	return deleteGrantsOf(b, "team:"+name)
}

func applyPutRobot(b *pebble.Batch, e *pb.LogEntry) error {
	r := e.GetPutRobot().GetRobot()
	if r.GetName() == "" || len(r.GetSecretHash()) == 0 {
		return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "robot without a name or secret hash")
	}
	old := &pb.Robot{}
	ok, err := getProto(b, key(tableRobot, r.Name), old)
	if err != nil {
		return err
	}
	if ok && !old.Revoked {
		return pb.Errorf(pb.Code_CODE_DENIED, "robot %q exists; revoke it first", r.Name)
	}
	stored := proto.Clone(r).(*pb.Robot)
	stored.CreatedUnixNano = e.TimeUnixNano
	stored.Revoked = false
	return setProto(b, key(tableRobot, r.Name), stored)
}

func applyRevokeRobot(b *pebble.Batch, e *pb.LogEntry) error {
	name := e.GetRevokeRobot().GetName()
	r := &pb.Robot{}
	ok, err := getProto(b, key(tableRobot, name), r)
	if err != nil {
		return err
	}
	if !ok {
		return notFound("robot %q does not exist", name)
	}
	r.Revoked = true
	return setProto(b, key(tableRobot, name), r)
}

func applyPutGrant(b *pebble.Batch, e *pb.LogEntry) error {
	g := e.GetPutGrant().GetGrant()
	if g.GetSubject() == "" || len(g.GetActions()) == 0 {
		return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "grant without a subject or actions")
	}
	kind, name, _ := strings.Cut(g.Subject, ":")
	var table byte
	switch kind {
	case "user":
		table = tableUser
	case "team":
		table = tableTeam
	}
	if table != 0 {
		ok, err := has(b, key(table, name))
		if err != nil {
			return err
		}
		if !ok {
			return notFound("%s %q does not exist", kind, name)
		}
	}
	return setProto(b, key(tableGrant, g.Subject, g.Prefix), g)
}

func applyDeleteGrant(b *pebble.Batch, e *pb.LogEntry) error {
	c := e.GetDeleteGrant()
	k := key(tableGrant, c.GetSubject(), c.GetPrefix())
	ok, err := has(b, k)
	if err != nil {
		return err
	}
	if !ok {
		return notFound("no grant to %s on %q", c.GetSubject(), c.GetPrefix())
	}
	return b.Delete(k, nil)
}

// applyRotateTokenKey adds a signing key and drops keys created before
// the retire time, except the newest before it, which may have signed
// tokens still valid.
func applyRotateTokenKey(b *pebble.Batch, e *pb.LogEntry) error {
	c := e.GetRotateTokenKey()
	if c.GetKey().GetId() == "" || len(c.GetKey().GetPrivateKey()) == 0 {
		return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "token key without an id or key")
	}
	ring := &pb.TokenKeyRing{}
	if _, err := getProto(b, key(tableAccessMeta, "token-keys"), ring); err != nil {
		return err
	}
	k := proto.Clone(c.Key).(*pb.TokenKey)
	k.CreatedUnixNano = e.TimeUnixNano
	ring.Keys = retire(append(ring.Keys, k), c.RetireBeforeUnixNano)
	return setProto(b, key(tableAccessMeta, "token-keys"), ring)
}

// applyTrimAudit drops audit records older than the cut-off. Records are
// keyed by log index, and entry times grow with it (up to leader clock
// changes), so the scan stops at the first newer record.
func applyTrimAudit(b *pebble.Batch, e *pb.LogEntry) error {
	before := e.GetTrimAudit().GetBeforeUnixNano()
	lo, hi := tableBounds(tableAudit)
	it, err := b.NewIter(&pebble.IterOptions{LowerBound: lo, UpperBound: hi})
	if err != nil {
		return err
	}
	defer it.Close()
	var last []byte
	for it.First(); it.Valid(); it.Next() {
		r := &pb.AuditRecord{}
		if err := proto.Unmarshal(it.Value(), r); err != nil {
			return err
		}
		if r.TimeUnixNano >= before {
			break
		}
		last = bytes.Clone(it.Key())
	}
	if err := it.Error(); err != nil {
		return err
	}
	if last == nil {
		return nil
	}
	return b.DeleteRange(lo, append(last, 0), nil)
}

// auditKey is the audit record of log index i.
func auditKey(i uint64) []byte {
	return key(tableAudit, string(encodeUint64s(i)))
}

// writeAudit records who made the change of entry e, at index, in the
// change's own batch.
func writeAudit(b *pebble.Batch, index uint64, e *pb.LogEntry, which protoreflect.FieldDescriptor) error {
	cmd := e.ProtoReflect().Get(which).Message()
	r := &pb.AuditRecord{
		Index:        index,
		TimeUnixNano: e.TimeUnixNano,
		Actor:        e.Actor,
		Action:       string(which.Name()),
	}
	if f := cmd.Descriptor().Fields().ByName("repository"); f != nil && f.Kind() == protoreflect.StringKind {
		r.Repository = cmd.Get(f).String()
	}
	r.Detail = auditDetail(e)
	return setProto(b, auditKey(index), r)
}

// auditDetail says what changed, in a few words. It names digests, tags,
// users and grants, never a hash or a key.
func auditDetail(e *pb.LogEntry) string {
	switch c := e.Command.(type) {
	case *pb.LogEntry_PutManifest:
		d := c.PutManifest.Digest
		if len(c.PutManifest.Tags) > 0 {
			d += " tags=" + strings.Join(c.PutManifest.Tags, ",")
		}
		return d
	case *pb.LogEntry_DeleteManifest:
		return c.DeleteManifest.Digest
	case *pb.LogEntry_DeleteTag:
		return "tag=" + c.DeleteTag.Tag
	case *pb.LogEntry_LinkBlob:
		d := c.LinkBlob.Digest
		if c.LinkBlob.MountFrom != "" {
			d += " from=" + c.LinkBlob.MountFrom
		}
		return d
	case *pb.LogEntry_UnlinkBlob:
		return c.UnlinkBlob.Digest
	case *pb.LogEntry_PlaceBlob:
		return c.PlaceBlob.Digest + " region=" + c.PlaceBlob.Region
	case *pb.LogEntry_SetImmutableRule:
		return c.SetImmutableRule.GetRule().Describe()
	case *pb.LogEntry_DeleteImmutableRule:
		return c.DeleteImmutableRule.GetRule().Describe()
	case *pb.LogEntry_SetQuota:
		q := c.SetQuota.GetQuota()
		return fmt.Sprintf("repositories=%q max_bytes=%d max_repositories=%d max_tags=%d", q.GetRepositories(), q.GetMaxBytes(), q.GetMaxRepositories(), q.GetMaxTags())
	case *pb.LogEntry_DeleteQuota:
		return fmt.Sprintf("repositories=%q", c.DeleteQuota.Repositories)
	case *pb.LogEntry_SetRetentionRule:
		r := c.SetRetentionRule.GetRule()
		return fmt.Sprintf("repositories=%q keep_tags=%d tag_pattern=%q untagged_after=%v keep_pulled_within=%v protected=%v",
			r.GetRepositories(), r.GetKeepTags(), r.GetTagPattern(), time.Duration(r.GetUntaggedAfterNanos()), time.Duration(r.GetKeepPulledWithinNanos()), r.GetProtectedTags())
	case *pb.LogEntry_DeleteRetentionRule:
		return fmt.Sprintf("repositories=%q", c.DeleteRetentionRule.Repositories)
	case *pb.LogEntry_ApplyRetention:
		var items []string
		for _, t := range c.ApplyRetention.Tags {
			items = append(items, t.Repository+":"+t.Tag)
		}
		for _, m := range c.ApplyRetention.Manifests {
			items = append(items, m.Repository+"@"+m.Digest)
		}
		const shown = 20
		more := ""
		if len(items) > shown {
			more = fmt.Sprintf(" and %d more", len(items)-shown)
			items = items[:shown]
		}
		return fmt.Sprintf("run=%s deletes %s%s (each re-checked as it applied)", c.ApplyRetention.RunId, strings.Join(items, ","), more)
	case *pb.LogEntry_SetPolicy:
		return fmt.Sprintf("prefix=%q regions=%v", c.SetPolicy.GetPolicy().GetPrefix(), c.SetPolicy.GetPolicy().GetRegions())
	case *pb.LogEntry_DeletePolicy:
		return fmt.Sprintf("prefix=%q", c.DeletePolicy.Prefix)
	case *pb.LogEntry_PutUser:
		return "user=" + c.PutUser.GetUser().GetName()
	case *pb.LogEntry_DeleteUser:
		return "user=" + c.DeleteUser.Name
	case *pb.LogEntry_PutTeam:
		return fmt.Sprintf("team=%s members=%s", c.PutTeam.GetTeam().GetName(), strings.Join(c.PutTeam.GetTeam().GetMembers(), ","))
	case *pb.LogEntry_DeleteTeam:
		return "team=" + c.DeleteTeam.Name
	case *pb.LogEntry_PutRobot:
		var scopes []string
		for _, s := range c.PutRobot.GetRobot().GetScopes() {
			scopes = append(scopes, fmt.Sprintf("%q:%s", s.Prefix, strings.Join(s.Actions, ",")))
		}
		return fmt.Sprintf("robot=%s scopes=%s", c.PutRobot.GetRobot().GetName(), strings.Join(scopes, " "))
	case *pb.LogEntry_RevokeRobot:
		return "robot=" + c.RevokeRobot.Name
	case *pb.LogEntry_PutGrant:
		g := c.PutGrant.GetGrant()
		return fmt.Sprintf("subject=%s prefix=%q actions=%s", g.Subject, g.Prefix, strings.Join(g.Actions, ","))
	case *pb.LogEntry_DeleteGrant:
		return fmt.Sprintf("subject=%s prefix=%q", c.DeleteGrant.Subject, c.DeleteGrant.Prefix)
	case *pb.LogEntry_PutWebhook:
		// Never the secret.
		w := c.PutWebhook.GetWebhook()
		// Nor the URL's path or query, which may hold a token.
		where := "(unparsable)"
		if u, err := url.Parse(w.GetUrl()); err == nil {
			where = u.Scheme + "://" + u.Host
		}
		return fmt.Sprintf("webhook=%s url=%s repositories=%q events=%s", w.GetName(), where, w.GetRepositories(), strings.Join(w.GetEvents(), ","))
	case *pb.LogEntry_DeleteWebhook:
		return "webhook=" + c.DeleteWebhook.Name
	case *pb.LogEntry_ReplayDeadLetters:
		return fmt.Sprintf("webhook=%s replay=%s", c.ReplayDeadLetters.Name, strings.Join(c.ReplayDeadLetters.Ids, ","))
	}
	return ""
}

// AccessVersion is the log index of the last access change (0: none).
func (s *Store) AccessVersion() (uint64, error) {
	s.accessMu.Lock()
	v, known, gen := s.accessVersion, s.accessKnown, s.accessGen
	s.accessMu.Unlock()
	if known {
		return v, nil
	}
	err := s.read(func(db *pebble.DB) error {
		b, ok, err := get(db, key(tableAccessMeta, "version"))
		if err == nil && ok && len(b) == 8 {
			v = binary.BigEndian.Uint64(b)
		}
		return err
	})
	if err != nil {
		return 0, err
	}
	// Cached only if no apply or restore came in between: what this read
	// found may already be older than what they recorded.
	s.accessMu.Lock()
	if s.accessGen == gen {
		s.accessVersion, s.accessKnown = v, true
	}
	s.accessMu.Unlock()
	return v, nil
}

// accessChanged records that the entry at index, which changed the access
// state, is committed to the store.
func (s *Store) accessChanged(index uint64) {
	s.accessMu.Lock()
	defer s.accessMu.Unlock()
	s.accessGen++
	s.accessVersion, s.accessKnown = index, true
}

// forgetAccessVersion makes the next AccessVersion read the store (after a
// restore replaced it).
func (s *Store) forgetAccessVersion() {
	s.accessMu.Lock()
	defer s.accessMu.Unlock()
	s.accessGen++
	s.accessKnown = false
}

// AccessState reads the whole access state at one point: identities
// (hashes included), grants and the token key ring. Cluster id is left to
// the caller.
func (s *Store) AccessState(context.Context) (*pb.AccessState, error) {
	st := &pb.AccessState{TokenKeys: &pb.TokenKeyRing{}}
	err := s.read(func(db *pebble.DB) error {
		snap := db.NewSnapshot()
		defer snap.Close()
		b, ok, err := get(snap, key(tableAccessMeta, "version"))
		if err != nil {
			return err
		}
		if ok && len(b) == 8 {
			st.Version = binary.BigEndian.Uint64(b)
		}
		if _, err := getProto(snap, key(tableAccessMeta, "token-keys"), st.TokenKeys); err != nil {
			return err
		}
		return firstError(
			scanTable(snap, tableUser, func() proto.Message { u := &pb.User{}; st.Users = append(st.Users, u); return u }),
			scanTable(snap, tableTeam, func() proto.Message { t := &pb.Team{}; st.Teams = append(st.Teams, t); return t }),
			scanTable(snap, tableRobot, func() proto.Message { r := &pb.Robot{}; st.Robots = append(st.Robots, r); return r }),
			scanTable(snap, tableGrant, func() proto.Message { g := &pb.Grant{}; st.Grants = append(st.Grants, g); return g }),
		)
	})
	if err != nil {
		return nil, err
	}
	return st, nil
}

func firstError(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// scanTable decodes every value of a table into a fresh message from next.
func scanTable(r pebble.Reader, table byte, next func() proto.Message) error {
	lo, hi := tableBounds(table)
	it, err := r.NewIter(&pebble.IterOptions{LowerBound: lo, UpperBound: hi})
	if err != nil {
		return err
	}
	defer it.Close()
	for it.First(); it.Valid(); it.Next() {
		if err := proto.Unmarshal(it.Value(), next()); err != nil {
			return err
		}
	}
	return it.Error()
}

// AuditFilter selects audit records.
type AuditFilter struct {
	Since      int64  // unix nanos; 0: from the oldest
	Repository string // exact repository, or a prefix ending in "/"
	Principal  string // "user:alice", or a bare name matching any kind
	Limit      int    // newest first when set; 0: no limit
	Oldest     bool   // with Limit: the oldest records instead
}

// Match reports whether r passes the filter.
func (f AuditFilter) Match(r *pb.AuditRecord) bool {
	if r.TimeUnixNano < f.Since {
		return false
	}
	if f.Repository != "" && r.Repository != f.Repository &&
		!(strings.HasSuffix(f.Repository, "/") && strings.HasPrefix(r.Repository, f.Repository)) {
		return false
	}
	if f.Principal != "" {
		p := r.GetActor().GetPrincipal()
		_, name, _ := strings.Cut(p, ":")
		if p != f.Principal && name != f.Principal {
			return false
		}
	}
	return true
}

// Audit returns the audit records the filter selects, oldest first; with
// a limit, the newest that many.
func (s *Store) Audit(_ context.Context, f AuditFilter) ([]*pb.AuditRecord, error) {
	var out []*pb.AuditRecord
	err := s.read(func(db *pebble.DB) error {
		lo, hi := tableBounds(tableAudit)
		it, err := db.NewIter(&pebble.IterOptions{LowerBound: lo, UpperBound: hi})
		if err != nil {
			return err
		}
		defer it.Close()
		// Newest first, so a limit stops the scan early.
		first, next := it.Last, it.Prev
		if f.Oldest {
			first, next = it.First, it.Next
		}
		for first(); it.Valid(); next() {
			r := &pb.AuditRecord{}
			if err := proto.Unmarshal(it.Value(), r); err != nil {
				return err
			}
			if r.TimeUnixNano < f.Since && !f.Oldest {
				break
			}
			if f.Match(r) {
				out = append(out, r)
				if f.Limit > 0 && len(out) >= f.Limit {
					break
				}
			}
		}
		return it.Error()
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Index < out[j].Index })
	return out, err
}

// AccessBootstrapped reports whether the cluster's first admin was created.
func (s *Store) AccessBootstrapped() (bool, error) {
	var ok bool
	err := s.read(func(db *pebble.DB) (err error) {
		ok, err = has(db, key(tableAccessMeta, "bootstrapped"))
		return err
	})
	return ok, err
}
