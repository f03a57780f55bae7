package consensus

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

// memSink is an in-memory raft.SnapshotSink. When gate is set, the first
// Write signals started and then waits for gate to close.
type memSink struct {
	buf       bytes.Buffer
	closed    bool
	cancelled bool
	failAfter int // fail writes once this many bytes were written; 0: never

	gate    chan struct{}
	started chan struct{}
	once    sync.Once
}

func (s *memSink) Write(p []byte) (int, error) {
	if s.gate != nil {
		s.once.Do(func() { close(s.started) })
		<-s.gate
	}
	if s.failAfter > 0 && s.buf.Len()+len(p) > s.failAfter {
		return 0, errors.New("disk full")
	}
	return s.buf.Write(p)
}

func (s *memSink) ID() string    { return "mem" }
func (s *memSink) Cancel() error { s.cancelled = true; return nil }
func (s *memSink) Close() error  { s.closed = true; return nil }

// snapshotOf streams a snapshot of s, as Raft's snapshot goroutine does.
func snapshotOf(t *testing.T, s *Store) []byte {
	t.Helper()
	ss, err := (&fsm{store: s, logger: testLogger()}).Snapshot()
	if err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	defer ss.Release()
	sink := &memSink{}
	if err := ss.Persist(sink); err != nil {
		t.Fatalf("Persist: %v", err)
	}
	if !sink.closed || sink.cancelled {
		t.Fatalf("after a good Persist the sink is closed=%v cancelled=%v", sink.closed, sink.cancelled)
	}
	return sink.buf.Bytes()
}

// restoreInto restores snap through the fsm and reports whether the reader
// was closed.
func restoreInto(s *Store, snap []byte) error {
	rc := &closeRecorder{Reader: bytes.NewReader(snap)}
	err := (&fsm{store: s, logger: testLogger()}).Restore(rc)
	if !rc.closed {
		return errors.New("Restore did not close its reader")
	}
	return err
}

type closeRecorder struct {
	io.Reader
	closed bool
}

func (c *closeRecorder) Close() error { c.closed = true; return nil }

func storeDigest(t *testing.T, s *Store) ([]byte, uint64) {
	t.Helper()
	sum, idx, err := s.Digest()
	if err != nil {
		t.Fatalf("Digest: %v", err)
	}
	return sum, idx
}

func TestSnapshotRoundTrip(t *testing.T) {
	src := newTestFSM(t)
	populate(src, 400)
	snap := snapshotOf(t, src.store)

	dst := newTestFSM(t)
	// The target has state of its own that the restore must discard.
	dst.mustApply(put(manifest("only/here", "local", "mine")))
	dst.mustApply(setUploadKey(bytes.Repeat([]byte{1}, 32)))
	if err := restoreInto(dst.store, snap); err != nil {
		t.Fatalf("Restore: %v", err)
	}

	wantSum, wantIdx := storeDigest(t, src.store)
	gotSum, gotIdx := storeDigest(t, dst.store)
	if !bytes.Equal(gotSum, wantSum) || gotIdx != wantIdx {
		t.Fatalf("restored store differs: %x@%d, want %x@%d", gotSum, gotIdx, wantSum, wantIdx)
	}
	srcIdx, srcTerm, _ := src.store.AppliedIndex()
	if idx, term, _ := dst.store.AppliedIndex(); idx != srcIdx || term != srcTerm {
		t.Fatalf("applied index = %d/%d, want %d/%d", idx, term, srcIdx, srcTerm)
	}

	ctx := context.Background()
	if ok, _ := dst.store.RepositoryExists(ctx, "only/here"); ok {
		t.Fatal("the restore kept a repository that is not in the snapshot")
	}
	for _, repo := range []string{"org0/app", "org3/app", "mirror/all"} {
		want, err := src.store.Tags(ctx, repo, "", -1)
		if err != nil {
			t.Fatal(err)
		}
		got, err := dst.store.Tags(ctx, repo, "", -1)
		if err != nil || !slices.Equal(got, want) {
			t.Fatalf("Tags(%s) = %q, %v; want %q", repo, got, err, want)
		}
	}
	d, err := dst.store.Tag(ctx, "org2/app", "latest")
	if err != nil {
		t.Fatal(err)
	}
	if m, err := dst.store.Manifest(ctx, "org2/app", d); err != nil || m.Digest != d {
		t.Fatalf("Manifest(org2/app@latest) = %v, %v", m, err)
	}
	k, _ := dst.store.UploadKey(ctx)
	if !bytes.Equal(k, bytes.Repeat([]byte{0x42}, 32)) {
		t.Fatalf("upload key = %x, want the snapshot's", k)
	}
	refs, err := dst.store.Referrers(ctx, "org4/app", digestOf(`{"layer":3}`))
	if err != nil || len(refs) != 1 {
		t.Fatalf("referrers = %v, %v", refs, err)
	}
	b, err := dst.store.LinkedBlob(ctx, "org0/app", digestOf("layer-0"))
	if err != nil || !slices.Equal(b.Regions, []string{"eu", "us"}) {
		t.Fatalf("LinkedBlob = %v, %v", b, err)
	}

	// The restored store keeps applying from where the snapshot ended, and a
	// replay of the entries it covers is skipped.
	dst.index = wantIdx
	dst.logs = append(dst.logs, src.logs...)
	for _, l := range src.logs[len(src.logs)-5:] {
		if res := dst.fsm.Apply(l); res != nil {
			t.Fatalf("replayed entry %d: %v", l.Index, res)
		}
	}
	dst.mustApply(put(manifest("after/restore", "m", "t")))
	dst.checkApplied()

	// A snapshot of the restored store restores to the same thing again.
	third := newTestFSM(t)
	if err := restoreInto(third.store, snapshotOf(t, dst.store)); err != nil {
		t.Fatal(err)
	}
	a, _ := storeDigest(t, dst.store)
	if c, _ := storeDigest(t, third.store); !bytes.Equal(a, c) {
		t.Fatal("a snapshot of a restored store does not round-trip")
	}
}

func TestSnapshotOfEmptyStore(t *testing.T) {
	src := newTestFSM(t)
	dst := newTestFSM(t)
	populate(dst, 5)
	if err := restoreInto(dst.store, snapshotOf(t, src.store)); err != nil {
		t.Fatal(err)
	}
	want, _ := storeDigest(t, src.store)
	got, idx := storeDigest(t, dst.store)
	if !bytes.Equal(got, want) || idx != 0 {
		t.Fatalf("restoring an empty snapshot left %x@%d", got, idx)
	}
	repos, err := dst.store.Repositories(context.Background(), "", -1)
	if err != nil || len(repos) != 0 {
		t.Fatalf("repositories after restoring an empty snapshot: %q, %v", repos, err)
	}
}

func TestSnapshotPersistFailureCancelsSink(t *testing.T) {
	src := newTestFSM(t)
	populate(src, 50)
	ss, err := src.fsm.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	defer ss.Release()
	sink := &memSink{failAfter: 100}
	if err := ss.Persist(sink); err == nil {
		t.Fatal("Persist into a failing sink succeeded")
	}
	if !sink.cancelled || sink.closed {
		t.Fatalf("after a failed Persist the sink is cancelled=%v closed=%v; want cancelled only", sink.cancelled, sink.closed)
	}
}

// TestSnapshotIsPointInTime checks that entries applied after Snapshot()
// returns do not leak into the stream.
func TestSnapshotIsPointInTime(t *testing.T) {
	src := newTestFSM(t)
	populate(src, 20)
	want, wantIdx := storeDigest(t, src.store)
	ss, err := src.fsm.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	src.mustApply(put(manifest("late/repo", "late", "t")))
	src.mustApply(deleteTag("org0/app", "latest"))
	sink := &memSink{}
	if err := ss.Persist(sink); err != nil {
		t.Fatal(err)
	}
	ss.Release()
	dst := newTestFSM(t)
	if err := restoreInto(dst.store, sink.buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	if got, idx := storeDigest(t, dst.store); !bytes.Equal(got, want) || idx != wantIdx {
		t.Fatalf("restored %x@%d, want the state at Snapshot() %x@%d", got, idx, want, wantIdx)
	}
}

func TestRestoreRejectsCorruptStreams(t *testing.T) {
	src := newTestFSM(t)
	populate(src, 40)
	good := snapshotOf(t, src.store)

	modified := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	flip := func(i int) []byte { return modified(func(b []byte) []byte { b[i] ^= 0x5a; return b }) }
	withFrame := func(n uint64) []byte {
		b := bytes.Clone(snapshotMagic)
		b = binary.AppendUvarint(b, n)
		return append(b, bytes.Repeat([]byte{'k'}, 64)...)
	}
	type tc struct {
		name string
		data []byte
	}
	tests := []tc{
		{"empty", nil},
		{"magic only", bytes.Clone(snapshotMagic)},
		{"bad magic", flip(0)},
		{"unknown format version", flip(len(snapshotMagic) - 1)},
		{"flipped checksum byte", flip(len(good) - 1)},
		{"flipped end marker", flip(len(good) - 33)},
		{"truncated in the middle", good[:len(good)/2]},
		{"truncated before the checksum", good[:len(good)-32]},
		{"truncated checksum", good[:len(good)-1]},
		{"oversized frame", withFrame(maxSnapshotFrame + 1)},
		{"huge frame length", withFrame(1 << 62)},
		{"overflowing uvarint", append(bytes.Clone(snapshotMagic), bytes.Repeat([]byte{0xff}, 11)...)},
		{"frame longer than the stream", withFrame(1 << 20)},
		{"different payload, stale checksum", modified(func(b []byte) []byte {
			i := bytes.Index(b, []byte("org3/app"))
			b[i+3] = '4'
			return b
		})},
	}
	// Flip bytes across the whole body as well.
	for i := len(snapshotMagic); i < len(good)-33; i += max(1, len(good)/40) {
		tests = append(tests, tc{fmt.Sprintf("flipped byte %d", i), flip(i)})
	}

	dst := newTestFSM(t)
	populate(dst, 10)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before, beforeIdx := storeDigest(t, dst.store)
			err := restoreInto(dst.store, tt.data)
			if !errors.Is(err, errCorruptSnapshot) {
				t.Fatalf("Restore = %v, want errCorruptSnapshot", err)
			}
			if after, idx := storeDigest(t, dst.store); !bytes.Equal(after, before) || idx != beforeIdx {
				t.Fatalf("a rejected restore changed the store (index %d → %d)", beforeIdx, idx)
			}
			if _, err := os.Stat(dst.dir + ".restore"); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("a rejected restore left %s.restore behind: %v", dst.dir, err)
			}
			// Still writable.
			dst.mustApply(put(manifest("still/works", tt.name, "t")))
		})
	}
}

// TestRestoreWhilePersisting restores over a store whose own snapshot is
// still streaming: the stream must complete with the old contents and the
// restore must wait for it, not deadlock or close the database under it.
func TestRestoreWhilePersisting(t *testing.T) {
	a := newTestFSM(t)
	populate(a, 100)
	oldSum, _ := storeDigest(t, a.store)
	b := newTestFSM(t)
	populate(b, 30)
	b.mustApply(put(manifest("only/in/b", "b", "t")))
	newSum, _ := storeDigest(t, b.store)
	fromB := snapshotOf(t, b.store)

	ss, err := a.fsm.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	sink := &memSink{gate: make(chan struct{}), started: make(chan struct{})}
	persisted := make(chan error, 1)
	go func() {
		// As Raft's snapshot goroutine: Persist, then Release.
		defer ss.Release()
		persisted <- ss.Persist(sink)
	}()
	waitClosed(t, sink.started, "Persist to start writing")

	restored := make(chan error, 1)
	go func() { restored <- restoreInto(a.store, fromB) }()
	// Wait until the restore holds (or queues for) the store's write lock,
	// i.e. it has built the new store and is about to swap it in.
	waitFor(t, 30*time.Second, "restore to reach the swap", func() bool {
		if a.store.mu.TryRLock() {
			a.store.mu.RUnlock()
			return false
		}
		return true
	})
	select {
	case err := <-restored:
		t.Fatalf("restore finished while a snapshot was still streaming: %v", err)
	default:
	}
	close(sink.gate)

	if err := waitErr(t, persisted, "Persist"); err != nil {
		t.Fatalf("Persist: %v", err)
	}
	if err := waitErr(t, restored, "Restore"); err != nil {
		t.Fatalf("Restore: %v", err)
	}
	if got, _ := storeDigest(t, a.store); !bytes.Equal(got, newSum) {
		t.Fatal("store does not hold the restored snapshot")
	}
	// The stream that raced the restore holds the old contents, intact.
	c := newTestFSM(t)
	if err := restoreInto(c.store, sink.buf.Bytes()); err != nil {
		t.Fatalf("the snapshot persisted during a restore does not restore: %v", err)
	}
	if got, _ := storeDigest(t, c.store); !bytes.Equal(got, oldSum) {
		t.Fatal("the snapshot persisted during a restore is not the pre-restore state")
	}
}

// TestRestoreWhileReading checks that readers see the old store or the new
// one, never an error or a mix, while a restore swaps them.
func TestRestoreWhileReading(t *testing.T) {
	a := newTestFSM(t)
	populate(a, 60)
	oldSum, _ := storeDigest(t, a.store)
	b := newTestFSM(t)
	populate(b, 20)
	newSum, _ := storeDigest(t, b.store)
	fromB := snapshotOf(t, b.store)

	stop := make(chan struct{})
	errs := make(chan error, 4)
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					errs <- nil
					return
				default:
				}
				sum, _, err := a.store.Digest()
				if err == nil && !bytes.Equal(sum, oldSum) && !bytes.Equal(sum, newSum) {
					err = errors.New("digest matches neither the old nor the new store")
				}
				if err == nil {
					_, err = a.store.Tags(context.Background(), "org1/app", "", -1)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	for range 3 {
		if err := restoreInto(a.store, fromB); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	for range 4 {
		if err := <-errs; err != nil {
			t.Fatalf("reader during restore: %v", err)
		}
	}
}

func TestRecoverInterruptedRestore(t *testing.T) {
	// makeStore writes a store with n entries at dir and returns its digest.
	makeStore := func(t *testing.T, dir string, n int) []byte {
		h := &testFSM{tb: t, dir: dir}
		s, err := OpenStore(dir, testLogger())
		if err != nil {
			t.Fatal(err)
		}
		h.store, h.fsm = s, &fsm{store: s, logger: testLogger()}
		populate(h, n)
		sum, _ := storeDigest(t, s)
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		return sum
	}
	junk := func(t *testing.T, dir string) {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "000001.sst"), []byte("half a store"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		name  string
		setup func(t *testing.T, dir string) (want []byte)
	}{
		{"crash between the renames: old store comes back", func(t *testing.T, dir string) []byte {
			want := makeStore(t, dir+".old", 12)
			junk(t, dir+".restore")
			return want
		}},
		{"crash after the renames: new store stays, old removed", func(t *testing.T, dir string) []byte {
			makeStore(t, dir+".old", 12)
			return makeStore(t, dir, 7)
		}},
		{"crash while building: partial store removed", func(t *testing.T, dir string) []byte {
			want := makeStore(t, dir, 9)
			junk(t, dir+".restore")
			return want
		}},
		{"crash after the renames, before the cleanup of a partial build", func(t *testing.T, dir string) []byte {
			want := makeStore(t, dir, 5)
			makeStore(t, dir+".old", 3)
			junk(t, dir+".restore")
			return want
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "state")
			want := tt.setup(t, dir)
			s := openTestStore(t, dir)
			if got, _ := storeDigest(t, s); !bytes.Equal(got, want) {
				t.Fatal("the recovered store is not the expected one")
			}
			for _, leftover := range []string{dir + ".old", dir + ".restore"} {
				if _, err := os.Stat(leftover); !errors.Is(err, os.ErrNotExist) {
					t.Fatalf("%s survived recovery: %v", filepath.Base(leftover), err)
				}
			}
		})
	}
}

// TestRestoreSurvivesReopen checks the restored store is what a restart
// finds, and that no restore directories are left behind.
func TestRestoreSurvivesReopen(t *testing.T) {
	src := newTestFSM(t)
	populate(src, 50)
	want, wantIdx := storeDigest(t, src.store)
	dst := newTestFSM(t)
	populate(dst, 10)
	if err := restoreInto(dst.store, snapshotOf(t, src.store)); err != nil {
		t.Fatal(err)
	}
	if err := dst.store.Close(); err != nil {
		t.Fatal(err)
	}
	for _, leftover := range []string{dst.dir + ".old", dst.dir + ".restore"} {
		if _, err := os.Stat(leftover); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("%s left behind by a restore: %v", filepath.Base(leftover), err)
		}
	}
	s := openTestStore(t, dst.dir)
	if got, idx := storeDigest(t, s); !bytes.Equal(got, want) || idx != wantIdx {
		t.Fatalf("after reopen: %x@%d, want %x@%d", got, idx, want, wantIdx)
	}
	if _, err := s.Tag(context.Background(), "org1/app", "latest"); err != nil {
		t.Fatal(err)
	}
}

// TestRestoreOverLeftoverOldStore: a previous restore whose final cleanup
// failed leaves dir.old beside the live store; the next restore must still
// swap, not fail halfway with the store closed.
func TestRestoreOverLeftoverOldStore(t *testing.T) {
	src := newTestFSM(t)
	populate(src, 20)
	want, _ := storeDigest(t, src.store)
	dst := newTestFSM(t)
	populate(dst, 5)
	if err := os.MkdirAll(dst.dir+".old", 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dst.dir+".old", "MANIFEST-000001"), []byte("stale"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := restoreInto(dst.store, snapshotOf(t, src.store)); err != nil {
		t.Fatalf("Restore with a leftover %s.old: %v", filepath.Base(dst.dir), err)
	}
	if got, _ := storeDigest(t, dst.store); !bytes.Equal(got, want) {
		t.Fatal("the store does not hold the restored snapshot")
	}
	dst.index = src.index
	dst.mustApply(put(manifest("after/restore", "m", "t")))
}

func waitFor(tb testing.TB, timeout time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func waitClosed(tb testing.TB, ch <-chan struct{}, what string) {
	tb.Helper()
	select {
	case <-ch:
	case <-time.After(30 * time.Second):
		tb.Fatalf("timed out waiting for %s", what)
	}
}

func waitErr(tb testing.TB, ch <-chan error, what string) error {
	tb.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(30 * time.Second):
		tb.Fatalf("%s did not finish within 30s (deadlock?)", what)
		return nil
	}
}

var _ raft.SnapshotSink = (*memSink)(nil)
