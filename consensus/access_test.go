package consensus

import (
	"context"
	"fmt"
	"testing"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// Access changes move the access version, deleting a user takes its
// grants and team memberships, and the audit record of each change with an
// actor is written by the change's own entry; a rejected change writes
// none. TrimAudit drops what is older than its cut-off, on every replica
// alike.
func TestAccessStateAndAudit(t *testing.T) {
	h := newTestFSM(t)
	ctx := context.Background()
	alice := &pb.Actor{Principal: "user:admin", Address: "192.0.2.1:5", Via: "n1"}
	must := func(e *pb.LogEntry) {
		t.Helper()
		if err := h.apply(e); err != nil {
			t.Fatalf("apply %v: %v", e, err)
		}
	}
	must(&pb.LogEntry{Actor: alice, Command: &pb.LogEntry_PutUser{PutUser: &pb.PutUser{User: &pb.User{Name: "bob", PasswordHash: []byte("h")}}}})
	must(&pb.LogEntry{Actor: alice, Command: &pb.LogEntry_PutTeam{PutTeam: &pb.PutTeam{Team: &pb.Team{Name: "web", Members: []string{"bob"}}}}})
	must(&pb.LogEntry{Actor: alice, Command: &pb.LogEntry_PutGrant{PutGrant: &pb.PutGrant{Grant: &pb.Grant{Subject: "user:bob", Prefix: "app", Actions: []string{"pull"}}}}})
	// A team of someone who does not exist is refused, and not audited.
	if err := h.apply(&pb.LogEntry{Actor: alice, Command: &pb.LogEntry_PutTeam{PutTeam: &pb.PutTeam{Team: &pb.Team{Name: "x", Members: []string{"ghost"}}}}}); pb.CodeOf(err) != pb.Code_CODE_NAME_UNKNOWN {
		t.Fatalf("team with an unknown member: %v", err)
	}
	// A push with an actor is audited too.
	must(&pb.LogEntry{Actor: &pb.Actor{Principal: "user:bob"}, Command: &pb.LogEntry_LinkBlob{LinkBlob: &pb.LinkBlob{
		Repository: "app", Digest: "sha256:" + sixtyFour("a"), Size: 1, PlacedRegion: "r"}}})
	v, _ := h.store.AccessVersion()
	if v != 3 {
		t.Errorf("access version %d, want 3 (the grant's index)", v)
	}
	must(&pb.LogEntry{Actor: alice, Command: &pb.LogEntry_DeleteUser{DeleteUser: &pb.DeleteUser{Name: "bob"}}})
	st, err := h.store.AccessState(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Users) != 0 || len(st.Grants) != 0 || len(st.Teams) != 1 || len(st.Teams[0].Members) != 0 || st.Version != 6 {
		t.Errorf("after deleting bob: %v", st)
	}
	recs, err := h.store.Audit(ctx, AuditFilter{})
	if err != nil {
		t.Fatal(err)
	}
	var actions []string
	for _, r := range recs {
		actions = append(actions, r.Action)
	}
	want := []string{"put_user", "put_team", "put_grant", "link_blob", "delete_user"}
	if len(recs) != len(want) {
		t.Fatalf("audit actions %v, want %v", actions, want)
	}
	for i, r := range recs {
		if r.Action != want[i] {
			t.Errorf("record %d: %s, want %s", i, r.Action, want[i])
		}
	}
	if r := recs[3]; r.Repository != "app" || r.Actor.Principal != "user:bob" || r.Index != 5 {
		t.Errorf("push record %v", r)
	}
	if r := recs[0]; r.Actor.Address != "192.0.2.1:5" || r.Actor.Via != "n1" || r.Detail != "user=bob" {
		t.Errorf("put_user record %v", r)
	}
	// Filters: by principal (bare name), by repository.
	if got, _ := h.store.Audit(ctx, AuditFilter{Principal: "bob"}); len(got) != 1 {
		t.Errorf("principal filter: %v", got)
	}
	if got, _ := h.store.Audit(ctx, AuditFilter{Repository: "app"}); len(got) != 1 {
		t.Errorf("repository filter: %v", got)
	}
	if got, _ := h.store.Audit(ctx, AuditFilter{Limit: 2}); len(got) != 2 || got[1].Action != "delete_user" {
		t.Errorf("limit keeps the newest: %v", got)
	}
	// Trim everything before the push (entry 5's time is 5 ms).
	must(&pb.LogEntry{Command: &pb.LogEntry_TrimAudit{TrimAudit: &pb.TrimAudit{BeforeUnixNano: 5_000_000}}})
	recs, _ = h.store.Audit(ctx, AuditFilter{})
	if len(recs) != 2 || recs[0].Action != "link_blob" {
		t.Errorf("after the trim: %v", recs)
	}
}

func sixtyFour(c string) string {
	s := ""
	for len(s) < 64 {
		s += c
	}
	return s
}

// Deletes cascade by exact name (bob's grants go, bobby's stay; a team's
// grants go with it), the first admin is created once, and the token key
// ring keeps the newest key and those still needed.
func TestAccessCascadesAndBootstrap(t *testing.T) {
	h := newTestFSM(t)
	ctx := context.Background()
	for _, name := range []string{"bob", "bobby"} {
		if err := h.apply(&pb.LogEntry{Command: &pb.LogEntry_PutUser{PutUser: &pb.PutUser{User: &pb.User{Name: name, PasswordHash: []byte("h")}}}}); err != nil {
			t.Fatal(err)
		}
		if err := h.apply(&pb.LogEntry{Command: &pb.LogEntry_PutGrant{PutGrant: &pb.PutGrant{Grant: &pb.Grant{Subject: "user:" + name, Prefix: "app", Actions: []string{"pull"}}}}}); err != nil {
			t.Fatal(err)
		}
	}
	h.apply(&pb.LogEntry{Command: &pb.LogEntry_PutTeam{PutTeam: &pb.PutTeam{Team: &pb.Team{Name: "web", Members: []string{"bobby"}}}}})
	h.apply(&pb.LogEntry{Command: &pb.LogEntry_PutGrant{PutGrant: &pb.PutGrant{Grant: &pb.Grant{Subject: "team:web", Prefix: "web", Actions: []string{"push"}}}}})
	h.apply(&pb.LogEntry{Command: &pb.LogEntry_DeleteUser{DeleteUser: &pb.DeleteUser{Name: "bob"}}})
	h.apply(&pb.LogEntry{Command: &pb.LogEntry_DeleteTeam{DeleteTeam: &pb.DeleteTeam{Name: "web"}}})
	st, _ := h.store.AccessState(ctx)
	if len(st.Grants) != 1 || st.Grants[0].Subject != "user:bobby" {
		t.Errorf("grants after deleting bob and team web: %v", st.Grants)
	}
	// The first admin, once.
	boot := func(name string) error {
		return h.apply(&pb.LogEntry{Command: &pb.LogEntry_PutUser{PutUser: &pb.PutUser{Bootstrap: true, User: &pb.User{Name: name, PasswordHash: []byte("h")}}}})
	}
	if err := boot("admin"); err != nil {
		t.Fatal(err)
	}
	if err := boot("admin2"); pb.CodeOf(err) != pb.Code_CODE_DENIED {
		t.Errorf("a second bootstrap: %v, want DENIED", err)
	}
	if ok, _ := h.store.AccessBootstrapped(); !ok {
		t.Error("bootstrap not recorded")
	}
	st, _ = h.store.AccessState(ctx)
	if len(st.Users) != 2 || !hasGrant(st, "user:admin", "", "admin") {
		t.Errorf("after bootstrap: users %v grants %v", st.Users, st.Grants)
	}
	// Keys at 1, 2 and 3 s; retiring before 2.5 s drops the first (its
	// successor came at 2 s) and keeps the second (replaced at 3 s).
	for i, retire := range []int64{0, 0, 2_500_000_000} {
		e := &pb.LogEntry{TimeUnixNano: int64(i+1) * 1_000_000_000, Command: &pb.LogEntry_RotateTokenKey{RotateTokenKey: &pb.RotateTokenKey{
			Key: &pb.TokenKey{Id: fmt.Sprint("k", i), PrivateKey: []byte("der")}, RetireBeforeUnixNano: retire}}}
		if err := h.apply(e); err != nil {
			t.Fatal(err)
		}
	}
	st, _ = h.store.AccessState(ctx)
	var ids []string
	for _, k := range st.TokenKeys.Keys {
		ids = append(ids, k.Id)
	}
	if fmt.Sprint(ids) != "[k1 k2]" {
		t.Errorf("token keys %v, want [k1 k2]", ids)
	}
}

func hasGrant(st *pb.AccessState, subject, prefix, action string) bool {
	for _, g := range st.Grants {
		if g.Subject == subject && g.Prefix == prefix {
			for _, a := range g.Actions {
				if a == action {
					return true
				}
			}
		}
	}
	return false
}

// The access version every write checks is kept in memory: it follows
// each applied access change, stays put on a rejected one and on other
// entries, and after a restore it is the restored state's.
func TestAccessVersionFollowsAppliesAndRestores(t *testing.T) {
	h := newTestFSM(t)
	version := func() uint64 {
		t.Helper()
		v, err := h.store.AccessVersion()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	if v := version(); v != 0 {
		t.Fatalf("a new store's access version is %d, want 0", v)
	}
	putUser := func(name string) error {
		return h.apply(&pb.LogEntry{Command: &pb.LogEntry_PutUser{PutUser: &pb.PutUser{User: &pb.User{Name: name, PasswordHash: []byte("h")}}}})
	}
	if err := putUser("bob"); err != nil {
		t.Fatal(err)
	}
	if v := version(); v != 1 {
		t.Fatalf("after a user at index 1: version %d", v)
	}
	snap := snapshotOf(t, h.store) // at version 1
	if err := h.apply(&pb.LogEntry{Command: &pb.LogEntry_LinkBlob{LinkBlob: &pb.LinkBlob{
		Repository: "app", Digest: "sha256:" + sixtyFour("a"), Size: 1, PlacedRegion: "r"}}}); err != nil {
		t.Fatal(err)
	}
	if err := h.apply(&pb.LogEntry{Command: &pb.LogEntry_PutTeam{PutTeam: &pb.PutTeam{Team: &pb.Team{Name: "x", Members: []string{"ghost"}}}}}); err == nil {
		t.Fatal("a team of an unknown user was applied")
	}
	if v := version(); v != 1 {
		t.Fatalf("after a push and a rejected team: version %d, want 1", v)
	}
	if err := putUser("carol"); err != nil {
		t.Fatal(err)
	}
	if v := version(); v != 4 {
		t.Fatalf("after a user at index 4: version %d", v)
	}
	if err := restoreInto(h.store, snap); err != nil {
		t.Fatal(err)
	}
	if v := version(); v != 1 {
		t.Fatalf("after restoring a snapshot at version 1: version %d", v)
	}
}
