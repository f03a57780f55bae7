package consensus

import (
	"context"
	"fmt"
	"strings"
	"testing"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

func putWebhook(name, repos string) *pb.LogEntry {
	return &pb.LogEntry{Command: &pb.LogEntry_PutWebhook{PutWebhook: &pb.PutWebhook{Webhook: &pb.Webhook{
		Name: name, Url: "https://ci.example/hook", Repositories: repos, Secret: "s3cret"}}}}
}

func progress(p *pb.WebhookProgress) *pb.LogEntry {
	return &pb.LogEntry{Command: &pb.LogEntry_WebhookProgress{WebhookProgress: p}}
}

func (h *testFSM) events(index uint64, seq uint32) []*pb.Event {
	h.tb.Helper()
	evs, err := h.store.EventsAfter(context.Background(), index, seq, 1000)
	if err != nil {
		h.tb.Fatal(err)
	}
	return evs
}

func eventKinds(evs []*pb.Event) []string {
	var out []string
	for _, ev := range evs {
		out = append(out, ev.Kind+" "+EventID(ev.Index, ev.Seq))
	}
	return out
}

// Events are kept only while a webhook exists, in log order, with what a
// moved tag pointed at before; progress moves a cursor forward only, and
// events every cursor passed are dropped.
func TestEventsFollowTheLog(t *testing.T) {
	h := newTestFSM(t)
	h.mustApply(put(manifest("app", "before", "v1")))
	if evs := h.events(0, 0); len(evs) != 0 {
		t.Fatalf("events with no webhook: %v", eventKinds(evs))
	}
	h.mustApply(putWebhook("ci", "app"))
	h.reject(putWebhook("ci", "app"), pb.Errorf(pb.Code_CODE_PRECONDITION_FAILED, "webhook ci already exists (replace it with --replace)"))
	v1 := digestOf("before")
	h.mustApply(put(manifest("app", "after", "v1", "v2")))
	pushIndex := h.index
	h.mustApply(deleteTag("app", "v2"))
	h.reject(deleteTag("app", "nope"), pb.Errorf(pb.Code_CODE_MANIFEST_UNKNOWN, "")) // refused: no event
	h.mustApply(placeBlob("app", digestOf("layer"), 5, "us"))                        // the upload's own region: part of the push
	h.mustApply(&pb.LogEntry{Command: &pb.LogEntry_PlaceBlob{PlaceBlob: &pb.PlaceBlob{Digest: digestOf("layer"), Size: 5, Region: "eu"}}})

	evs := h.events(0, 0)
	want := []string{"manifest.pushed", "tag.updated", "tag.updated", "tag.deleted", "blob.placed"}
	if len(evs) != len(want) {
		t.Fatalf("events %v, want kinds %v", eventKinds(evs), want)
	}
	for i, ev := range evs {
		if ev.Kind != want[i] {
			t.Fatalf("event %d is %s, want %s (all: %v)", i, ev.Kind, want[i], eventKinds(evs))
		}
	}
	if evs[0].Index != pushIndex || evs[1].Index != pushIndex || evs[1].Seq != 1 {
		t.Fatalf("the push's events are at %s and %s, want index %d", EventID(evs[0].Index, evs[0].Seq), EventID(evs[1].Index, evs[1].Seq), pushIndex)
	}
	if evs[1].Tag != "v1" || evs[1].PreviousDigest != v1 || evs[2].Tag != "v2" || evs[2].PreviousDigest != "" {
		t.Fatalf("tag events %+v %+v: want v1 moved from %s and v2 new", evs[1], evs[2], v1)
	}
	if evs[3].PreviousDigest != digestOf("after") {
		t.Fatalf("tag.deleted names %q, want the manifest it pointed at", evs[3].PreviousDigest)
	}
	if len(evs[4].Repositories) != 1 || evs[4].Repositories[0] != "app" || evs[4].Region != "eu" {
		t.Fatalf("blob.placed %+v: want repository app, region eu", evs[4])
	}

	// A second webhook starts after the newest event.
	h.mustApply(putWebhook("audit", ""))
	cur, _ := h.store.WebhookCursor(context.Background(), "audit")
	if cur.Index != evs[4].Index {
		t.Fatalf("new webhook's cursor at %d, want %d", cur.Index, evs[4].Index)
	}
	// ci delivered the first two; audit's cursor holds the rest.
	h.mustApply(progress(&pb.WebhookProgress{Name: "ci", Index: evs[1].Index, Seq: evs[1].Seq, Delivered: 2}))
	if got := h.events(0, 0); len(got) != 3 {
		t.Fatalf("after ci's progress %d events kept, want 3 (%v)", len(got), eventKinds(got))
	}
	// A stale progress does not move the cursor back.
	h.mustApply(progress(&pb.WebhookProgress{Name: "ci", Index: evs[0].Index, Seq: 0}))
	if cur, _ := h.store.WebhookCursor(context.Background(), "ci"); cur.Index != evs[1].Index || cur.Seq != evs[1].Seq || cur.Delivered != 2 {
		t.Fatalf("cursor %+v after a stale progress", cur)
	}
	// Dead letters, replay, and their removal once delivered.
	dead := &pb.DeadLetter{Event: evs[2], Attempts: 5, LastError: "503"}
	h.mustApply(progress(&pb.WebhookProgress{Name: "ci", Index: evs[4].Index, Seq: evs[4].Seq, Dead: []*pb.DeadLetter{dead}}))
	id := EventID(evs[2].Index, evs[2].Seq)
	h.mustApply(&pb.LogEntry{Command: &pb.LogEntry_ReplayDeadLetters{ReplayDeadLetters: &pb.ReplayDeadLetters{Name: "ci", Ids: []string{id}}}})
	letters, _ := h.store.DeadLetters(context.Background(), "ci", -1)
	if len(letters) != 1 || !letters[0].Replay {
		t.Fatalf("dead letters %v, want one queued for replay", letters)
	}
	queued := func() int {
		q, err := h.store.QueuedReplays(context.Background(), "ci", 10)
		if err != nil {
			t.Fatal(err)
		}
		return len(q)
	}
	if queued() != 1 {
		t.Fatal("the replay queue does not hold the dead letter")
	}
	// A replay that fails again leaves the queue, and the letter stays.
	h.mustApply(progress(&pb.WebhookProgress{Name: "ci", Index: evs[4].Index, Seq: evs[4].Seq, FailedAgain: []*pb.DeadLetter{dead}}))
	if n, _ := h.store.DeadLetterCount(context.Background(), "ci"); queued() != 0 || n != 1 {
		t.Fatalf("after a failed replay: %d queued, %d dead letters; want 0 and 1", queued(), n)
	}
	h.mustApply(&pb.LogEntry{Command: &pb.LogEntry_ReplayDeadLetters{ReplayDeadLetters: &pb.ReplayDeadLetters{Name: "ci"}}})
	h.reject(&pb.LogEntry{Command: &pb.LogEntry_ReplayDeadLetters{ReplayDeadLetters: &pb.ReplayDeadLetters{Name: "ci", Ids: []string{"1-9"}}}}, pb.Errorf(pb.Code_CODE_NAME_UNKNOWN, ""))
	h.mustApply(progress(&pb.WebhookProgress{Name: "ci", Index: evs[4].Index, Seq: evs[4].Seq, Replayed: []string{id}}))
	if letters, _ := h.store.DeadLetters(context.Background(), "ci", -1); len(letters) != 0 || queued() != 0 {
		t.Fatalf("dead letters %v (%d queued) after the replay delivered", letters, queued())
	}
	// Deleting the last webhooks drops every event, and events stop.
	h.mustApply(&pb.LogEntry{Command: &pb.LogEntry_DeleteWebhook{DeleteWebhook: &pb.DeleteWebhook{Name: "ci"}}})
	h.mustApply(&pb.LogEntry{Command: &pb.LogEntry_DeleteWebhook{DeleteWebhook: &pb.DeleteWebhook{Name: "audit"}}})
	h.mustApply(put(manifest("app", "later", "v3")))
	if got := h.events(0, 0); len(got) != 0 {
		t.Fatalf("events with no webhook left: %v", eventKinds(got))
	}
	h.checkApplied()
}

// Dead letters beyond the progress entry's limit are dropped oldest first,
// and counted.
func TestDeadLettersAreBounded(t *testing.T) {
	h := newTestFSM(t)
	h.mustApply(putWebhook("ci", ""))
	for i := range 5 {
		h.mustApply(put(manifest("app", fmt.Sprintf("m%d", i), "v1")))
	}
	evs := h.events(0, 0)
	var dead []*pb.DeadLetter
	for _, ev := range evs {
		dead = append(dead, &pb.DeadLetter{Event: ev, Attempts: 1, LastError: "down"})
	}
	last := evs[len(evs)-1]
	h.mustApply(progress(&pb.WebhookProgress{Name: "ci", Index: last.Index, Seq: last.Seq, Dead: dead, MaxDeadLetters: 3}))
	letters, _ := h.store.DeadLetters(context.Background(), "ci", -1)
	if len(letters) != 3 {
		t.Fatalf("%d dead letters kept, want 3", len(letters))
	}
	if first := letters[0].Event; first.Index != evs[len(evs)-3].Index || first.Seq != evs[len(evs)-3].Seq {
		t.Fatalf("oldest kept dead letter is %s, want %s: the oldest go first", EventID(first.Index, first.Seq), EventID(evs[len(evs)-3].Index, evs[len(evs)-3].Seq))
	}
	if cur, _ := h.store.WebhookCursor(context.Background(), "ci"); cur.DroppedDeadLetters != int64(len(evs)-3) {
		t.Fatalf("cursor counts %d dropped, want %d", cur.DroppedDeadLetters, len(evs)-3)
	}
	if got := h.events(0, 0); len(got) != 0 {
		t.Fatalf("events %v kept past every cursor", eventKinds(got))
	}
}

// The audit record of a webhook change names the receiver's scheme and
// host only: a token in the URL's path or query, like the secret, stays
// out of the audit log.
func TestWebhookAuditLeavesOutSecrets(t *testing.T) {
	e := &pb.LogEntry{Command: &pb.LogEntry_PutWebhook{PutWebhook: &pb.PutWebhook{Webhook: &pb.Webhook{
		Name: "chat", Url: "https://hooks.example/services/T0K3N?key=abc", Secret: "s3cret-s3cret-s3cret"}}}}
	d := auditDetail(e)
	for _, leak := range []string{"T0K3N", "key=abc", "s3cret"} {
		if strings.Contains(d, leak) {
			t.Fatalf("audit detail %q contains %q", d, leak)
		}
	}
	if !strings.Contains(d, "https://hooks.example") || !strings.Contains(d, "webhook=chat") {
		t.Fatalf("audit detail %q does not name the webhook and its host", d)
	}
}
