package consensus

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/bloom"
	"google.golang.org/protobuf/proto"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// ErrClosed is returned by a Store used after Close.
var ErrClosed = errors.New("consensus: state store closed")

// Store is the Pebble state store that the FSM writes and every read serves
// from. A snapshot restore swaps the underlying database; mu keeps readers off
// it while that happens.
type Store struct {
	dir    string
	logger *slog.Logger

	mu sync.RWMutex
	db *pebble.DB
	// snapshots counts pinned snapshots still streaming; a restore waits for
	// them before closing the database they read.
	snapshots sync.WaitGroup

	// accessVersion caches the access state's version, which every write
	// checks (a Pebble read each time cost the leader 7% of its CPU under
	// tag commits). The apply loop sets it after committing an entry that
	// changed access; a restore forgets it while it holds mu. See
	// AccessVersion.
	accessMu      sync.Mutex
	accessVersion uint64
	accessKnown   bool
	accessGen     uint64 // counts changes of the two above by applies and restores
}

// OpenStore opens (creating if needed) the state store in dir.
func OpenStore(dir string, logger *slog.Logger) (*Store, error) {
	if err := recoverInterruptedRestore(dir); err != nil {
		return nil, err
	}
	db, err := openStateDB(dir, logger)
	if err != nil {
		return nil, err
	}
	return &Store{dir: dir, logger: logger, db: db}, nil
}

func openStateDB(dir string, logger *slog.Logger) (*pebble.DB, error) {
	// Pebble would create the directory open to every user (0755).
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("open state store %s: %w", dir, err)
	}
	db, err := pebble.Open(dir, stateOptions(logger))
	if err != nil {
		return nil, fmt.Errorf("open state store %s: %w", dir, err)
	}
	if err := checkLayout(db); err != nil {
		db.Close()
		return nil, fmt.Errorf("state store %s: %w", dir, err)
	}
	return db, nil
}

// stateCacheSize is the state store's block cache. Every write's apply
// reads the keys it checks (links, references, candidates), so with
// pebble's 8 MiB default a large registry re-reads index and data blocks
// from disk on every entry.
const stateCacheSize = 64 << 20

// stateOptions tunes the state store for point lookups: a larger block
// cache, and bloom filters so a key that does not exist (most checks of a
// new push) costs no data block read.
func stateOptions(logger *slog.Logger) *pebble.Options {
	opts := &pebble.Options{Logger: pebbleLogger{logger}, CacheSize: stateCacheSize}
	for i := range opts.Levels {
		opts.Levels[i].FilterPolicy = bloom.FilterPolicy(10)
	}
	return opts
}

// checkLayout stamps a new store with the layout version and refuses a store
// written by a layout this binary does not know.
func checkLayout(db *pebble.DB) error {
	k := key(tableLayout)
	v, closer, err := db.Get(k)
	if errors.Is(err, pebble.ErrNotFound) {
		return db.Set(k, []byte{0, 0, 0, layoutVersion}, pebble.Sync)
	}
	if err != nil {
		return err
	}
	defer closer.Close()
	if len(v) != 4 || binary.BigEndian.Uint32(v) != uint32(layoutVersion) {
		return fmt.Errorf("unsupported state layout version %x (this binary reads %d)", v, layoutVersion)
	}
	return nil
}

// Close closes the store. It is safe to call more than once.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.db == nil {
		return nil
	}
	err := s.db.Close()
	s.db = nil
	return err
}

// read runs fn with the current database under the read lock.
func (s *Store) read(fn func(db *pebble.DB) error) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.db == nil {
		return ErrClosed
	}
	return fn(s.db)
}

// get returns a copy of the value at k, or nil, false.
func get(r pebble.Reader, k []byte) ([]byte, bool, error) {
	v, closer, err := r.Get(k)
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	defer closer.Close()
	return bytes.Clone(v), true, nil
}

func has(r pebble.Reader, k []byte) (bool, error) {
	_, ok, err := get(r, k)
	return ok, err
}

// getProto unmarshals the value at k into m; ok is false when k is absent.
func getProto(r pebble.Reader, k []byte, m proto.Message) (bool, error) {
	v, ok, err := get(r, k)
	if err != nil || !ok {
		return ok, err
	}
	if err := proto.Unmarshal(v, m); err != nil {
		return false, fmt.Errorf("decode %q: %w", k, err)
	}
	return true, nil
}

// AppliedIndex returns the index and term of the last applied log entry.
func (s *Store) AppliedIndex() (index, term uint64, err error) {
	err = s.read(func(db *pebble.DB) error {
		index, term, err = appliedIndex(db)
		return err
	})
	return index, term, err
}

func appliedIndex(r pebble.Reader) (index, term uint64, err error) {
	v, ok, err := get(r, key(tableApplied))
	if err != nil || !ok {
		return 0, 0, err
	}
	if len(v) != 16 {
		return 0, 0, fmt.Errorf("corrupt applied index (%d bytes)", len(v))
	}
	return binary.BigEndian.Uint64(v), binary.BigEndian.Uint64(v[8:]), nil
}

// UploadKey returns the newest upload-token key, or nil before the leader
// has installed one.
func (s *Store) UploadKey(ctx context.Context) ([]byte, error) {
	keys, err := s.UploadKeys(ctx)
	if err != nil || len(keys) == 0 {
		return nil, err
	}
	return keys[len(keys)-1].Key, nil
}

// UploadKeys returns the upload-token key ring, oldest first (empty before
// the leader has installed a key).
func (s *Store) UploadKeys(context.Context) ([]*pb.UploadKey, error) {
	var ring *pb.UploadKeyRing
	err := s.read(func(db *pebble.DB) (err error) {
		ring, err = uploadKeyRing(db)
		return err
	})
	return ring.GetKeys(), err
}

// RepositoryExists reports whether anything was ever linked or pushed to repo.
func (s *Store) RepositoryExists(_ context.Context, repo string) (bool, error) {
	var ok bool
	err := s.read(func(db *pebble.DB) (err error) {
		ok, err = has(db, key(tableRepo, repo))
		return err
	})
	return ok, err
}

// Manifest returns the manifest stored in repo under digest.
func (s *Store) Manifest(_ context.Context, repo, digest string) (*pb.ManifestRecord, error) {
	m := &pb.ManifestRecord{}
	err := s.read(func(db *pebble.DB) error {
		ok, err := getProto(db, key(tableManifest, repo, digest), m)
		if err == nil && !ok {
			err = pb.Errorf(pb.Code_CODE_MANIFEST_UNKNOWN, "manifest %s not found in %s", digest, repo)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	return m, nil
}

// Tag returns the digest tag points at in repo.
func (s *Store) Tag(_ context.Context, repo, tag string) (string, error) {
	var d []byte
	err := s.read(func(db *pebble.DB) error {
		v, ok, err := get(db, key(tableTag, repo, tag))
		if err == nil && !ok {
			err = pb.Errorf(pb.Code_CODE_TAG_UNKNOWN, "tag %s not found in %s", tag, repo)
		}
		d = v
		return err
	})
	return string(d), err
}

// Tags lists up to limit tags of repo in lexical order, starting after after.
// A negative limit means no limit. It returns ErrNameUnknown for a repository
// that does not exist.
func (s *Store) Tags(_ context.Context, repo, after string, limit int) ([]string, error) {
	tags := []string{}
	err := s.read(func(db *pebble.DB) error {
		ok, err := has(db, key(tableRepo, repo))
		if err != nil {
			return err
		}
		if !ok {
			return pb.Errorf(pb.Code_CODE_NAME_UNKNOWN, "repository %s not known", repo)
		}
		p := prefix(tableTag, repo)
		return scan(db, p, after, limit, func(k, _ []byte) error {
			tags = append(tags, string(k[len(p):]))
			return nil
		})
	})
	return tags, err
}

// Repositories lists up to limit repository names in lexical order after after.
func (s *Store) Repositories(_ context.Context, after string, limit int) ([]string, error) {
	repos := []string{}
	err := s.read(func(db *pebble.DB) error {
		p := []byte{layoutVersion, tableRepo}
		return scan(db, p, after, limit, func(k, _ []byte) error {
			repos = append(repos, string(k[len(p):]))
			return nil
		})
	})
	return repos, err
}

// Referrers lists the manifests in repo whose subject is subject, ordered by
// digest.
func (s *Store) Referrers(_ context.Context, repo, subject string) ([]*pb.Referrer, error) {
	refs := []*pb.Referrer{}
	err := s.read(func(db *pebble.DB) error {
		return scan(db, prefix(tableReferrer, repo, subject), "", -1, func(_, v []byte) error {
			r := &pb.Referrer{}
			if err := proto.Unmarshal(v, r); err != nil {
				return fmt.Errorf("decode referrer: %w", err)
			}
			refs = append(refs, r)
			return nil
		})
	})
	return refs, err
}

// LinkedBlob returns the record of a blob linked into repo, or ErrBlobUnknown.
func (s *Store) LinkedBlob(_ context.Context, repo, digest string) (*pb.BlobRecord, error) {
	b := &pb.BlobRecord{}
	err := s.read(func(db *pebble.DB) error {
		linked, err := has(db, key(tableLink, repo, digest))
		if err != nil {
			return err
		}
		ok := false
		if linked {
			ok, err = getProto(db, key(tableBlob, digest), b)
		}
		if err == nil && !ok {
			err = pb.Errorf(pb.Code_CODE_BLOB_UNKNOWN, "blob %s not found in %s", digest, repo)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	return b, nil
}

// Blob returns the cluster-wide record of a blob, or ErrBlobUnknown.
func (s *Store) Blob(_ context.Context, digest string) (*pb.BlobRecord, error) {
	b := &pb.BlobRecord{}
	err := s.read(func(db *pebble.DB) error {
		ok, err := getProto(db, key(tableBlob, digest), b)
		if err == nil && !ok {
			err = pb.Errorf(pb.Code_CODE_BLOB_UNKNOWN, "blob %s not found", digest)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	return b, nil
}

// Blobs lists up to limit blob records in digest order, starting after
// after (for the scrubber, which walks every blob).
func (s *Store) Blobs(_ context.Context, after string, limit int) ([]*pb.BlobRecord, error) {
	var out []*pb.BlobRecord
	err := s.read(func(db *pebble.DB) error {
		return scan(db, key(tableBlob), after, limit, func(_, v []byte) error {
			b := &pb.BlobRecord{}
			if err := proto.Unmarshal(v, b); err != nil {
				return err
			}
			out = append(out, b)
			return nil
		})
	})
	return out, err
}

// scanValues decodes the values of up to limit keys under p whose suffix
// sorts after after, each into a fresh message from newMsg.
func scanValues[M proto.Message](r pebble.Reader, p []byte, after string, limit int, newMsg func() M) ([]M, error) {
	var out []M
	err := scan(r, p, after, limit, func(_, v []byte) error {
		m := newMsg()
		if err := proto.Unmarshal(v, m); err != nil {
			return err
		}
		out = append(out, m)
		return nil
	})
	return out, err
}

// lastFields returns the last field of every key under p (the tags of a
// manifest, the blobs of a repository, ...).
func lastFields(r pebble.Reader, p []byte) ([]string, error) {
	var out []string
	err := scan(r, p, "", -1, func(k, _ []byte) error {
		out = append(out, lastField(k))
		return nil
	})
	return out, err
}

// scan calls fn for up to limit keys under p whose suffix sorts after after.
func scan(r pebble.Reader, p []byte, after string, limit int, fn func(k, v []byte) error) error {
	if limit == 0 {
		return nil
	}
	lower := p
	if after != "" {
		// The smallest key strictly greater than p+after.
		lower = append(append(bytes.Clone(p), after...), 0)
	}
	it, err := r.NewIter(&pebble.IterOptions{LowerBound: lower, UpperBound: upperBound(p)})
	if err != nil {
		return err
	}
	defer it.Close()
	n := 0
	for ok := it.First(); ok; ok = it.Next() {
		if err := fn(it.Key(), it.Value()); err != nil {
			return err
		}
		n++
		if limit > 0 && n >= limit {
			break
		}
	}
	return it.Error()
}

// Digest returns a hash of the store's replicated contents at its applied
// index, and that index. Two nodes that applied the same log hold the same
// digest, whatever their local history (compactions, restores).
func (s *Store) Digest() (sum []byte, index uint64, err error) {
	err = s.read(func(db *pebble.DB) error {
		snap := db.NewSnapshot()
		defer snap.Close()
		if index, _, err = appliedIndex(snap); err != nil {
			return err
		}
		sum, err = stateDigest(snap)
		return err
	})
	return sum, index, err
}

// stateDigest is Digest of what r holds.
func stateDigest(r pebble.Reader) ([]byte, error) {
	it, err := r.NewIter(&pebble.IterOptions{})
	if err != nil {
		return nil, err
	}
	defer it.Close()
	d := newDigester()
	for ok := it.First(); ok; ok = it.Next() {
		d.add(it.Key(), it.Value())
	}
	return d.sum(), it.Error()
}

// digester hashes pairs in key order as Digest does: everything but the
// applied index, which differs between replicas holding the same state,
// and a restore's epoch, so that a restored store shows the digest of the
// backup it holds.
type digester struct {
	h              hash.Hash
	applied, epoch []byte
}

func newDigester() *digester {
	return &digester{h: sha256.New(), applied: key(tableApplied), epoch: key(tableEpoch)}
}

func (d *digester) add(k, v []byte) {
	if bytes.Equal(k, d.applied) || bytes.Equal(k, d.epoch) {
		return
	}
	writeFrame(d.h, k)
	writeFrame(d.h, v)
}

func (d *digester) sum() []byte { return d.h.Sum(nil) }

func writeFrame(w io.Writer, b []byte) error {
	var n [binary.MaxVarintLen64]byte
	if _, err := w.Write(n[:binary.PutUvarint(n[:], uint64(len(b)))]); err != nil {
		return err
	}
	_, err := w.Write(b)
	return err
}

// recoverInterruptedRestore finishes or rolls back a snapshot restore that a
// crash interrupted (see Store.restore): the live store is dir, the previous
// one dir+".old", and a store being built dir+".restore".
func recoverInterruptedRestore(dir string) error {
	old, building := dir+".old", dir+".restore"
	if err := os.RemoveAll(building); err != nil {
		return err
	}
	if _, err := os.Stat(old); err == nil {
		if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
			// Crashed between moving the old store away and moving the new one in.
			if err := os.Rename(old, dir); err != nil {
				return err
			}
		} else if err := os.RemoveAll(old); err != nil {
			return err
		}
	}
	return syncDir(filepath.Dir(dir))
}

func syncDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// pebbleLogger sends Pebble's own logging to slog at debug level, errors
// and fatals above it.
type pebbleLogger struct{ l *slog.Logger }

func (p pebbleLogger) Infof(format string, args ...any) {
	p.l.Debug(fmt.Sprintf(format, args...))
}
func (p pebbleLogger) Errorf(format string, args ...any) {
	p.l.Error(fmt.Sprintf(format, args...))
}
func (p pebbleLogger) Fatalf(format string, args ...any) {
	p.l.Error(fmt.Sprintf(format, args...))
	os.Exit(1)
}
