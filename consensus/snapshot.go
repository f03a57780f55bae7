package consensus

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/cockroachdb/pebble/v2"
	"github.com/hashicorp/raft"
)

// Snapshot stream format, version 1:
//
//	"MRDNSNAP" 0x01
//	repeated: uvarint len(key) key uvarint len(value) value
//	uvarint 0                      (end of pairs; keys are never empty)
//	sha256 of everything above     (32 bytes)
//
// The checksum is verified before a restore replaces anything.
var snapshotMagic = []byte("MRDNSNAP\x01")

// errCorruptSnapshot is returned when a snapshot stream does not verify.
var errCorruptSnapshot = errors.New("consensus: corrupt snapshot stream")

// snapshot pins a Pebble snapshot of the store. Before returning it syncs the
// WAL: Raft compacts the log behind a snapshot, so every entry the snapshot
// covers must be durable in the store first.
func (s *Store) snapshot() (raft.FSMSnapshot, error) {
	return s.pin(true)
}

// pin pins a Pebble snapshot of the store (after syncing the WAL when sync
// is set); a restore waits until it is released.
func (s *Store) pin(sync bool) (*storeSnapshot, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.db == nil {
		return nil, ErrClosed
	}
	if sync {
		if err := s.db.LogData(nil, pebble.Sync); err != nil {
			return nil, fmt.Errorf("sync state store: %w", err)
		}
	}
	s.snapshots.Add(1)
	return &storeSnapshot{snap: s.db.NewSnapshot(), done: s.snapshots.Done}, nil
}

type storeSnapshot struct {
	snap *pebble.Snapshot
	done func()
}

// Persist streams the snapshot into sink.
func (ss *storeSnapshot) Persist(sink raft.SnapshotSink) error {
	if err := writeSnapshot(sink, ss.snap); err != nil {
		sink.Cancel()
		return err
	}
	return sink.Close()
}

// Release frees the pinned Pebble snapshot.
func (ss *storeSnapshot) Release() {
	ss.snap.Close()
	ss.done()
}

func writeSnapshot(w io.Writer, r pebble.Reader) error {
	h := sha256.New()
	bw := bufio.NewWriterSize(io.MultiWriter(w, h), 1<<20)
	if _, err := bw.Write(snapshotMagic); err != nil {
		return err
	}
	it, err := r.NewIter(&pebble.IterOptions{})
	if err != nil {
		return err
	}
	defer it.Close()
	for ok := it.First(); ok; ok = it.Next() {
		if err := writeFrame(bw, it.Key()); err != nil {
			return err
		}
		if err := writeFrame(bw, it.Value()); err != nil {
			return err
		}
	}
	if err := it.Error(); err != nil {
		return err
	}
	if err := bw.WriteByte(0); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	_, err = w.Write(h.Sum(nil))
	return err
}

// restore builds a new store from a snapshot stream beside the live one,
// then swaps it in. Readers see either the old store or the new one, never a
// mix; a crash midway leaves the old store (see recoverInterruptedRestore).
func (s *Store) restore(r io.Reader) error {
	building := s.dir + ".restore"
	if err := os.RemoveAll(building); err != nil {
		return err
	}
	if err := buildFromSnapshot(building, r); err != nil {
		os.RemoveAll(building)
		return err
	}
	// A leftover of a restore whose cleanup failed is garbage while s.dir
	// exists (see recoverInterruptedRestore), and would block the rename.
	old := s.dir + ".old"
	if err := os.RemoveAll(old); err != nil {
		return err
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	// Before the lock is released, whatever happens below: no reader may
	// take the old store's access version for the new store's.
	defer s.forgetAccessVersion()
	s.snapshots.Wait()
	if s.db != nil {
		if err := s.db.Close(); err != nil {
			return fmt.Errorf("close state store for restore: %w", err)
		}
		s.db = nil
	}
	if err := os.Rename(s.dir, old); err != nil {
		return err
	}
	if err := os.Rename(building, s.dir); err != nil {
		return err
	}
	if err := syncDir(filepath.Dir(s.dir)); err != nil {
		return err
	}
	db, err := openStateDB(s.dir, s.logger)
	if err != nil {
		return err
	}
	s.db = db
	return os.RemoveAll(old)
}

func buildFromSnapshot(dir string, r io.Reader) error {
	return buildStore(dir, func(set func(k, v []byte) error) error {
		return readSnapshot(bufio.NewReaderSize(r, 1<<20), set)
	})
}

// buildStore creates a Pebble store in dir holding the pairs fill hands to
// set. The last batch commits (synced) only once fill returned nil; on an
// error the caller removes dir.
func buildStore(dir string, fill func(set func(k, v []byte) error) error) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	db, err := pebble.Open(dir, stateOptions(slog.New(slog.DiscardHandler)))
	if err != nil {
		return err
	}
	defer func() {
		if db != nil {
			db.Close()
		}
	}()
	b := db.NewBatch()
	defer func() { b.Close() }()
	err = fill(func(k, v []byte) error {
		if err := b.Set(k, v, nil); err != nil {
			return err
		}
		if b.Len() > 4<<20 {
			if err := b.Commit(pebble.NoSync); err != nil {
				return err
			}
			b.Close()
			b = db.NewBatch()
		}
		return nil
	})
	if err != nil {
		return err
	}
	if err := b.Commit(pebble.Sync); err != nil {
		return err
	}
	err = db.Close()
	db = nil
	return err
}

// readSnapshot parses one snapshot stream from r, handing each pair to fn,
// and verifies its checksum. It reads r exactly to the stream's end, so a
// stream embedded in a longer file (a backup) leaves the rest unread.
func readSnapshot(r byteReader, fn func(k, v []byte) error) error {
	sr := &snapshotReader{r: r, h: sha256.New()}
	magic := make([]byte, len(snapshotMagic))
	if _, err := io.ReadFull(sr, magic); err != nil || !bytes.Equal(magic, snapshotMagic) {
		return fmt.Errorf("%w: bad header", errCorruptSnapshot)
	}
	for {
		k, err := sr.frame()
		if err != nil {
			return err
		}
		if len(k) == 0 {
			break
		}
		v, err := sr.frame()
		if err != nil {
			return err
		}
		if err := fn(k, v); err != nil {
			return err
		}
	}
	want := sr.h.Sum(nil)
	got := make([]byte, len(want))
	if _, err := io.ReadFull(sr.r, got); err != nil || !bytes.Equal(got, want) {
		return fmt.Errorf("%w: checksum mismatch", errCorruptSnapshot)
	}
	return nil
}

// byteReader is what the stream parsers read from: a *bufio.Reader, or a
// snapshotReader hashing an outer stream.
type byteReader interface {
	io.Reader
	io.ByteReader
}

// snapshotReader hashes every byte it hands out, so the trailing checksum
// can be checked against exactly what was parsed.
type snapshotReader struct {
	r byteReader
	h hash.Hash
}

func (s *snapshotReader) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	s.h.Write(p[:n])
	return n, err
}

func (s *snapshotReader) ReadByte() (byte, error) {
	c, err := s.r.ReadByte()
	if err == nil {
		s.h.Write([]byte{c})
	}
	return c, err
}

// maxSnapshotFrame bounds one key or value, so a corrupt length cannot make
// a restore allocate without limit. Manifests are the largest values.
const maxSnapshotFrame = 64 << 20

func (s *snapshotReader) frame() ([]byte, error) {
	n, err := binary.ReadUvarint(s)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errCorruptSnapshot, err)
	}
	if n > maxSnapshotFrame {
		return nil, fmt.Errorf("%w: frame of %d bytes", errCorruptSnapshot, n)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(s, b); err != nil {
		return nil, fmt.Errorf("%w: %w", errCorruptSnapshot, err)
	}
	return b, nil
}
