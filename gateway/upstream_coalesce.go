package gateway

import (
	"context"
	"fmt"
	"sync"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// coalescer shares one upstream read among the callers asking for the same
// key while it waits to start: a pull storm of one tag costs the node one
// call per round trip instead of one per request.
//
// A caller never joins a read that was already under way when it arrived;
// it waits for the next round, which starts when the current one ends. So
// every answer comes from a node read made after the caller began, exactly
// as if the caller had made it alone: a strong read stays linearizable, a
// local read is no older than what that node served before the request,
// and a miss is confirmed with the leader as before. (ReadIndexBatcher in
// consensus follows the same rule.)
type coalescer[T any] struct {
	mu     sync.Mutex
	flight map[string]*flight[T]
	// shared counts callers that joined a round instead of starting it.
	shared func()
}

// flight is the state of one key: whether a round runs, and the round
// that callers arriving now join.
type flight[T any] struct {
	running bool
	next    *round[T]
}

type round[T any] struct {
	fetch func(ctx context.Context) (T, error)
	done  chan struct{}
	// waiters counts the callers that joined it (not the one that
	// started it), for tests.
	waiters int
	v       T
	err     error
}

func newCoalescer[T any](shared func()) *coalescer[T] {
	return &coalescer[T]{flight: map[string]*flight[T]{}, shared: shared}
}

// do returns fetch's answer for key, from a round that starts after this
// call began (fetch itself, or another caller's equivalent fetch of the
// same key). It gives up when ctx ends, as a read does.
func (c *coalescer[T]) do(ctx context.Context, key string, fetch func(ctx context.Context) (T, error)) (T, error) {
	c.mu.Lock()
	f := c.flight[key]
	if f == nil {
		f = &flight[T]{}
		c.flight[key] = f
	}
	if f.next == nil {
		f.next = &round[T]{fetch: fetch, done: make(chan struct{})}
	}
	r := f.next
	lead := !f.running
	if lead {
		f.running, f.next = true, nil
	} else {
		r.waiters++
	}
	c.mu.Unlock()

	if lead {
		go c.run(key, f, r)
	}
	select {
	case <-r.done:
		if !lead {
			c.shared()
		}
		return r.v, r.err
	case <-ctx.Done():
		var zero T
		return zero, fmt.Errorf("%w: %w", pb.ErrUnavailable, ctx.Err())
	}
}

// run reads for r, then for the round that gathered meanwhile, until none
// did. A read is bounded by the read policy's per-attempt timeouts, not by
// any one caller's context: a caller that leaves does not fail the others.
func (c *coalescer[T]) run(key string, f *flight[T], r *round[T]) {
	for r != nil {
		r.v, r.err = r.fetch(context.Background())
		close(r.done)
		c.mu.Lock()
		r, f.next = f.next, nil
		if r == nil {
			f.running = false
			delete(c.flight, key)
		}
		c.mu.Unlock()
	}
}
