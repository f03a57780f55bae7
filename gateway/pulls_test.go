package gateway

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

func TestPullLogBatchesCoarsely(t *testing.T) {
	var mu sync.Mutex
	var sent []*pb.Pull
	fail := false
	commit := func(_ context.Context, cmd *pb.Command) error {
		mu.Lock()
		defer mu.Unlock()
		if fail {
			return errors.New("no leader")
		}
		sent = append(sent, cmd.GetRecordPulls().Pulls...)
		return nil
	}
	p := NewPullLog(time.Hour, commit, nil)
	now := time.Date(2026, 1, 1, 10, 5, 0, 0, time.UTC)
	p.now = func() time.Time { return now }
	for range 1000 {
		p.Pulled("app", "sha256:a")
	}
	p.Pulled("app", "sha256:b")
	if err := p.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	if len(sent) != 2 || sent[0].UnixNano != now.Truncate(time.Hour).UnixNano() {
		t.Fatalf("sent %v; want two pulls at the hour", sent)
	}
	// Within the same hour, nothing new goes out.
	now = now.Add(30 * time.Minute)
	p.Pulled("app", "sha256:a")
	p.Flush(context.Background())
	if len(sent) != 2 {
		t.Fatalf("a pull within the sent period was sent again: %v", sent)
	}
	// A failed flush keeps its pulls for the next one.
	now = now.Add(time.Hour)
	p.Pulled("app", "sha256:a")
	fail = true
	if err := p.Flush(context.Background()); err == nil {
		t.Fatal("flush reported success while commit failed")
	}
	fail = false
	p.Flush(context.Background())
	if len(sent) != 3 || sent[2].UnixNano != now.Truncate(time.Hour).UnixNano() {
		t.Fatalf("after a failed flush, sent %v; want the pull retried", sent)
	}
}
