package consensus

// LogStore key layout. The LogStore owns a private Pebble instance; no other
// component writes to it.
//
//	0x00                          layout marker; value is one byte: the layout version
//	<ver> 0x01 <index:8, BE>      raft log entry; value is an encoded log (below)
//	<ver> 0x02 <key bytes>        StableStore entry; value is the raw bytes
//	                              (SetUint64 stores 8 bytes, big-endian)
//	<ver> 0x03 0x01               persisted commit index (CommitTrackingLogStore),
//	                              8 bytes, big-endian
//
// <ver> is logstoreLayoutVersion. The marker key 0x00 lies outside every
// layout (0x00 is never a layout version), so a future layout can read it
// before it knows anything else. Big-endian indexes sort numerically, which is
// what makes FirstIndex/LastIndex a single bounded First/Last and lets
// DeleteRange be one Pebble range tombstone. All keys of a LogStore fall in
// [0x00, 0xff); keys at or above 0xff are reserved and never written.
//
// Log value encoding, version 1 (logstoreLogEncodingV1):
//
//	byte      encoding version (1)
//	uvarint   index
//	uvarint   term
//	byte      raft.LogType
//	uvarint   len(data), then data
//	uvarint   len(extensions), then extensions
//	byte      0 if AppendedAt is the zero time, else 1 followed by
//	          varint unix seconds and uvarint nanoseconds (0..999999999)
//
// The encoding is written by hand rather than with reflection (gob, msgpack)
// so that it is compact, allocation-light, and its evolution is explicit: a new
// encoding gets a new version byte and the decoder keeps reading the old ones.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"sync"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/hashicorp/raft"
)

const (
	logstoreLayoutVersion byte = 0x01

	logstoreTableLogs   byte = 0x01
	logstoreTableStable byte = 0x02
	logstoreTableMeta   byte = 0x03

	logstoreMetaCommitIndex byte = 0x01

	logstoreLogEncodingV1 byte = 0x01
)

// logstoreMarkerKey holds the layout version. It is a function, not a
// package-level slice, so no caller can hand Pebble a shared buffer.
func logstoreMarkerKey() []byte { return []byte{0x00} }

var (
	// ErrStableKeyNotFound is returned by LogStore.Get and LogStore.GetUint64
	// for a key that was never set. Its text must stay exactly "not found":
	// hashicorp/raft v1.8.0 detects stable-store misses by comparing
	// err.Error() == "not found" (api.go HasExistingState, NewRaft; raft.go
	// requestVote), and treats any other error as fatal.
	ErrStableKeyNotFound = errors.New("not found")

	// ErrLogStoreLayout is returned by OpenLogStore when the directory holds a
	// Pebble database with an unknown layout version, or one that is not a
	// LogStore at all.
	ErrLogStoreLayout = errors.New("consensus: unsupported log store layout")

	// ErrLogStoreCorrupt is returned when a stored entry cannot be decoded.
	ErrLogStoreCorrupt = errors.New("consensus: corrupt log store entry")

	// ErrLogStoreClosed is returned by every LogStore method after Close.
	ErrLogStoreClosed = errors.New("consensus: log store closed")
)

// Compile-time checks that LogStore satisfies the hashicorp/raft interfaces.
var (
	_ raft.LogStore               = (*LogStore)(nil)
	_ raft.StableStore            = (*LogStore)(nil)
	_ raft.CommitTrackingLogStore = (*LogStore)(nil)
)

// LogStore is a hashicorp/raft LogStore, StableStore and
// CommitTrackingLogStore backed by its own Pebble instance. Every write is a
// single Pebble batch committed with pebble.Sync. It is safe for concurrent
// use.
type LogStore struct {
	logger *slog.Logger

	// mu guards db against Close: operations hold it for reading, Close for
	// writing, so Pebble is never used after it is closed.
	mu sync.RWMutex
	db *pebble.DB

	// stagedMu guards the commit index staged by StageCommitIndex and not yet
	// written by StoreLogs.
	stagedMu     sync.Mutex
	staged       uint64
	stagedExists bool
}

// OpenLogStore creates dir if needed and opens (or initialises) the log store
// in it. A nil logger means slog.Default(). Pebble's own log lines are
// forwarded at debug level, its errors at error level.
func OpenLogStore(dir string, logger *slog.Logger) (*LogStore, error) {
	if logger == nil {
		logger = slog.Default()
	}
	logger = logger.With("component", "raft-logstore")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("consensus: create log store dir: %w", err)
	}
	db, err := pebble.Open(dir, logstorePebbleOptions(logger))
	if err != nil {
		return nil, fmt.Errorf("consensus: open log store %s: %w", dir, err)
	}
	if err := logstoreCheckLayout(db); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("consensus: open log store %s: %w", dir, err)
	}
	return &LogStore{logger: logger, db: db}, nil
}

// logstorePebbleOptions tunes Pebble for a write-ahead-log workload: small,
// synced, append-mostly writes, reads concentrated on recent entries, and
// prefix deletions as raft compacts its log.
func logstorePebbleOptions(logger *slog.Logger) *pebble.Options {
	return &pebble.Options{
		// Larger memtables than the 4 MiB default mean fewer flushes while
		// raft appends; most entries are read back (replicated) or deleted
		// (compacted) before they would ever reach an sstable.
		MemTableSize:                32 << 20,
		MemTableStopWritesThreshold: 4,
		// A new store starts on the newest on-disk format.
		FormatMajorVersion: pebble.FormatNewest,
		Logger:             logstorePebbleLogger{logger: logger},
	}
}

// logstoreCheckLayout verifies the layout marker, writing it into a new,
// empty store.
func logstoreCheckLayout(db *pebble.DB) error {
	val, closer, err := db.Get(logstoreMarkerKey())
	switch {
	case err == nil:
		defer closer.Close()
		if len(val) != 1 || val[0] != logstoreLayoutVersion {
			return fmt.Errorf("%w: layout version %x, this build reads version %d",
				ErrLogStoreLayout, val, logstoreLayoutVersion)
		}
		return nil
	case !errors.Is(err, pebble.ErrNotFound):
		return fmt.Errorf("read layout marker: %w", err)
	}

	// No marker: only an empty database may become a LogStore, otherwise we
	// could be pointed at some other component's Pebble directory.
	it, err := db.NewIter(&pebble.IterOptions{LowerBound: []byte{0x00}, UpperBound: []byte{0xff}})
	if err != nil {
		return fmt.Errorf("check for existing data: %w", err)
	}
	nonEmpty := it.First()
	if err := it.Close(); err != nil {
		return fmt.Errorf("check for existing data: %w", err)
	}
	if nonEmpty {
		return fmt.Errorf("%w: database has data but no layout marker", ErrLogStoreLayout)
	}
	return logstoreCommit(db, func(b *pebble.Batch) error {
		return b.Set(logstoreMarkerKey(), []byte{logstoreLayoutVersion}, nil)
	})
}

// Close closes the Pebble instance. It is idempotent; calls after the first
// return nil.
func (s *LogStore) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.db == nil {
		return nil
	}
	err := s.db.Close()
	s.db = nil
	if err != nil {
		return fmt.Errorf("consensus: close log store: %w", err)
	}
	return nil
}

// acquire read-locks the store and returns the open DB, or ErrLogStoreClosed.
// The caller must call s.mu.RUnlock when it returns a DB.
func (s *LogStore) acquire() (*pebble.DB, error) {
	s.mu.RLock()
	if s.db == nil {
		s.mu.RUnlock()
		return nil, ErrLogStoreClosed
	}
	return s.db, nil
}

// FirstIndex returns the lowest stored log index, or 0 if there are no logs.
func (s *LogStore) FirstIndex() (uint64, error) {
	return s.edgeIndex(true)
}

// LastIndex returns the highest stored log index, or 0 if there are no logs.
func (s *LogStore) LastIndex() (uint64, error) {
	return s.edgeIndex(false)
}

func (s *LogStore) edgeIndex(first bool) (uint64, error) {
	db, err := s.acquire()
	if err != nil {
		return 0, err
	}
	defer s.mu.RUnlock()
	return logstoreEdgeIndex(db, first)
}

func logstoreEdgeIndex(db *pebble.DB, first bool) (uint64, error) {
	it, err := db.NewIter(&pebble.IterOptions{
		LowerBound: logstoreTablePrefix(logstoreTableLogs),
		UpperBound: logstoreTablePrefix(logstoreTableLogs + 1),
	})
	if err != nil {
		return 0, fmt.Errorf("consensus: log store iterator: %w", err)
	}
	var ok bool
	if first {
		ok = it.First()
	} else {
		ok = it.Last()
	}
	var idx uint64
	if ok {
		idx, err = logstoreIndexFromKey(it.Key())
	}
	if cerr := it.Close(); cerr != nil && err == nil {
		err = fmt.Errorf("consensus: log store iterator: %w", cerr)
	}
	if err != nil {
		return 0, err
	}
	return idx, nil
}

// GetLog reads the log at index into log. It returns raft.ErrLogNotFound if
// there is no such log.
func (s *LogStore) GetLog(index uint64, log *raft.Log) error {
	db, err := s.acquire()
	if err != nil {
		return err
	}
	defer s.mu.RUnlock()

	val, closer, err := db.Get(logstoreLogKey(index))
	if errors.Is(err, pebble.ErrNotFound) {
		return raft.ErrLogNotFound
	}
	if err != nil {
		return fmt.Errorf("consensus: get log %d: %w", index, err)
	}
	defer closer.Close()
	// logstoreDecodeLog copies out of val, which Pebble reclaims on Close.
	if err := logstoreDecodeLog(val, log); err != nil {
		return fmt.Errorf("consensus: get log %d: %w", index, err)
	}
	if log.Index != index {
		return fmt.Errorf("consensus: get log %d: %w: entry holds index %d", index, ErrLogStoreCorrupt, log.Index)
	}
	return nil
}

// StoreLog stores one log entry.
func (s *LogStore) StoreLog(log *raft.Log) error {
	return s.StoreLogs([]*raft.Log{log})
}

// StoreLogs stores log entries, together with any commit index staged by
// StageCommitIndex, in one synced batch.
func (s *LogStore) StoreLogs(logs []*raft.Log) error {
	db, err := s.acquire()
	if err != nil {
		return err
	}
	defer s.mu.RUnlock()

	s.stagedMu.Lock()
	commit, hasCommit := s.staged, s.stagedExists
	s.stagedMu.Unlock()

	err = logstoreCommit(db, func(b *pebble.Batch) error {
		for _, l := range logs {
			if err := b.Set(logstoreLogKey(l.Index), logstoreEncodeLog(l), nil); err != nil {
				return err
			}
		}
		if hasCommit {
			return b.Set(logstoreCommitIndexKey(), logstoreUint64Bytes(commit), nil)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("consensus: store %d logs: %w", len(logs), err)
	}
	if hasCommit {
		s.stagedMu.Lock()
		// Clear only if no newer value was staged meanwhile.
		if s.stagedExists && s.staged == commit {
			s.stagedExists = false
		}
		s.stagedMu.Unlock()
	}
	return nil
}

// DeleteRange deletes the logs with indexes in [minIdx, maxIdx], inclusive,
// with a single range tombstone.
func (s *LogStore) DeleteRange(minIdx, maxIdx uint64) error {
	if minIdx > maxIdx {
		return nil
	}
	db, err := s.acquire()
	if err != nil {
		return err
	}
	defer s.mu.RUnlock()

	end := logstoreTablePrefix(logstoreTableLogs + 1)
	if maxIdx < math.MaxUint64 {
		end = logstoreLogKey(maxIdx + 1)
	}
	err = logstoreCommit(db, func(b *pebble.Batch) error {
		return b.DeleteRange(logstoreLogKey(minIdx), end, nil)
	})
	if err != nil {
		return fmt.Errorf("consensus: delete logs [%d, %d]: %w", minIdx, maxIdx, err)
	}
	return nil
}

// StageCommitIndex stages idx to be persisted atomically with the next
// StoreLogs; it is never written on its own.
func (s *LogStore) StageCommitIndex(idx uint64) error {
	s.stagedMu.Lock()
	s.staged, s.stagedExists = idx, true
	s.stagedMu.Unlock()
	return nil
}

// GetCommitIndex returns the persisted commit index, capped at LastIndex, or
// 0 if none was ever persisted.
func (s *LogStore) GetCommitIndex() (uint64, error) {
	db, err := s.acquire()
	if err != nil {
		return 0, err
	}
	defer s.mu.RUnlock()

	commit, err := logstoreGetUint64(db, logstoreCommitIndexKey())
	if errors.Is(err, ErrStableKeyNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("consensus: get commit index: %w", err)
	}
	last, err := logstoreEdgeIndex(db, false)
	if err != nil {
		return 0, err
	}
	return min(commit, last), nil
}

// Set stores a stable-store value.
func (s *LogStore) Set(key, val []byte) error {
	db, err := s.acquire()
	if err != nil {
		return err
	}
	defer s.mu.RUnlock()
	err = logstoreCommit(db, func(b *pebble.Batch) error {
		return b.Set(logstoreStableKey(key), val, nil)
	})
	if err != nil {
		return fmt.Errorf("consensus: set stable key %q: %w", key, err)
	}
	return nil
}

// Get returns a copy of a stable-store value, or ErrStableKeyNotFound.
func (s *LogStore) Get(key []byte) ([]byte, error) {
	db, err := s.acquire()
	if err != nil {
		return nil, err
	}
	defer s.mu.RUnlock()

	val, closer, err := db.Get(logstoreStableKey(key))
	if errors.Is(err, pebble.ErrNotFound) {
		// Unwrapped: raft compares the text.
		return nil, ErrStableKeyNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("consensus: get stable key %q: %w", key, err)
	}
	defer closer.Close()
	return append([]byte(nil), val...), nil
}

// SetUint64 stores val as 8 big-endian bytes.
func (s *LogStore) SetUint64(key []byte, val uint64) error {
	return s.Set(key, logstoreUint64Bytes(val))
}

// GetUint64 returns the value stored by SetUint64, or 0 and
// ErrStableKeyNotFound.
func (s *LogStore) GetUint64(key []byte) (uint64, error) {
	db, err := s.acquire()
	if err != nil {
		return 0, err
	}
	defer s.mu.RUnlock()
	v, err := logstoreGetUint64(db, logstoreStableKey(key))
	if err != nil && !errors.Is(err, ErrStableKeyNotFound) {
		return 0, fmt.Errorf("consensus: get stable key %q: %w", key, err)
	}
	return v, err
}

func logstoreGetUint64(db *pebble.DB, key []byte) (uint64, error) {
	val, closer, err := db.Get(key)
	if errors.Is(err, pebble.ErrNotFound) {
		return 0, ErrStableKeyNotFound
	}
	if err != nil {
		return 0, err
	}
	defer closer.Close()
	if len(val) != 8 {
		return 0, fmt.Errorf("%w: uint64 value has %d bytes", ErrLogStoreCorrupt, len(val))
	}
	return binary.BigEndian.Uint64(val), nil
}

// logstoreCommit builds one batch with fill and commits it with pebble.Sync.
func logstoreCommit(db *pebble.DB, fill func(*pebble.Batch) error) error {
	b := db.NewBatch()
	defer b.Close()
	if err := fill(b); err != nil {
		return err
	}
	return b.Commit(pebble.Sync)
}

// Keys are always built in fresh slices.

func logstoreTablePrefix(table byte) []byte {
	return []byte{logstoreLayoutVersion, table}
}

func logstoreLogKey(index uint64) []byte {
	k := make([]byte, 2, 10)
	k[0], k[1] = logstoreLayoutVersion, logstoreTableLogs
	return binary.BigEndian.AppendUint64(k, index)
}

func logstoreIndexFromKey(key []byte) (uint64, error) {
	if len(key) != 10 || key[0] != logstoreLayoutVersion || key[1] != logstoreTableLogs {
		return 0, fmt.Errorf("%w: malformed log key %x", ErrLogStoreCorrupt, key)
	}
	return binary.BigEndian.Uint64(key[2:]), nil
}

func logstoreStableKey(key []byte) []byte {
	k := make([]byte, 0, 2+len(key))
	k = append(k, logstoreLayoutVersion, logstoreTableStable)
	return append(k, key...)
}

func logstoreCommitIndexKey() []byte {
	return []byte{logstoreLayoutVersion, logstoreTableMeta, logstoreMetaCommitIndex}
}

func logstoreUint64Bytes(v uint64) []byte {
	return binary.BigEndian.AppendUint64(make([]byte, 0, 8), v)
}

// logstoreEncodeLog encodes l in encoding version 1 (see the top of the file).
func logstoreEncodeLog(l *raft.Log) []byte {
	n := 1 + 3*binary.MaxVarintLen64 + 1 + len(l.Data) + len(l.Extensions) + 1 + 2*binary.MaxVarintLen64
	b := make([]byte, 0, n)
	b = append(b, logstoreLogEncodingV1)
	b = binary.AppendUvarint(b, l.Index)
	b = binary.AppendUvarint(b, l.Term)
	b = append(b, byte(l.Type))
	b = binary.AppendUvarint(b, uint64(len(l.Data)))
	b = append(b, l.Data...)
	b = binary.AppendUvarint(b, uint64(len(l.Extensions)))
	b = append(b, l.Extensions...)
	if l.AppendedAt.IsZero() {
		return append(b, 0)
	}
	b = append(b, 1)
	b = binary.AppendVarint(b, l.AppendedAt.Unix())
	return binary.AppendUvarint(b, uint64(l.AppendedAt.Nanosecond()))
}

// logstoreDecodeLog decodes buf into l. Data and Extensions are copied, so l
// does not alias buf. On error l is left untouched.
func logstoreDecodeLog(buf []byte, l *raft.Log) error {
	if len(buf) == 0 {
		return fmt.Errorf("%w: empty log value", ErrLogStoreCorrupt)
	}
	if buf[0] != logstoreLogEncodingV1 {
		return fmt.Errorf("%w: unknown log encoding version %d", ErrLogStoreCorrupt, buf[0])
	}
	d := logstoreDecoder{buf: buf[1:]}
	index := d.uvarint()
	term := d.uvarint()
	typ := raft.LogType(d.readByte())
	data := d.bytes()
	ext := d.bytes()
	var appendedAt time.Time
	switch d.readByte() {
	case 0:
	case 1:
		sec := d.varint()
		nsec := d.uvarint()
		if d.err == nil && nsec >= uint64(time.Second) {
			d.fail("nanoseconds out of range")
		}
		appendedAt = time.Unix(sec, int64(nsec)).UTC()
	default:
		d.fail("bad AppendedAt flag")
	}
	if d.err == nil && len(d.buf) != 0 {
		d.fail("trailing bytes")
	}
	if d.err != nil {
		return d.err
	}

	// One allocation for both byte fields; capped slices so appending to
	// Data can never overwrite Extensions.
	var dataCopy, extCopy []byte
	if len(data)+len(ext) > 0 {
		both := make([]byte, len(data)+len(ext))
		copy(both, data)
		copy(both[len(data):], ext)
		if len(data) > 0 {
			dataCopy = both[:len(data):len(data)]
		}
		if len(ext) > 0 {
			extCopy = both[len(data):]
		}
	}
	*l = raft.Log{
		Index:      index,
		Term:       term,
		Type:       typ,
		Data:       dataCopy,
		Extensions: extCopy,
		AppendedAt: appendedAt,
	}
	return nil
}

// logstoreDecoder reads fields from buf, remembering the first error so a
// sequence of reads can be checked once.
type logstoreDecoder struct {
	buf []byte
	err error
}

func (d *logstoreDecoder) fail(what string) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: log value: %s", ErrLogStoreCorrupt, what)
	}
}

func (d *logstoreDecoder) readByte() byte {
	if d.err != nil {
		return 0
	}
	if len(d.buf) < 1 {
		d.fail("truncated")
		return 0
	}
	v := d.buf[0]
	d.buf = d.buf[1:]
	return v
}

func (d *logstoreDecoder) uvarint() uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.buf)
	if n <= 0 {
		d.fail("bad uvarint")
		return 0
	}
	d.buf = d.buf[n:]
	return v
}

func (d *logstoreDecoder) varint() int64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Varint(d.buf)
	if n <= 0 {
		d.fail("bad varint")
		return 0
	}
	d.buf = d.buf[n:]
	return v
}

// bytes returns a length-prefixed field, aliasing d.buf.
func (d *logstoreDecoder) bytes() []byte {
	n := d.uvarint()
	if d.err != nil {
		return nil
	}
	if n > uint64(len(d.buf)) {
		d.fail("length exceeds value")
		return nil
	}
	v := d.buf[:n]
	d.buf = d.buf[n:]
	return v
}

// logstorePebbleLogger forwards Pebble's log lines to slog. Pebble's Infof
// chatter (WAL and compaction housekeeping) goes to debug so the log store is
// quiet by default; errors stay visible.
type logstorePebbleLogger struct {
	logger *slog.Logger
}

func (l logstorePebbleLogger) Infof(format string, args ...any) {
	l.logger.Debug(fmt.Sprintf(format, args...))
}

func (l logstorePebbleLogger) Errorf(format string, args ...any) {
	l.logger.Error(fmt.Sprintf(format, args...))
}

// Fatalf is called by Pebble on unrecoverable conditions such as data
// corruption and must not return.
func (l logstorePebbleLogger) Fatalf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	l.logger.Error("pebble fatal error", "error", msg)
	panic("consensus: log store: pebble fatal: " + msg)
}
