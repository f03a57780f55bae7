package consensus

import (
	"context"
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
