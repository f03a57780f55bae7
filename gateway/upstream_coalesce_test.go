package gateway

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// fakeReads is a node whose reads block until released, and answer with
// the state's version at the moment the read runs.
type fakeReads struct {
	version atomic.Int64
	calls   atomic.Int64
	started chan int64    // the version each read sees, when it starts
	release chan struct{} // one receive lets one read finish
}

func newFakeReads() *fakeReads {
	return &fakeReads{started: make(chan int64, 100), release: make(chan struct{})}
}

func (f *fakeReads) fetch(context.Context) (int64, error) {
	f.calls.Add(1)
	v := f.version.Load()
	f.started <- v
	<-f.release
	return v, nil
}

// Callers that arrive while a read is under way share the next read, and
// none of them gets the answer of the read that started before it came:
// a write acknowledged before they asked is visible to all of them.
func TestCoalescerNeverJoinsARunningRead(t *testing.T) {
	var shared atomic.Int64
	c := newCoalescer[int64](func() { shared.Add(1) })
	f := newFakeReads()
	ctx := context.Background()

	first := make(chan int64, 1)
	go func() {
		v, _ := c.do(ctx, "k", f.fetch)
		first <- v
	}()
	if v := <-f.started; v != 0 {
		t.Fatalf("first read saw version %d", v)
	}
	// A write is acknowledged while the first read runs; every caller
	// from now on must see it.
	f.version.Store(1)
	const late = 8
	var wg sync.WaitGroup
	got := make([]int64, late)
	for i := range late {
		wg.Go(func() {
			v, err := c.do(ctx, "k", f.fetch)
			if err != nil {
				t.Errorf("caller %d: %v", i, err)
			}
			got[i] = v
		})
	}
	waitUntil(t, func() bool { return c.waiting("k") == late })
	f.release <- struct{}{}
	if v := <-first; v != 0 {
		t.Errorf("the first caller got version %d, want 0", v)
	}
	if v := <-f.started; v != 1 {
		t.Errorf("the second read saw version %d, want 1", v)
	}
	f.release <- struct{}{}
	wg.Wait()
	for i, v := range got {
		if v != 1 {
			t.Errorf("late caller %d got version %d, from a read that began before it asked", i, v)
		}
	}
	if n := f.calls.Load(); n != 2 {
		t.Errorf("%d reads for %d callers, want 2", n, 1+late)
	}
	if n := shared.Load(); n != late {
		t.Errorf("shared counted %d, want %d", n, late)
	}
	if n := c.keys(); n != 0 {
		t.Errorf("%d keys left after every read ended", n)
	}
}

// Different keys never share a read; a caller whose context ends leaves
// with an unavailable error while the read it waited for still answers
// the others.
func TestCoalescerKeysAndCancellation(t *testing.T) {
	c := newCoalescer[int64](func() {})
	f := newFakeReads()
	ctx := context.Background()
	done := make(chan int64, 3)
	go func() { v, _ := c.do(ctx, "a", f.fetch); done <- v }()
	go func() { v, _ := c.do(ctx, "b", f.fetch); done <- v }()
	<-f.started
	<-f.started // both keys read at once

	// One read of "a" is under way, so these two wait for the next.
	cctx, cancel := context.WithCancel(ctx)
	left := make(chan error, 1)
	go func() { _, err := c.do(cctx, "a", f.fetch); left <- err }()
	go func() { v, _ := c.do(ctx, "a", f.fetch); done <- v }()
	waitUntil(t, func() bool { return c.waiting("a") == 2 })
	cancel()
	if err := <-left; !errors.Is(err, pb.ErrUnavailable) || !errors.Is(err, context.Canceled) {
		t.Errorf("a caller whose context ended: %v, want unavailable and canceled", err)
	}
	f.release <- struct{}{}
	f.release <- struct{}{}
	<-f.started // the second round of a
	f.release <- struct{}{}
	for range 3 {
		select {
		case <-done:
		case <-time.After(time.Minute):
			t.Fatal("a caller never got its answer")
		}
	}
	if n := f.calls.Load(); n != 3 {
		t.Errorf("%d reads, want 3 (a, b, and the second round of a)", n)
	}
}

func waitUntil(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within a minute")
		}
		time.Sleep(time.Millisecond)
	}
}

// waiting is how many callers wait for the next round of key.
func (c *coalescer[T]) waiting(key string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if f := c.flight[key]; f != nil && f.next != nil {
		return f.next.waiters
	}
	return 0
}

func (c *coalescer[T]) keys() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.flight)
}
