package membership

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/memberlist"
)

const (
	joinBackoffMin = 100 * time.Millisecond
	joinBackoffMax = 5 * time.Second
)

// joinAttempt collects what memberlist's callbacks report during one join
// attempt. The callbacks cannot tell our join from a concurrent inbound one,
// so a refusal only counts when no seed accepted us.
type joinAttempt struct {
	seeds     []string
	refusal   error  // first refusal by NotifyMerge
	duplicate string // address of an alive member that holds our ID
}

// Join contacts the seeds (host:port; the port defaults to DefaultPort) and
// merges this member into their cluster. Seeds equal to this member's own
// address are skipped. Until a seed other than this member answers, it
// retries with exponential backoff (100ms to 5s, jittered) and returns, once
// ctx ends, ctx's error wrapped with the last failure.
//
// It returns at once, without retrying, an error wrapping ErrClusterMismatch
// or ErrIncompatibleVersion when the seed's cluster has another cluster id or
// protocol version (both sides check, so it does not matter which refuses).
// While the cluster considers another process with this member's ID alive,
// Join keeps retrying and its final error wraps ErrDuplicateID.
//
// memberlist cannot cancel an attempt in flight: when ctx ends during one,
// Join returns at once and the attempt finishes in the background within
// Timings.TCPTimeout per seed, possibly joining after all.
func (m *Membership) Join(ctx context.Context, seeds []string) error {
	m.mu.Lock()
	p, list, self := m.phase, m.list, m.addr
	m.mu.Unlock()
	switch p {
	case phaseClosed:
		return ErrClosed
	case phaseNew:
		return errors.New("membership: Join before Start")
	}
	seeds = normalizeSeeds(seeds, self)
	if len(seeds) == 0 {
		return errors.New("membership: join: no seed address other than this member's own")
	}

	backoff := joinBackoffMin
	var last error
	for attempt := 1; ; attempt++ {
		err := m.joinOnce(ctx, list, seeds)
		m.mu.Lock()
		// Interrupted by ctx, an attempt counts as the one before it.
		m.refusedAsDup = errors.Is(err, ErrDuplicateID) ||
			(err != nil && ctx.Err() != nil && errors.Is(last, ErrDuplicateID))
		m.mu.Unlock()
		switch {
		case err == nil:
			m.log.Info("joined the cluster", "seeds", seeds, "attempts", attempt, "alive_members", list.NumMembers())
			return nil
		case errors.Is(err, ErrClosed):
			return ErrClosed
		case errors.Is(err, ErrClusterMismatch), errors.Is(err, ErrIncompatibleVersion):
			m.log.Error("join refused", "seeds", seeds, "err", err)
			return fmt.Errorf("membership: join refused: %w", err)
		}
		if ctxErr := ctx.Err(); ctxErr != nil {
			if !errors.Is(err, ctxErr) {
				last = err
			}
			return joinGaveUp(seeds, attempt, ctxErr, last)
		}
		last = err
		wait := backoff/2 + rand.N(backoff/2+1)
		backoff = min(2*backoff, joinBackoffMax)
		m.log.Warn("join attempt failed; retrying", "seeds", seeds, "attempt", attempt, "retry_in", wait, "err", err)
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return joinGaveUp(seeds, attempt, ctx.Err(), last)
		case <-m.closing:
			t.Stop()
			return ErrClosed
		}
	}
}

func joinGaveUp(seeds []string, attempts int, ctxErr, last error) error {
	if last == nil {
		return fmt.Errorf("membership: join %s: gave up after %d attempts: %w", strings.Join(seeds, ","), attempts, ctxErr)
	}
	return fmt.Errorf("membership: join %s: gave up after %d attempts: %w; last failure: %w", strings.Join(seeds, ","), attempts, ctxErr, last)
}

// joinOnce makes one memberlist join through all seeds.
func (m *Membership) joinOnce(ctx context.Context, list *memberlist.Memberlist, seeds []string) error {
	a := &joinAttempt{seeds: seeds}
	m.mu.Lock()
	m.attempt = a
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		if m.attempt == a {
			m.attempt = nil
		}
		m.mu.Unlock()
	}()

	type result struct {
		n   int
		err error
	}
	done := make(chan result, 1)
	go func() {
		n, err := list.Join(seeds)
		done <- result{n, err}
	}()
	var r result
	select {
	case r = <-done:
	case <-ctx.Done():
		return ctx.Err()
	case <-m.closing:
		return ErrClosed
	}

	m.mu.Lock()
	refusal, dup := a.refusal, a.duplicate
	m.mu.Unlock()
	switch {
	case r.n == 0 && refusal != nil:
		return refusal
	case r.n == 0:
		return r.err
	case dup != "":
		return fmt.Errorf("%w: member %q at %s is alive in the cluster", ErrDuplicateID, m.cfg.Meta.ID, dup)
	case list.NumMembers() < 2:
		return errors.New("no member other than this one was reached")
	}
	if refusal != nil {
		m.log.Warn("joined, but refused the cluster of another seed", "err", refusal)
	}
	return nil
}

// normalizeSeeds trims and de-duplicates seeds, adds DefaultPort where the
// port is missing, and drops this member's own address.
func normalizeSeeds(seeds []string, self string) []string {
	var out []string
	for _, s := range seeds {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(s); err != nil {
			s = net.JoinHostPort(strings.Trim(s, "[]"), strconv.Itoa(DefaultPort))
		}
		if s != self && !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	return out
}
