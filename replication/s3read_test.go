package replication

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"testing/iotest"
	"time"
)

// patternAt is the byte the test objects hold at offset off.
func patternAt(off int64) byte { return byte(off*7 + off>>8) }

func pattern(off, end int64) []byte {
	b := make([]byte, end-off)
	for i := range b {
		b[i] = patternAt(off + int64(i))
	}
	return b
}

// fakeObject serves ranged reads of a pattern object, each after a random
// delay so that parts finish out of order, and counts the reads in flight.
type fakeObject struct {
	size      int64
	inFlight  atomic.Int32
	maxFlight atomic.Int32
	mu        sync.Mutex
	fetched   []int64 // offsets read, in the order they were asked
	failAt    int64   // a read at this offset fails (-1: none)
}

var errFakeStore = errors.New("store failed")

func (o *fakeObject) fetch(ctx context.Context, off int64, p []byte) error {
	o.mu.Lock()
	o.fetched = append(o.fetched, off)
	o.mu.Unlock()
	n := o.inFlight.Add(1)
	defer o.inFlight.Add(-1)
	for m := o.maxFlight.Load(); n > m && !o.maxFlight.CompareAndSwap(m, n); m = o.maxFlight.Load() {
	}
	select {
	case <-time.After(time.Duration(rand.IntN(3000)) * time.Microsecond):
	case <-ctx.Done():
		return ctx.Err()
	}
	if off == o.failAt {
		copy(p, pattern(off, off+int64(len(p)/2))) // half a part, then the failure
		return errFakeStore
	}
	if off+int64(len(p)) > o.size {
		return io.ErrUnexpectedEOF
	}
	copy(p, pattern(off, off+int64(len(p))))
	return nil
}

func identity(err error) error { return err }

func openParts(t *testing.T, o *fakeObject, b *readBudget, off int64) *partReader {
	t.Helper()
	bufs := b.take(s3ReadAhead)
	if len(bufs) == 0 {
		t.Fatal("no read buffer free")
	}
	r := newPartReader(t.Context(), o.fetch, identity, b, bufs, off, o.size)
	if err := r.start(); err != nil {
		r.Close()
		t.Fatalf("start: %v", err)
	}
	return r
}

// TestPartReaderOrder reads objects of whole and partial parts, from
// several offsets, through Read with odd buffer sizes and through WriteTo:
// the bytes come in order although parts finish out of order, and no more
// parts are in flight than the reader has buffers.
func TestPartReaderOrder(t *testing.T) {
	const partSize = 1000
	b := newReadBudget(partSize, 8)
	for _, size := range []int64{1, 999, 1000, 1001, 4000, 10_500} {
		for _, off := range []int64{0, 1, 999, 1000, size - 1, size} {
			if off < 0 || off > size {
				continue
			}
			o := &fakeObject{size: size, failAt: -1}
			want := pattern(off, size)

			r := openParts(t, o, b, off)
			got, err := io.ReadAll(iotest.OneByteReader(io.LimitReader(r, 137)))
			if err != nil {
				t.Fatal(err)
			}
			rest, err := io.ReadAll(r) // ReadAll reads in growing buffers: not aligned with parts
			if err != nil {
				t.Fatal(err)
			}
			r.Close()
			if got = append(got, rest...); !bytes.Equal(got, want) {
				t.Fatalf("size %d offset %d: Read gave %d bytes, not the object's %d from the offset", size, off, len(got), len(want))
			}

			r = openParts(t, o, b, off)
			var buf bytes.Buffer
			n, err := r.WriteTo(&buf)
			r.Close()
			if err != nil || n != int64(len(want)) || !bytes.Equal(buf.Bytes(), want) {
				t.Fatalf("size %d offset %d: WriteTo wrote %d bytes (%v), equal %v", size, off, n, err, bytes.Equal(buf.Bytes(), want))
			}
			if m := o.maxFlight.Load(); m > s3ReadAhead {
				t.Fatalf("%d parts in flight, more than the %d buffers", m, s3ReadAhead)
			}
		}
	}
	if n := len(b.slots); n != 0 {
		t.Errorf("%d buffers still taken after every reader closed", n)
	}
}

// TestPartReaderReadAhead checks that a reader fetches the first part and
// the next before it is read from, and more as the caller consumes them.
func TestPartReaderReadAhead(t *testing.T) {
	const partSize = 100
	b := newReadBudget(partSize, 8)
	o := &fakeObject{size: 100 * partSize, failAt: -1}
	r := openParts(t, o, b, 0)
	defer r.Close()
	time.Sleep(20 * time.Millisecond)
	o.mu.Lock()
	started := len(o.fetched)
	o.mu.Unlock()
	if started != 2 {
		t.Errorf("%d parts fetched before the first Read, want 2", started)
	}
	if _, err := io.Copy(io.Discard, r); err != nil {
		t.Fatal(err)
	}
	if m := o.maxFlight.Load(); m < 2 {
		t.Errorf("at most %d part in flight while reading 100 parts: no read-ahead", m)
	}
}

// TestPartReaderErrors checks that a part that fails, or comes short,
// fails the read after exactly the bytes of the parts before it, and that
// a failing first part fails start.
func TestPartReaderErrors(t *testing.T) {
	const partSize = 1000
	b := newReadBudget(partSize, 8)
	o := &fakeObject{size: 5000, failAt: 2000}
	r := openParts(t, o, b, 0)
	got, err := io.ReadAll(r)
	if !errors.Is(err, errFakeStore) {
		t.Errorf("ReadAll: %v, want the store's error", err)
	}
	if !bytes.Equal(got, pattern(0, 2000)) {
		t.Errorf("read %d bytes before the error, want the 2000 of the parts before the failed one", len(got))
	}
	if _, err := r.Read(make([]byte, 10)); !errors.Is(err, errFakeStore) {
		t.Errorf("Read after the error: %v, want it again", err)
	}
	r.Close()

	// The link says 5000 bytes; the object has 4500: the last part is short.
	o = &fakeObject{size: 4500, failAt: -1}
	bufs := b.take(s3ReadAhead)
	r = newPartReader(t.Context(), o.fetch, identity, b, bufs, 0, 5000)
	if err := r.start(); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	n, err := r.WriteTo(&buf)
	if !errors.Is(err, io.ErrUnexpectedEOF) || n != 4000 {
		t.Errorf("WriteTo of a short object: %d bytes, %v; want 4000 and io.ErrUnexpectedEOF", n, err)
	}
	r.Close()

	o = &fakeObject{size: 5000, failAt: 1000}
	bufs = b.take(s3ReadAhead)
	r = newPartReader(t.Context(), o.fetch, func(err error) error { return errors.Join(errBlobRead, err) }, b, bufs, 1000, 5000)
	if err := r.start(); !errors.Is(err, errFakeStore) || !errors.Is(err, errBlobRead) {
		t.Errorf("start with a failing first part: %v, want the store's error wrapped by fail", err)
	}
	r.Close()
	if n := len(b.slots); n != 0 {
		t.Errorf("%d buffers still taken after every reader closed", n)
	}
}

var errBlobRead = errors.New("blob read")

// TestPartReaderClose checks that Close cancels the parts in flight, waits
// for them, returns the buffers, and wakes a Read waiting for a part.
func TestPartReaderClose(t *testing.T) {
	const partSize = 100
	b := newReadBudget(partSize, 8)
	var started, cancelled atomic.Int32
	release := make(chan struct{})
	fetch := func(ctx context.Context, off int64, p []byte) error {
		if off == 0 {
			copy(p, pattern(0, int64(len(p))))
			return nil
		}
		started.Add(1)
		select {
		case <-ctx.Done():
			cancelled.Add(1)
			return ctx.Err()
		case <-release: // never, unless Close fails to cancel
			return nil
		}
	}
	bufs := b.take(s3ReadAhead)
	r := newPartReader(t.Context(), fetch, identity, b, bufs, 0, 10*partSize)
	if err := r.start(); err != nil {
		t.Fatal(err)
	}
	readErr := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, r)
		readErr <- err
	}()
	deadline := time.Now().Add(5 * time.Second)
	for started.Load() < 2 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	closed := make(chan struct{})
	go func() {
		r.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		close(release)
		t.Fatal("Close did not return while parts were in flight")
	}
	if s, c := started.Load(), cancelled.Load(); s < 2 || c != s {
		t.Errorf("%d parts started, %d cancelled by Close; want every started part cancelled", s, c)
	}
	select {
	case err := <-readErr:
		if err == nil {
			t.Error("a read interrupted by Close ended without an error")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a Read waiting for a part did not return after Close")
	}
	if n := len(b.slots); n != 0 {
		t.Errorf("%d buffers still taken after Close", n)
	}
	r.Close() // again: no effect
}

// TestReadBudget checks that buffers are handed out up to the budget only.
func TestReadBudget(t *testing.T) {
	b := newReadBudget(10, 5)
	first := b.take(4)
	second := b.take(4)
	if len(first) != 4 || len(second) != 1 {
		t.Fatalf("took %d then %d buffers of a budget of 5", len(first), len(second))
	}
	if third := b.take(1); len(third) != 0 {
		t.Fatalf("took %d buffers from a spent budget", len(third))
	}
	b.give(first)
	if again := b.take(4); len(again) != 4 {
		t.Fatalf("took %d buffers after 4 were given back", len(again))
	} else {
		b.give(again)
	}
	b.give(second)
	if n := len(b.slots); n != 0 {
		t.Errorf("%d slots taken after every buffer was given back", n)
	}
}
