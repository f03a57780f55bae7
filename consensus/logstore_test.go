package consensus

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/hashicorp/raft"
	raftbench "github.com/hashicorp/raft/bench"
)

func openTestLogStore(tb testing.TB, dir string) *LogStore {
	tb.Helper()
	s, err := OpenLogStore(dir, slog.New(slog.DiscardHandler))
	if err != nil {
		tb.Fatalf("OpenLogStore: %v", err)
	}
	tb.Cleanup(func() { _ = s.Close() })
	return s
}

func logstoreTestLogs(from, to uint64) []*raft.Log {
	var logs []*raft.Log
	for i := from; i <= to; i++ {
		logs = append(logs, &raft.Log{
			Index:      i,
			Term:       1 + i/10,
			Type:       raft.LogCommand,
			Data:       fmt.Appendf(nil, "entry-%d", i),
			AppendedAt: time.Unix(1700000000, int64(i)),
		})
	}
	return logs
}

func assertLogEqual(t *testing.T, got, want *raft.Log) {
	t.Helper()
	if got.Index != want.Index || got.Term != want.Term || got.Type != want.Type ||
		!bytes.Equal(got.Data, want.Data) || !bytes.Equal(got.Extensions, want.Extensions) ||
		!got.AppendedAt.Equal(want.AppendedAt) {
		t.Fatalf("log mismatch:\n got  %+v\n want %+v", got, want)
	}
}

func assertLogStoreBounds(t *testing.T, s *LogStore, wantFirst, wantLast uint64) {
	t.Helper()
	first, err := s.FirstIndex()
	if err != nil {
		t.Fatalf("FirstIndex: %v", err)
	}
	last, err := s.LastIndex()
	if err != nil {
		t.Fatalf("LastIndex: %v", err)
	}
	if first != wantFirst || last != wantLast {
		t.Fatalf("FirstIndex, LastIndex = %d, %d; want %d, %d", first, last, wantFirst, wantLast)
	}
}

func TestLogStore_LogRoundTrip(t *testing.T) {
	s := openTestLogStore(t, t.TempDir())
	big := bytes.Repeat([]byte{0xab}, 1<<20)
	tests := []struct {
		name string
		log  raft.Log
	}{
		{"minimal", raft.Log{Index: 1}},
		{"all fields", raft.Log{
			Index:      2,
			Term:       7,
			Type:       raft.LogCommand,
			Data:       []byte("put manifest"),
			Extensions: []byte{0x00, 0xff, 0x10},
			AppendedAt: time.Date(2026, 3, 4, 5, 6, 7, 891011121, time.UTC),
		}},
		{"extensions only", raft.Log{Index: 3, Term: 7, Type: raft.LogNoop, Extensions: []byte("ext")}},
		{"configuration", raft.Log{Index: 4, Term: 8, Type: raft.LogConfiguration, Data: []byte{1, 2, 3}}},
		{"barrier", raft.Log{Index: 5, Term: 8, Type: raft.LogBarrier}},
		{"pre-1970 time", raft.Log{Index: 6, Term: 8, AppendedAt: time.Date(1969, 7, 20, 20, 17, 0, 5, time.UTC)}},
		{"non-UTC time", raft.Log{Index: 7, Term: 9, AppendedAt: time.Date(2026, 1, 1, 0, 0, 0, 1, time.FixedZone("x", 3600))}},
		{"large data", raft.Log{Index: 8, Term: 9, Data: big}},
		{"max index and term", raft.Log{Index: math.MaxUint64, Term: math.MaxUint64, Data: []byte("x")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := s.StoreLog(&tt.log); err != nil {
				t.Fatalf("StoreLog: %v", err)
			}
			var got raft.Log
			if err := s.GetLog(tt.log.Index, &got); err != nil {
				t.Fatalf("GetLog: %v", err)
			}
			assertLogEqual(t, &got, &tt.log)
		})
	}
}

func TestLogStore_GetLogReturnsCopies(t *testing.T) {
	s := openTestLogStore(t, t.TempDir())
	want := raft.Log{Index: 1, Data: []byte("data"), Extensions: []byte("ext")}
	if err := s.StoreLog(&want); err != nil {
		t.Fatal(err)
	}
	var got raft.Log
	if err := s.GetLog(1, &got); err != nil {
		t.Fatal(err)
	}
	// Appending to Data must not clobber Extensions, and mutating either
	// must not change what the store returns next time.
	got.Data = append(got.Data, "XXXX"...)
	got.Extensions[0] = 'E'
	var again raft.Log
	if err := s.GetLog(1, &again); err != nil {
		t.Fatal(err)
	}
	assertLogEqual(t, &again, &want)
}

func TestLogStore_StoreLogsBatch(t *testing.T) {
	s := openTestLogStore(t, t.TempDir())
	assertLogStoreBounds(t, s, 0, 0)

	logs := logstoreTestLogs(1, 200)
	if err := s.StoreLogs(logs); err != nil {
		t.Fatalf("StoreLogs: %v", err)
	}
	assertLogStoreBounds(t, s, 1, 200)
	for _, want := range logs {
		var got raft.Log
		if err := s.GetLog(want.Index, &got); err != nil {
			t.Fatalf("GetLog(%d): %v", want.Index, err)
		}
		assertLogEqual(t, &got, want)
	}
}

func TestLogStore_GetLogNotFound(t *testing.T) {
	s := openTestLogStore(t, t.TempDir())
	var l raft.Log
	if err := s.GetLog(1, &l); !errors.Is(err, raft.ErrLogNotFound) {
		t.Fatalf("GetLog on empty store: err = %v, want raft.ErrLogNotFound", err)
	}
	if err := s.StoreLogs(logstoreTestLogs(5, 6)); err != nil {
		t.Fatal(err)
	}
	for _, idx := range []uint64{0, 4, 7, math.MaxUint64} {
		if err := s.GetLog(idx, &l); !errors.Is(err, raft.ErrLogNotFound) {
			t.Fatalf("GetLog(%d): err = %v, want raft.ErrLogNotFound", idx, err)
		}
	}
}

func TestLogStore_DeleteRange(t *testing.T) {
	tests := []struct {
		name                string
		min, max            uint64
		wantFirst, wantLast uint64
	}{
		{"prefix (log compaction)", 1, 30, 31, 50},
		{"suffix (conflict truncation)", 41, 50, 1, 40},
		{"suffix to max uint64", 41, math.MaxUint64, 1, 40},
		{"middle", 10, 20, 1, 50},
		{"everything", 0, math.MaxUint64, 0, 0},
		{"nothing (min > max)", 20, 10, 1, 50},
		{"outside the log", 100, 200, 1, 50},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := openTestLogStore(t, t.TempDir())
			if err := s.StoreLogs(logstoreTestLogs(1, 50)); err != nil {
				t.Fatal(err)
			}
			if err := s.DeleteRange(tt.min, tt.max); err != nil {
				t.Fatalf("DeleteRange: %v", err)
			}
			assertLogStoreBounds(t, s, tt.wantFirst, tt.wantLast)
			for i := uint64(1); i <= 50; i++ {
				var l raft.Log
				err := s.GetLog(i, &l)
				deleted := tt.min <= tt.max && i >= tt.min && i <= tt.max
				switch {
				case deleted && !errors.Is(err, raft.ErrLogNotFound):
					t.Fatalf("GetLog(%d) after delete: err = %v, want raft.ErrLogNotFound", i, err)
				case !deleted && err != nil:
					t.Fatalf("GetLog(%d) kept entry: %v", i, err)
				}
			}
		})
	}
}

func TestLogStore_CompactThenAppend(t *testing.T) {
	// The sequence raft performs: append, compact a prefix, truncate a
	// conflicting suffix, append again with a new term.
	s := openTestLogStore(t, t.TempDir())
	if err := s.StoreLogs(logstoreTestLogs(1, 100)); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteRange(1, 60); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteRange(91, 100); err != nil {
		t.Fatal(err)
	}
	assertLogStoreBounds(t, s, 61, 90)
	replacement := &raft.Log{Index: 91, Term: 99, Data: []byte("new leader")}
	if err := s.StoreLog(replacement); err != nil {
		t.Fatal(err)
	}
	assertLogStoreBounds(t, s, 61, 91)
	var got raft.Log
	if err := s.GetLog(91, &got); err != nil {
		t.Fatal(err)
	}
	assertLogEqual(t, &got, replacement)
}

func TestLogStore_Stable(t *testing.T) {
	s := openTestLogStore(t, t.TempDir())

	t.Run("missing key", func(t *testing.T) {
		v, err := s.Get([]byte("CurrentTerm"))
		// hashicorp/raft checks the text, so assert it exactly.
		if err == nil || err.Error() != "not found" || !errors.Is(err, ErrStableKeyNotFound) {
			t.Fatalf("Get missing: v=%q err=%v, want error text %q", v, err, "not found")
		}
		n, err := s.GetUint64([]byte("CurrentTerm"))
		if n != 0 || err == nil || err.Error() != "not found" {
			t.Fatalf("GetUint64 missing = %d, %v; want 0, not found", n, err)
		}
	})

	t.Run("set get overwrite", func(t *testing.T) {
		tests := []struct {
			key, val []byte
		}{
			{[]byte("LastVoteCand"), []byte("node-a")},
			{[]byte("LastVoteCand"), []byte("node-b")}, // overwrite
			{[]byte("empty"), []byte{}},
			{[]byte{0x00}, []byte("zero key")},
			{[]byte{}, []byte("empty key")},
		}
		for _, tt := range tests {
			if err := s.Set(tt.key, tt.val); err != nil {
				t.Fatalf("Set(%q): %v", tt.key, err)
			}
			got, err := s.Get(tt.key)
			if err != nil || !bytes.Equal(got, tt.val) {
				t.Fatalf("Get(%q) = %q, %v; want %q", tt.key, got, err, tt.val)
			}
		}
	})

	t.Run("get returns a copy", func(t *testing.T) {
		if err := s.Set([]byte("k"), []byte("value")); err != nil {
			t.Fatal(err)
		}
		got, _ := s.Get([]byte("k"))
		got[0] = 'X'
		again, _ := s.Get([]byte("k"))
		if string(again) != "value" {
			t.Fatalf("stored value changed through returned slice: %q", again)
		}
	})

	t.Run("uint64", func(t *testing.T) {
		for _, v := range []uint64{0, 1, 1 << 40, math.MaxUint64} {
			if err := s.SetUint64([]byte("CurrentTerm"), v); err != nil {
				t.Fatal(err)
			}
			got, err := s.GetUint64([]byte("CurrentTerm"))
			if err != nil || got != v {
				t.Fatalf("GetUint64 = %d, %v; want %d", got, err, v)
			}
		}
	})

	t.Run("wrong width uint64 is an error", func(t *testing.T) {
		if err := s.Set([]byte("short"), []byte{1, 2, 3}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.GetUint64([]byte("short")); !errors.Is(err, ErrLogStoreCorrupt) {
			t.Fatalf("GetUint64 on 3-byte value: err = %v, want ErrLogStoreCorrupt", err)
		}
	})

	t.Run("stable keys do not touch logs", func(t *testing.T) {
		// A stable key spelled like a log key must not become a log.
		if err := s.Set(logstoreLogKey(1), []byte("v")); err != nil {
			t.Fatal(err)
		}
		assertLogStoreBounds(t, s, 0, 0)
	})
}

func TestLogStore_CommitIndex(t *testing.T) {
	dir := t.TempDir()
	s := openTestLogStore(t, dir)

	if got, err := s.GetCommitIndex(); err != nil || got != 0 {
		t.Fatalf("GetCommitIndex on new store = %d, %v; want 0, nil", got, err)
	}
	if err := s.StageCommitIndex(5); err != nil {
		t.Fatal(err)
	}
	// Staging alone persists nothing.
	if got, _ := s.GetCommitIndex(); got != 0 {
		t.Fatalf("GetCommitIndex after stage only = %d, want 0", got)
	}
	if err := s.StoreLogs(logstoreTestLogs(1, 10)); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.GetCommitIndex(); got != 5 {
		t.Fatalf("GetCommitIndex after StoreLogs = %d, want 5", got)
	}
	// A staged index above the last log is capped at LastIndex.
	if err := s.StageCommitIndex(20); err != nil {
		t.Fatal(err)
	}
	if err := s.StoreLog(logstoreTestLogs(11, 11)[0]); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.GetCommitIndex(); got != 11 {
		t.Fatalf("GetCommitIndex = %d, want 11 (capped at LastIndex)", got)
	}

	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openTestLogStore(t, dir)
	if err := s.StoreLogs(logstoreTestLogs(12, 25)); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.GetCommitIndex(); got != 20 {
		t.Fatalf("GetCommitIndex after reopen = %d, want 20", got)
	}
}

func TestLogStore_ReopenRoundTrip(t *testing.T) {
	dir := t.TempDir()
	s := openTestLogStore(t, dir)
	logs := logstoreTestLogs(1, 100)
	logs[0].Extensions = []byte("ext")
	if err := s.StoreLogs(logs); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteRange(1, 9); err != nil {
		t.Fatal(err)
	}
	if err := s.Set([]byte("LastVoteCand"), []byte("n1")); err != nil {
		t.Fatal(err)
	}
	if err := s.SetUint64([]byte("CurrentTerm"), 42); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}

	s = openTestLogStore(t, dir)
	assertLogStoreBounds(t, s, 10, 100)
	for _, want := range logs[9:] {
		var got raft.Log
		if err := s.GetLog(want.Index, &got); err != nil {
			t.Fatalf("GetLog(%d) after reopen: %v", want.Index, err)
		}
		assertLogEqual(t, &got, want)
	}
	if v, err := s.Get([]byte("LastVoteCand")); err != nil || string(v) != "n1" {
		t.Fatalf("Get after reopen = %q, %v", v, err)
	}
	if v, err := s.GetUint64([]byte("CurrentTerm")); err != nil || v != 42 {
		t.Fatalf("GetUint64 after reopen = %d, %v", v, err)
	}
}

func TestLogStore_Close(t *testing.T) {
	s := openTestLogStore(t, t.TempDir())
	if err := s.Close(); err != nil {
		t.Fatalf("first Close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	var l raft.Log
	checks := map[string]error{
		"StoreLog":    s.StoreLog(&raft.Log{Index: 1}),
		"GetLog":      s.GetLog(1, &l),
		"DeleteRange": s.DeleteRange(1, 2),
		"Set":         s.Set([]byte("k"), []byte("v")),
	}
	_, checks["FirstIndex"] = s.FirstIndex()
	_, checks["LastIndex"] = s.LastIndex()
	_, checks["Get"] = s.Get([]byte("k"))
	_, checks["GetUint64"] = s.GetUint64([]byte("k"))
	_, checks["GetCommitIndex"] = s.GetCommitIndex()
	for op, err := range checks {
		if !errors.Is(err, ErrLogStoreClosed) {
			t.Errorf("%s after Close: err = %v, want ErrLogStoreClosed", op, err)
		}
	}
}

// logstoreRawWrite writes key/val straight into the Pebble instance in dir,
// bypassing LogStore, to fake other layouts and corruption.
func logstoreRawWrite(t *testing.T, dir string, key, val []byte) {
	t.Helper()
	db, err := pebble.Open(dir, &pebble.Options{Logger: logstorePebbleLogger{logger: slog.New(slog.DiscardHandler)}})
	if err != nil {
		t.Fatalf("pebble.Open: %v", err)
	}
	if err := db.Set(key, val, pebble.Sync); err != nil {
		t.Fatalf("pebble Set: %v", err)
	}
	if err := db.Close(); err != nil {
		t.Fatalf("pebble Close: %v", err)
	}
}

func TestLogStore_RefusesUnknownLayout(t *testing.T) {
	tests := []struct {
		name   string
		create bool // first create a valid LogStore in dir
		key    []byte
		val    []byte
	}{
		{"newer layout version", true, logstoreMarkerKey(), []byte{0x7f}},
		{"malformed marker", true, logstoreMarkerKey(), []byte{logstoreLayoutVersion, 0}},
		{"foreign database without marker", false, []byte("\x01\x02some-fsm-key"), []byte("v")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			if tt.create {
				s := openTestLogStore(t, dir)
				if err := s.Close(); err != nil {
					t.Fatal(err)
				}
			}
			logstoreRawWrite(t, dir, tt.key, tt.val)
			s, err := OpenLogStore(dir, slog.New(slog.DiscardHandler))
			if err == nil {
				_ = s.Close()
				t.Fatal("OpenLogStore succeeded, want ErrLogStoreLayout")
			}
			if !errors.Is(err, ErrLogStoreLayout) {
				t.Fatalf("OpenLogStore: err = %v, want ErrLogStoreLayout", err)
			}
			// The refused store must have been closed (Pebble's lock released).
			logstoreRawWrite(t, dir, []byte("probe"), nil)
		})
	}
}

func TestLogStore_CorruptLogIsAnError(t *testing.T) {
	dir := t.TempDir()
	s := openTestLogStore(t, dir)
	if err := s.StoreLog(&raft.Log{Index: 1, Data: []byte("ok")}); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	logstoreRawWrite(t, dir, logstoreLogKey(2), []byte{0x09, 0x01})                                              // unknown encoding
	logstoreRawWrite(t, dir, logstoreLogKey(3), logstoreEncodeLog(&raft.Log{Index: 4}))                          // wrong index
	logstoreRawWrite(t, dir, logstoreLogKey(5), logstoreEncodeLog(&raft.Log{Index: 5, Data: []byte("abc")})[:4]) // truncated

	s = openTestLogStore(t, dir)
	for _, idx := range []uint64{2, 3, 5} {
		l := raft.Log{Index: 77}
		err := s.GetLog(idx, &l)
		if !errors.Is(err, ErrLogStoreCorrupt) {
			t.Fatalf("GetLog(%d): err = %v, want ErrLogStoreCorrupt", idx, err)
		}
	}
}

func TestLogStore_DecodeRejectsEveryTruncation(t *testing.T) {
	full := logstoreEncodeLog(&raft.Log{
		Index: 300, Term: 4, Type: raft.LogCommand,
		Data: []byte("data"), Extensions: []byte("ext"),
		AppendedAt: time.Unix(1700000000, 123456789),
	})
	for n := range len(full) {
		var l raft.Log
		if err := logstoreDecodeLog(full[:n], &l); !errors.Is(err, ErrLogStoreCorrupt) {
			t.Fatalf("decode of %d/%d bytes: err = %v, want ErrLogStoreCorrupt", n, len(full), err)
		}
	}
	var l raft.Log
	if err := logstoreDecodeLog(append(full, 0), &l); !errors.Is(err, ErrLogStoreCorrupt) {
		t.Fatalf("decode with trailing byte: err = %v, want ErrLogStoreCorrupt", err)
	}
	if err := logstoreDecodeLog(full, &l); err != nil {
		t.Fatalf("decode of full encoding: %v", err)
	}
}

func TestLogStore_ConcurrentReadersAndClose(t *testing.T) {
	s := openTestLogStore(t, t.TempDir())
	if err := s.StoreLogs(logstoreTestLogs(1, 10)); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for r := range 4 {
		wg.Go(func() {
			for i := uint64(0); ; i++ {
				var l raft.Log
				err := s.GetLog(1+i%10, &l)
				if errors.Is(err, ErrLogStoreClosed) {
					return
				}
				if err != nil {
					t.Errorf("reader %d: GetLog: %v", r, err)
					return
				}
				if _, err := s.LastIndex(); err != nil && !errors.Is(err, ErrLogStoreClosed) {
					t.Errorf("reader %d: LastIndex: %v", r, err)
					return
				}
			}
		})
	}
	for i := uint64(11); i <= 60; i++ {
		if err := s.StoreLog(&raft.Log{Index: i, Data: []byte("w")}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
}

// logstoreCountingFSM counts applied commands and sums their payloads (a
// big-endian uint32 each), so a replay that skips, repeats or corrupts
// entries is visible.
type logstoreCountingFSM struct {
	mu         sync.Mutex
	count      uint64
	sum        uint64
	lastIndex  uint64
	outOfOrder bool
}

func (f *logstoreCountingFSM) Apply(l *raft.Log) any {
	f.mu.Lock()
	defer f.mu.Unlock()
	if l.Index <= f.lastIndex {
		f.outOfOrder = true
	}
	f.lastIndex = l.Index
	f.count++
	if len(l.Data) == 4 {
		f.sum += uint64(binary.BigEndian.Uint32(l.Data))
	}
	return f.count
}

func (f *logstoreCountingFSM) state() (count, sum uint64, outOfOrder bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.count, f.sum, f.outOfOrder
}

func (f *logstoreCountingFSM) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return logstoreCountingSnapshot{count: f.count, sum: f.sum, lastIndex: f.lastIndex}, nil
}

func (f *logstoreCountingFSM) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	var buf [24]byte
	if _, err := io.ReadFull(rc, buf[:]); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.count = binary.BigEndian.Uint64(buf[0:])
	f.sum = binary.BigEndian.Uint64(buf[8:])
	f.lastIndex = binary.BigEndian.Uint64(buf[16:])
	return nil
}

type logstoreCountingSnapshot struct{ count, sum, lastIndex uint64 }

func (s logstoreCountingSnapshot) Persist(sink raft.SnapshotSink) error {
	var buf []byte
	buf = binary.BigEndian.AppendUint64(buf, s.count)
	buf = binary.BigEndian.AppendUint64(buf, s.sum)
	buf = binary.BigEndian.AppendUint64(buf, s.lastIndex)
	if _, err := sink.Write(buf); err != nil {
		_ = sink.Cancel()
		return err
	}
	return sink.Close()
}

func (logstoreCountingSnapshot) Release() {}

// logstoreWaitFor polls cond until it holds or timeout passes.
func logstoreWaitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		<-tick.C
	}
}

func logstoreRaftConfig(t *testing.T, restoreCommitted bool) *raft.Config {
	conf := raft.DefaultConfig()
	conf.LocalID = "n1"
	conf.HeartbeatTimeout = 50 * time.Millisecond
	conf.ElectionTimeout = 50 * time.Millisecond
	conf.LeaderLeaseTimeout = 50 * time.Millisecond
	conf.CommitTimeout = 5 * time.Millisecond
	// No snapshots: the restart must replay from this LogStore.
	conf.SnapshotThreshold = math.MaxUint32
	conf.SnapshotInterval = time.Hour
	// RestoreCommittedLogs makes raft stage commit indexes in the
	// CommitTrackingLogStore.
	conf.RestoreCommittedLogs = restoreCommitted
	conf.LogOutput = t.Output()
	conf.LogLevel = "ERROR"
	return conf
}

func TestLogStore_RaftRestart(t *testing.T) {
	const entries = 100
	dir := t.TempDir()
	snaps := raft.NewInmemSnapshotStore()

	// First life: bootstrap, become leader, apply entries.
	store := openTestLogStore(t, dir)
	fsm := &logstoreCountingFSM{}
	addr, trans := raft.NewInmemTransport("")
	// The first life stages commit indexes so the store's commit tracking is
	// exercised by real raft.
	r, err := raft.NewRaft(logstoreRaftConfig(t, true), fsm, store, store, snaps, trans)
	if err != nil {
		t.Fatalf("NewRaft: %v", err)
	}
	boot := raft.Configuration{Servers: []raft.Server{{ID: "n1", Address: addr}}}
	if err := r.BootstrapCluster(boot).Error(); err != nil {
		t.Fatalf("BootstrapCluster: %v", err)
	}
	logstoreWaitFor(t, 10*time.Second, "leadership", func() bool { return r.State() == raft.Leader })
	var lastApply, wantSum uint64
	for i := range uint32(entries) {
		f := r.Apply(binary.BigEndian.AppendUint32(nil, i), 5*time.Second)
		if err := f.Error(); err != nil {
			t.Fatalf("Apply %d: %v", i, err)
		}
		lastApply = f.Index()
		wantSum += uint64(i)
	}
	if n, sum, _ := fsm.state(); n != entries || sum != wantSum {
		t.Fatalf("first life FSM: count %d sum %d, want %d %d", n, sum, entries, wantSum)
	}
	if err := r.Shutdown().Error(); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	_ = trans.Close()
	if err := store.Close(); err != nil {
		t.Fatal(err)
	}

	// Second life on the same directory.
	store = openTestLogStore(t, dir)
	if last, err := store.LastIndex(); err != nil || last < lastApply {
		t.Fatalf("reopened LastIndex = %d, %v; want >= %d", last, err, lastApply)
	}
	// Each append carries the commit index known before it, so the commit
	// of the last Apply is the only one that may be missing.
	if commit, err := store.GetCommitIndex(); err != nil || commit+1 < lastApply {
		t.Fatalf("persisted commit index = %d, %v; want >= %d", commit, err, lastApply-1)
	}
	if ok, err := raft.HasExistingState(store, store, snaps); err != nil || !ok {
		t.Fatalf("HasExistingState = %v, %v; want true", ok, err)
	}
	fsm = &logstoreCountingFSM{}
	_, trans = raft.NewInmemTransport(addr)
	// Restart without RestoreCommittedLogs: in raft v1.8.0 that option
	// replays committed entries in NewRaft and then starts its scan for
	// configuration entries after them, so a node whose membership entries
	// are all committed restarts with no configuration ("no known peers,
	// aborting election") and never becomes leader.
	r, err = raft.NewRaft(logstoreRaftConfig(t, false), fsm, store, store, snaps, trans)
	if err != nil {
		t.Fatalf("NewRaft after restart: %v", err)
	}
	t.Cleanup(func() {
		_ = r.Shutdown().Error()
		_ = trans.Close()
	})
	logstoreWaitFor(t, 10*time.Second, "leadership after restart", func() bool { return r.State() == raft.Leader })
	if err := r.Barrier(5 * time.Second).Error(); err != nil {
		t.Fatalf("Barrier: %v", err)
	}
	n, sum, outOfOrder := fsm.state()
	if n != entries || sum != wantSum || outOfOrder {
		t.Fatalf("replayed FSM: count %d sum %d outOfOrder %v; want %d %d false", n, sum, outOfOrder, entries, wantSum)
	}
	if r.LastIndex() <= lastApply || r.AppliedIndex() < lastApply {
		t.Fatalf("after restart LastIndex %d AppliedIndex %d; want > %d and >= %d",
			r.LastIndex(), r.AppliedIndex(), lastApply, lastApply)
	}
	// The new term's entries land in the same store.
	f := r.Apply(binary.BigEndian.AppendUint32(nil, 1000), 5*time.Second)
	if err := f.Error(); err != nil {
		t.Fatalf("Apply after restart: %v", err)
	}
	var l raft.Log
	if err := store.GetLog(f.Index(), &l); err != nil || l.Type != raft.LogCommand || l.AppendedAt.IsZero() {
		t.Fatalf("GetLog(%d) after restart = %+v, %v", f.Index(), l, err)
	}
}

func openBenchLogStore(b *testing.B) *LogStore {
	return openTestLogStore(b, b.TempDir())
}

func BenchmarkLogStore_FirstIndex(b *testing.B) { raftbench.FirstIndex(b, openBenchLogStore(b)) }
func BenchmarkLogStore_LastIndex(b *testing.B)  { raftbench.LastIndex(b, openBenchLogStore(b)) }
func BenchmarkLogStore_GetLog(b *testing.B)     { raftbench.GetLog(b, openBenchLogStore(b)) }
func BenchmarkLogStore_StoreLog(b *testing.B)   { raftbench.StoreLog(b, openBenchLogStore(b)) }
func BenchmarkLogStore_StoreLogs(b *testing.B)  { raftbench.StoreLogs(b, openBenchLogStore(b)) }
func BenchmarkLogStore_DeleteRange(b *testing.B) {
	raftbench.DeleteRange(b, openBenchLogStore(b))
}
func BenchmarkLogStore_Set(b *testing.B)       { raftbench.Set(b, openBenchLogStore(b)) }
func BenchmarkLogStore_Get(b *testing.B)       { raftbench.Get(b, openBenchLogStore(b)) }
func BenchmarkLogStore_SetUint64(b *testing.B) { raftbench.SetUint64(b, openBenchLogStore(b)) }
func BenchmarkLogStore_GetUint64(b *testing.B) { raftbench.GetUint64(b, openBenchLogStore(b)) }
