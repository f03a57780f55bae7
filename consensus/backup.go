package consensus

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// Backup file format, version 1:
//
//	"MRDNBKUP" 0x01
//	uvarint len, BackupHeader        cluster, Raft index and term, state digest
//	snapshot stream (snapshot.go)    the state store at that index, checksummed
//	repeated: uvarint len, BackupBlob    one copy a region's store must hold
//	uvarint 0                        (end of blobs; a BackupBlob is never empty)
//	sha256 of everything above       (32 bytes; nothing follows)
//
// The header comes first so a reader can refuse a file it cannot restore
// before reading on. The state and the blob list come from one pinned Pebble
// snapshot, so both describe the same Raft index.
const BackupFormatVersion = 1

var backupMagic = []byte("MRDNBKUP\x01")

// ErrCorruptBackup is returned for a backup file that is truncated, altered
// or not a backup at all.
var ErrCorruptBackup = errors.New("corrupt or truncated backup file")

// BackupInfo is what a backup's header records beyond the state itself.
type BackupInfo struct {
	ClusterID   string
	NodeID      string
	NodeVersion string
	// ReadIndex is the read index the caller waited for before the backup
	// (see pb.BackupHeader.read_index).
	ReadIndex uint64
	Time      time.Time
}

// WriteBackup writes a backup of the store to w: the state as of the
// store's applied index when it is called, and the blobs each region must
// hold, both read from one pinned snapshot. The caller first makes the store
// current (a read index and WaitApplied), which is what makes the backup
// hold every acknowledged write.
func (s *Store) WriteBackup(w io.Writer, info BackupInfo) (*pb.BackupHeader, error) {
	ss, err := s.pin(false)
	if err != nil {
		return nil, err
	}
	defer ss.Release()
	index, term, err := appliedIndex(ss.snap)
	if err != nil {
		return nil, err
	}
	if index == 0 {
		return nil, errors.New("consensus: the state store has applied nothing yet")
	}
	digest, err := stateDigest(ss.snap)
	if err != nil {
		return nil, err
	}
	topo := &pb.SetRegions{}
	if _, err := getProto(ss.snap, key(tableRegions), topo); err != nil {
		return nil, err
	}
	hdr := &pb.BackupHeader{
		FormatVersion: BackupFormatVersion, ClusterId: info.ClusterID,
		RaftIndex: index, RaftTerm: term, ReadIndex: info.ReadIndex,
		TimeUnixNano: info.Time.UnixNano(), NodeId: info.NodeID, NodeVersion: info.NodeVersion,
		StateDigest: digest, Regions: topo.Regions,
	}

	sum := sha256.New()
	out := io.MultiWriter(w, sum)
	bw := bufio.NewWriterSize(out, 1<<20)
	if _, err := bw.Write(backupMagic); err != nil {
		return nil, err
	}
	if err := writeMessage(bw, hdr); err != nil {
		return nil, err
	}
	if err := bw.Flush(); err != nil {
		return nil, err
	}
	if err := writeSnapshot(out, ss.snap); err != nil {
		return nil, err
	}
	if err := writeBlobList(bw, ss.snap); err != nil {
		return nil, err
	}
	if err := bw.WriteByte(0); err != nil {
		return nil, err
	}
	if err := bw.Flush(); err != nil {
		return nil, err
	}
	if _, err := w.Write(sum.Sum(nil)); err != nil {
		return nil, err
	}
	return hdr, nil
}

// writeBlobList writes one BackupBlob for every region that holds a copy
// of a blob. Condemned blobs are left out: garbage collection is removing
// them, nothing links them, and their bytes may already be gone.
func writeBlobList(w io.Writer, r pebble.Reader) error {
	return scan(r, key(tableBlob), "", -1, func(_, v []byte) error {
		rec := &pb.BlobRecord{}
		if err := proto.Unmarshal(v, rec); err != nil {
			return fmt.Errorf("decode blob record: %w", err)
		}
		if rec.CondemnedUnixNano != 0 {
			return nil
		}
		for _, region := range rec.Regions {
			if err := writeMessage(w, &pb.BackupBlob{Region: region, Digest: rec.Digest, Size: rec.Size}); err != nil {
				return err
			}
		}
		return nil
	})
}

func writeMessage(w io.Writer, m proto.Message) error {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		return err
	}
	if len(b) == 0 {
		// A zero length ends the blob list.
		return fmt.Errorf("consensus: empty %T in a backup", m)
	}
	return writeFrame(w, b)
}

// BackupVisitor receives the parts of a backup as ScanBackup reads them;
// a nil field skips that part (it is verified all the same).
type BackupVisitor struct {
	Header func(*pb.BackupHeader) error
	// Pair gets every key and value of the state, in key order.
	Pair func(k, v []byte) error
	Blob func(*pb.BackupBlob) error
}

// ScanBackup reads a backup file from r and verifies it whole: the format,
// the state's own checksum, the state against the header's digest and Raft
// index, the trailing checksum, and that nothing follows it. The visitor
// sees parts before the end is verified, so whatever it builds must be
// thrown away when ScanBackup returns an error.
func ScanBackup(r io.Reader, v BackupVisitor) (*pb.BackupHeader, error) {
	br := bufio.NewReaderSize(r, 1<<20)
	hr := &snapshotReader{r: br, h: sha256.New()}
	magic := make([]byte, len(backupMagic))
	if _, err := io.ReadFull(hr, magic); err != nil {
		return nil, corruptBackup("the file's start", err)
	}
	if !bytes.Equal(magic[:len(magic)-1], backupMagic[:len(backupMagic)-1]) {
		return nil, fmt.Errorf("%w: not a Meridian backup file", ErrCorruptBackup)
	}
	if version := magic[len(magic)-1]; version != BackupFormatVersion {
		return nil, fmt.Errorf("backup file format version %d: this binary reads version %d", version, BackupFormatVersion)
	}
	b, err := hr.frame()
	if err != nil {
		return nil, corruptBackup("the header", err)
	}
	hdr := &pb.BackupHeader{}
	if err := proto.Unmarshal(b, hdr); err != nil || hdr.FormatVersion != BackupFormatVersion || hdr.RaftIndex == 0 {
		return nil, fmt.Errorf("%w: unreadable header", ErrCorruptBackup)
	}
	if v.Header != nil {
		if err := v.Header(hdr); err != nil {
			return nil, err
		}
	}

	d := newDigester()
	appliedKey := key(tableApplied)
	var applied []byte
	err = readSnapshot(hr, func(k, val []byte) error {
		d.add(k, val)
		if bytes.Equal(k, appliedKey) {
			applied = val
		}
		if v.Pair != nil {
			return v.Pair(k, val)
		}
		return nil
	})
	if errors.Is(err, errCorruptSnapshot) {
		return nil, corruptBackup("the state", err)
	}
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(d.sum(), hdr.StateDigest) {
		return nil, fmt.Errorf("%w: the state does not hash to the header's state digest", ErrCorruptBackup)
	}
	if len(applied) != 16 || binary.BigEndian.Uint64(applied) != hdr.RaftIndex || binary.BigEndian.Uint64(applied[8:]) != hdr.RaftTerm {
		return nil, fmt.Errorf("%w: the state is not at the header's Raft index %d", ErrCorruptBackup, hdr.RaftIndex)
	}

	for {
		b, err := hr.frame()
		if err != nil {
			return nil, corruptBackup("the blob list", err)
		}
		if len(b) == 0 {
			break
		}
		blob := &pb.BackupBlob{}
		if err := proto.Unmarshal(b, blob); err != nil || blob.Region == "" || blob.Digest == "" {
			return nil, fmt.Errorf("%w: unreadable entry in the blob list", ErrCorruptBackup)
		}
		if v.Blob != nil {
			if err := v.Blob(blob); err != nil {
				return nil, err
			}
		}
	}
	want := hr.h.Sum(nil)
	got := make([]byte, len(want))
	if _, err := io.ReadFull(br, got); err != nil {
		return nil, corruptBackup("the checksum", err)
	}
	if !bytes.Equal(got, want) {
		return nil, fmt.Errorf("%w: checksum mismatch", ErrCorruptBackup)
	}
	if _, err := br.ReadByte(); !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%w: data after the checksum", ErrCorruptBackup)
	}
	return hdr, nil
}

// corruptBackup says where a backup stopped making sense; running out of
// bytes anywhere means the file was cut short.
func corruptBackup(where string, err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%w: the file ends in %s", ErrCorruptBackup, where)
	}
	return fmt.Errorf("%w: %s: %v", ErrCorruptBackup, where, err)
}

// RestoreConfig says where, and as which node, a backup is restored.
type RestoreConfig struct {
	DataDir string
	NodeID  string
	// RaftAddr is the Raft address the node advertises: the one server of
	// the new configuration. A node that starts on another address records
	// its new one, as after any restart.
	RaftAddr string
	Logger   *slog.Logger
}

// RestoreBackup prepares cfg.DataDir so that a node started on it is the
// single voter of a new cluster holding the backup's state: the state store
// at the backup's index, a Raft snapshot at that index and term whose
// configuration names this node alone, and the current term. Raft then
// continues the log after the backup's index; a log restarting at 1 would
// be skipped entry by entry by the FSM, whose applied index is already
// higher. No server of the old cluster is carried over.
//
// The data directory must hold no Raft or state store yet. On an error,
// what RestoreBackup wrote is removed again.
func RestoreBackup(cfg RestoreConfig, r io.Reader) (hdr *pb.BackupHeader, err error) {
	if cfg.NodeID == "" || cfg.RaftAddr == "" || cfg.DataDir == "" {
		return nil, errors.New("consensus: restore needs a data directory, a node id and a Raft address")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	parts := []string{"state", "raft", "snapshots"}
	for _, p := range parts {
		if _, err := os.Stat(filepath.Join(cfg.DataDir, p)); !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("consensus: %s already holds %s/: restore only into a new data directory", cfg.DataDir, p)
		}
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			for _, p := range parts {
				os.RemoveAll(filepath.Join(cfg.DataDir, p))
			}
		}
	}()

	stateDir := filepath.Join(cfg.DataDir, "state")
	err = buildStore(stateDir, func(set func(k, v []byte) error) (err error) {
		if hdr, err = ScanBackup(r, BackupVisitor{Pair: set}); err != nil {
			return err
		}
		// The restored log reuses the indexes the old cluster went on to
		// use after the backup; a new epoch keeps event ids unique.
		var epoch [6]byte
		if _, err := rand.Read(epoch[:]); err != nil {
			return err
		}
		return set(key(tableEpoch), []byte(hex.EncodeToString(epoch[:])))
	})
	if err != nil {
		return nil, err
	}
	store, err := OpenStore(stateDir, cfg.Logger)
	if err != nil {
		return nil, err
	}
	defer store.Close()
	if err := seedRaft(cfg, store, hdr.RaftIndex, hdr.RaftTerm); err != nil {
		return nil, fmt.Errorf("consensus: seed Raft: %w", err)
	}
	return hdr, syncDir(cfg.DataDir)
}

// seedRaft writes the Raft snapshot and current term a restored node
// starts from. The snapshot's contents are the store's own snapshot stream,
// which is what the new leader sends a joining node that needs entries
// from before index.
func seedRaft(cfg RestoreConfig, store *Store, index, term uint64) error {
	hlog := newHCLogger(cfg.Logger)
	if err := os.MkdirAll(filepath.Join(cfg.DataDir, "snapshots"), 0o700); err != nil {
		return err
	}
	snaps, err := raft.NewFileSnapshotStoreWithLogger(cfg.DataDir, 2, hlog)
	if err != nil {
		return err
	}
	conf := raft.Configuration{Servers: []raft.Server{{
		ID: raft.ServerID(cfg.NodeID), Address: raft.ServerAddress(cfg.RaftAddr), Suffrage: raft.Voter,
	}}}
	_, trans := raft.NewInmemTransport(raft.ServerAddress(cfg.RaftAddr))
	defer trans.Close()
	sink, err := snaps.Create(raft.SnapshotVersionMax, index, term, conf, index, trans)
	if err != nil {
		return err
	}
	ss, err := store.pin(true)
	if err != nil {
		sink.Cancel()
		return err
	}
	err = ss.Persist(sink)
	ss.Release()
	if err != nil {
		return err
	}
	logs, err := OpenLogStore(filepath.Join(cfg.DataDir, "raft"), cfg.Logger)
	if err != nil {
		return err
	}
	if err := logs.SetUint64([]byte("CurrentTerm"), term); err != nil {
		logs.Close()
		return err
	}
	return logs.Close()
}
