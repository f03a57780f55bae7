package consensus

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// backupOf writes a backup of h's store.
func backupOf(t *testing.T, h *testFSM) ([]byte, *pb.BackupHeader) {
	t.Helper()
	var buf bytes.Buffer
	hdr, err := h.store.WriteBackup(&buf, BackupInfo{ClusterID: "old", NodeID: "n1", NodeVersion: "test", ReadIndex: h.index, Time: time.Unix(1700000000, 0)})
	if err != nil {
		t.Fatalf("WriteBackup: %v", err)
	}
	return buf.Bytes(), hdr
}

// wantBackupBlobs lists what a backup of s must name: every region's copy
// of every blob not condemned, as "region digest size".
func wantBackupBlobs(t *testing.T, s *Store) []string {
	t.Helper()
	recs, err := s.Blobs(context.Background(), "", -1)
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, r := range recs {
		for _, region := range r.Regions {
			if r.CondemnedUnixNano == 0 {
				want = append(want, fmt.Sprintf("%s %s %d", region, r.Digest, r.Size))
			}
		}
	}
	slices.Sort(want)
	return want
}

// A backup restored into a new data directory starts a single-voter cluster
// with the source's state, that takes writes after the backup's index, keeps
// them across a restart, and hands its state to a node that joins.
func TestBackupRestoresANewCluster(t *testing.T) {
	src := newTestFSM(t)
	populate(src, 150)
	src.mustApply(&pb.LogEntry{Command: &pb.LogEntry_SetRegions{SetRegions: &pb.SetRegions{Regions: []string{"eu", "us"}}}})
	file, hdr := backupOf(t, src)
	wantSum, wantIdx := storeDigest(t, src.store)
	_, wantTerm, _ := src.store.AppliedIndex()
	if hdr.RaftIndex != wantIdx || hdr.RaftTerm != wantTerm || !bytes.Equal(hdr.StateDigest, wantSum) ||
		hdr.ClusterId != "old" || !slices.Equal(hdr.Regions, []string{"eu", "us"}) {
		t.Fatalf("header %v, want index %d term %d digest %x", hdr, wantIdx, wantTerm, wantSum)
	}

	var blobs []string
	got, err := ScanBackup(bytes.NewReader(file), BackupVisitor{Blob: func(b *pb.BackupBlob) error {
		blobs = append(blobs, fmt.Sprintf("%s %s %d", b.Region, b.Digest, b.Size))
		return nil
	}})
	if err != nil {
		t.Fatalf("ScanBackup: %v", err)
	}
	if got.RaftIndex != hdr.RaftIndex {
		t.Fatalf("scanned header at %d, written at %d", got.RaftIndex, hdr.RaftIndex)
	}
	slices.Sort(blobs)
	want := wantBackupBlobs(t, src.store)
	if !slices.Equal(blobs, want) {
		t.Fatalf("blob list has %d entries, want %d:\n%v\nwant\n%v", len(blobs), len(want), blobs, want)
	}
	if recs, _ := src.store.Blobs(context.Background(), "", -1); !slices.ContainsFunc(recs, func(r *pb.BlobRecord) bool { return r.CondemnedUnixNano != 0 }) {
		t.Fatal("the source condemned no blob: the test does not show that condemned blobs are left out")
	}

	dir := filepath.Join(t.TempDir(), "restored")
	if _, err := RestoreBackup(RestoreConfig{DataDir: dir, NodeID: "fresh", RaftAddr: "127.0.0.1:1", Logger: testLogger()}, bytes.NewReader(file)); err != nil {
		t.Fatalf("RestoreBackup: %v", err)
	}
	n := startNode(t, dir, func(c *Config) { c.NodeID = "fresh" })
	if sum, idx := storeDigest(t, n.Store()); !bytes.Equal(sum, wantSum) || idx != wantIdx {
		t.Fatalf("restored state %x@%d, want %x@%d", sum, idx, wantSum, wantIdx)
	}
	servers, err := n.Servers()
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, nodeTestTimeout, "the configuration to carry the node's address", func() bool {
		return raftAddressOf(t, n, "fresh") == raft.ServerAddress(n.Addr())
	})
	if servers, _ = n.Servers(); len(servers) != 1 || servers[0].ID != "fresh" {
		t.Fatalf("configuration %v, want the restored node alone", servers)
	}

	// Events of the restored log get ids the old cluster never used.
	if epoch, err := n.Store().EventEpoch(); err != nil || len(epoch) != 12 {
		t.Fatalf("restored store's event epoch %q (%v), want a fresh one", epoch, err)
	}
	if epoch, _ := src.store.EventEpoch(); epoch != "" {
		t.Fatalf("a store never restored has epoch %q", epoch)
	}

	// Writes after the backup's index are applied, not skipped as replays.
	propose(t, n, put(manifest("after/restore", "new", "v1")))
	wantTag(t, n.Store(), "after/restore", "v1", digestOf("new"))
	if idx := n.AppliedIndex(); idx <= hdr.RaftIndex {
		t.Fatalf("applied index %d, not past the backup's %d", idx, hdr.RaftIndex)
	}
	wantTag(t, n.Store(), "org0/app", "latest", mustTag(t, src.store, "org0/app", "latest"))

	// A second node joins and gets the state through Raft.
	n2 := startJoiner(t, "joiner")
	ctx, cancel := context.WithTimeout(context.Background(), nodeTestTimeout)
	defer cancel()
	if err := n.AddServer(ctx, "joiner", n2.Addr(), true); err != nil {
		t.Fatalf("AddServer: %v", err)
	}
	propose(t, n, put(manifest("after/restore", "joined", "v2")))
	waitFor(t, nodeTestTimeout, "the joiner to hold the state", func() bool {
		a, _, _ := n.Store().Digest()
		b, _, _ := n2.Store().Digest()
		return bytes.Equal(a, b) && n2.AppliedIndex() == n.AppliedIndex()
	})
	wantTag(t, n2.Store(), "org0/app", "latest", mustTag(t, src.store, "org0/app", "latest"))
	wantTag(t, n2.Store(), "after/restore", "v2", digestOf("joined"))
}

func mustTag(t *testing.T, s *Store, repo, tag string) string {
	t.Helper()
	d, err := s.Tag(context.Background(), repo, tag)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// startJoiner opens a node that waits to be added to a cluster.
func startJoiner(t *testing.T, id string) *Node {
	t.Helper()
	cfg := DefaultConfig()
	cfg.NodeID, cfg.DataDir, cfg.Logger = id, t.TempDir(), testLogger()
	cfg.HeartbeatTimeout, cfg.ElectionTimeout = 200*time.Millisecond, 200*time.Millisecond
	cfg.RaftListener = listenExcept(t, "")
	n := NewNode(cfg)
	if err := n.Open(context.Background()); err != nil {
		cfg.RaftListener.Close()
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// Every truncation and every altered byte of a backup is refused, by the
// scan and by a restore, which then leaves nothing behind.
func TestBackupRefusesDamagedFiles(t *testing.T) {
	src := newTestFSM(t)
	populate(src, 30)
	file, _ := backupOf(t, src)
	damaged := map[string][]byte{
		"empty":            {},
		"appended garbage": append(slices.Clone(file), 0),
		"not a backup":     append([]byte("MRDNSNAP\x01"), file[9:]...),
	}
	for _, n := range []int{5, 9, 12, 40, len(file) / 2, len(file) - 40, len(file) - 32, len(file) - 1} {
		damaged[fmt.Sprintf("cut at %d of %d", n, len(file))] = file[:n]
	}
	for _, at := range []int{9, 11, 30, len(file) / 3, len(file) / 2, len(file) - 33, len(file) - 1} {
		b := slices.Clone(file)
		b[at] ^= 0x40
		damaged[fmt.Sprintf("byte %d flipped", at)] = b
	}
	for name, b := range damaged {
		t.Run(name, func(t *testing.T) {
			if _, err := ScanBackup(bytes.NewReader(b), BackupVisitor{}); !errors.Is(err, ErrCorruptBackup) {
				t.Fatalf("ScanBackup: %v, want ErrCorruptBackup", err)
			}
			dir := t.TempDir()
			_, err := RestoreBackup(RestoreConfig{DataDir: dir, NodeID: "n", RaftAddr: "127.0.0.1:1", Logger: testLogger()}, bytes.NewReader(b))
			if !errors.Is(err, ErrCorruptBackup) {
				t.Fatalf("RestoreBackup: %v, want ErrCorruptBackup", err)
			}
			if left, _ := os.ReadDir(dir); len(left) != 0 {
				t.Fatalf("a refused restore left %v", left)
			}
		})
	}
	if _, err := ScanBackup(bytes.NewReader(file), BackupVisitor{}); err != nil {
		t.Fatalf("the undamaged file: %v", err)
	}
}

// A restore never writes over a node's state.
func TestRestoreRefusesAUsedDataDir(t *testing.T) {
	src := newTestFSM(t)
	populate(src, 5)
	file, _ := backupOf(t, src)
	dir := t.TempDir()
	startNode(t, dir).Close()
	before, _ := os.ReadDir(filepath.Join(dir, "state"))
	_, err := RestoreBackup(RestoreConfig{DataDir: dir, NodeID: "n", RaftAddr: "127.0.0.1:1", Logger: testLogger()}, bytes.NewReader(file))
	if err == nil {
		t.Fatal("restored over a node's data directory")
	}
	if after, _ := os.ReadDir(filepath.Join(dir, "state")); len(after) != len(before) {
		t.Fatalf("the refused restore changed state/: %d entries, was %d", len(after), len(before))
	}
}
