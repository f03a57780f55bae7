package main

import (
	"context"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/meridian-registry/meridian/consensus"
	"github.com/meridian-registry/meridian/node"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
	"github.com/meridian-registry/meridian/replication"
)

const backupUsage = `Usage:
  meridian backup --to FILE [--addr HOST:PORT]
      write a backup of the cluster's replicated state (tags, manifests,
      placements, policies, access, lifecycle rules) at one Raft index, with
      the list of blobs each region's store must hold. Admin only: an admin
      certificate (--tls-*) or an admin user (MERIDIAN_USERNAME and
      MERIDIAN_PASSWORD, or --username and --password-file).
  meridian restore --from FILE [--check] [--allow-missing] [serve flags]
      prepare --data-dir (new or empty) so that 'meridian serve' with the
      same flags starts a one-node cluster holding the backup; further nodes
      join it as usual. The blob stores of the regions (--region-store or the
      config file) must hold every blob the backup lists. --check verifies
      the file and the stores only.

Blob bytes are not in the file: see docs/operations.md, "Backup and restore".
`

// backupCmd streams a backup from a node into FILE.tmp, verifies it whole,
// and only then renames it to FILE: a FILE that exists is complete.
func backupCmd(args []string) error {
	a := newAdminFlags("backup")
	a.fs.Usage = func() { fmt.Fprint(a.fs.Output(), backupUsage) }
	to := a.fs.String("to", "", "file to write the backup to (written as FILE.tmp, renamed when complete)")
	if err := a.fs.Set("timeout", "1h"); err != nil {
		return err
	}
	if err := flagsOnly(a, args, "backup"); err != nil {
		return err
	}
	if *to == "" {
		return errors.New("backup: --to FILE is required")
	}
	tmp := *to + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()

	c, ctx, done, err := a.dial()
	if err != nil {
		return err
	}
	defer done()
	start := time.Now()
	stream, err := c.Backup(ctx, &pb.BackupRequest{})
	if err != nil {
		return fmt.Errorf("backup through %s: %w", *a.addr, explainAdminError(err, *a.tlsCA != ""))
	}
	var written int64
	for {
		chunk, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("backup through %s (after %d bytes): %w", *a.addr, written, explainAdminError(err, *a.tlsCA != ""))
		}
		n, err := f.Write(chunk.Data)
		written += int64(n)
		if err != nil {
			return fmt.Errorf("backup: write %s: %w", tmp, err)
		}
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("backup: sync %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	ok = true
	// Read back what reached the disk: the node's checksum covers every byte.
	copies := 0
	hdr, err := scanBackupFile(tmp, consensus.BackupVisitor{Blob: func(*pb.BackupBlob) error { copies++; return nil }})
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("backup: the file received does not verify: %w", err)
	}
	if err := os.Rename(tmp, *to); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("backup: %w", err)
	}
	if err := syncDir(filepath.Dir(*to)); err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	describeBackup(hdr, copies)
	fmt.Printf("wrote %s (%d bytes) in %v\n", *to, written, time.Since(start).Round(time.Millisecond))
	return nil
}

func scanBackupFile(path string, v consensus.BackupVisitor) (*pb.BackupHeader, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	hdr, err := consensus.ScanBackup(f, v)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return hdr, nil
}

func describeBackup(hdr *pb.BackupHeader, copies int) {
	fmt.Printf("backup of cluster %s at Raft index %d (term %d), taken %s through %s (meridian %s)\n",
		hdr.ClusterId, hdr.RaftIndex, hdr.RaftTerm, time.Unix(0, hdr.TimeUnixNano).UTC().Format(time.RFC3339),
		hdr.NodeId, hdr.NodeVersion)
	fmt.Printf("state digest %s; regions %s; %d blob copies listed\n",
		hex.EncodeToString(hdr.StateDigest), strings.Join(hdr.Regions, ", "), copies)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// restoreFlags are restore's own flags; the rest are serve's.
type restoreFlags struct {
	from         string
	check        bool
	allowMissing bool
	workers      int
}

// restoreCmd verifies a backup and the blob stores, then prepares a data
// directory that `meridian serve` starts as a new one-node cluster.
func restoreCmd(args []string) error {
	var rf restoreFlags
	cfg, err := loadConfig("restore", args, append(serveOptions, trustOptions...), node.DefaultConfig(), func(fs *flag.FlagSet) {
		fs.Usage = func() { fmt.Fprint(fs.Output(), backupUsage+"\nFlags:\n"); fs.PrintDefaults() }
		fs.StringVar(&rf.from, "from", "", "backup file written by meridian backup")
		fs.BoolVar(&rf.check, "check", false, "verify the file and that the stores hold every listed blob; write nothing")
		fs.BoolVar(&rf.allowMissing, "allow-missing", false, "restore even when stores lack listed blobs (their images will not pull)")
		fs.IntVar(&rf.workers, "stat-workers", 16, "blobs checked in the stores at once")
	})
	if err != nil {
		return err
	}
	if rf.from == "" {
		return errors.New("restore: --from FILE is required")
	}
	if rf.workers < 1 {
		return errors.New("restore: --stat-workers must be at least 1")
	}
	if !rf.check {
		if err := cfg.Validate(); err != nil {
			return fmt.Errorf("restore: invalid configuration:\n%w", err)
		}
		if err := checkNewDataDir(cfg.DataDir); err != nil {
			return fmt.Errorf("restore: %w", err)
		}
	}

	byRegion := map[string][]*pb.BackupBlob{}
	copies := 0
	hdr, err := scanBackupFile(rf.from, consensus.BackupVisitor{Blob: func(b *pb.BackupBlob) error {
		byRegion[b.Region] = append(byRegion[b.Region], b)
		copies++
		return nil
	}})
	if err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	describeBackup(hdr, copies)

	ctx := context.Background()
	problems, bad := checkStores(ctx, cfg, byRegion, rf.workers)
	for _, p := range problems {
		fmt.Println(p)
	}
	switch {
	case len(problems) > 0 && rf.check:
		return fmt.Errorf("restore --check: %d of %d blob copies are missing or could not be checked (listed above)", bad, copies)
	case len(problems) > 0 && !rf.allowMissing:
		return fmt.Errorf("restore: %d of %d blob copies are missing or could not be checked (listed above): restore the stores from their own backups, "+
			"or pass --allow-missing to restore without them", bad, copies)
	case rf.check:
		fmt.Printf("%s verified; the stores hold all %d blob copies it lists\n", rf.from, copies)
		return nil
	case len(problems) > 0:
		fmt.Printf("restoring without %d blob copies (--allow-missing)\n", bad)
	}

	f, err := os.Open(rf.from)
	if err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	defer f.Close()
	raftAddr := cfg.AdvertiseRaft
	if raftAddr == "" {
		raftAddr = cfg.RaftAddr
	}
	logger := newLogger(cfg.LogLevel, cfg.LogFormat)
	if _, err := consensus.RestoreBackup(consensus.RestoreConfig{DataDir: cfg.DataDir, NodeID: cfg.NodeID, RaftAddr: raftAddr, Logger: logger}, f); err != nil {
		return fmt.Errorf("restore: %w", err)
	}
	fmt.Printf("restored into %s as node %s, the only voter of a new cluster; start it with 'meridian serve' and the same settings, "+
		"then join further nodes to it\n", cfg.DataDir, cfg.NodeID)
	return nil
}

// checkNewDataDir refuses a data directory that holds anything but the
// default blob directory (a cluster without --region-store keeps its
// blobs in DATA_DIR/blobs, which a restore may find in place).
func checkNewDataDir(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.Name() != "blobs" {
			return fmt.Errorf("data directory %s is not empty (it holds %s): restore only into a new one", dir, e.Name())
		}
	}
	return nil
}

// checkStores stats every listed blob in its region's store, workers at a
// time, and describes each copy that is missing, of another size, or
// cannot be checked (a whole region in one line), sorted; bad counts the
// copies.
func checkStores(ctx context.Context, cfg node.Config, byRegion map[string][]*pb.BackupBlob, workers int) (problems []string, bad int) {
	type job struct {
		d    replication.Driver
		blob *pb.BackupBlob
	}
	jobs := make(chan job)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				if p := statBlob(ctx, j.d, j.blob); p != "" {
					mu.Lock()
					problems = append(problems, p)
					bad++
					mu.Unlock()
				}
			}
		}()
	}
	stores := cfg.RegionStores()
	for _, region := range slices.Sorted(maps.Keys(byRegion)) {
		blobs := byRegion[region]
		i := slices.IndexFunc(stores, func(r node.RegionConfig) bool { return r.Name == region })
		var d replication.Driver
		var err error
		if i < 0 {
			err = errors.New("the region is not configured here")
		} else {
			d, err = openStoreForCheck(ctx, stores[i])
		}
		if err != nil {
			mu.Lock()
			problems = append(problems, fmt.Sprintf("UNCHECKED region %s: %d blob copies: %v", region, len(blobs), err))
			bad += len(blobs)
			mu.Unlock()
			continue
		}
		for _, b := range blobs {
			jobs <- job{d, b}
		}
	}
	close(jobs)
	wg.Wait()
	slices.Sort(problems)
	return problems, bad
}

func statBlob(ctx context.Context, d replication.Driver, b *pb.BackupBlob) string {
	size, err := d.Stat(ctx, digest.Digest(b.Digest))
	switch {
	case errors.Is(err, replication.ErrBlobNotFound):
		return fmt.Sprintf("MISSING %s in region %s (%d bytes)", b.Digest, b.Region, b.Size)
	case err != nil:
		return fmt.Sprintf("UNREADABLE %s in region %s: %v", b.Digest, b.Region, err)
	case size != b.Size:
		return fmt.Sprintf("WRONG SIZE %s in region %s: %d bytes, want %d", b.Digest, b.Region, size, b.Size)
	}
	return ""
}

// openStoreForCheck opens a region's store to read from it. A file://
// directory must already exist: a check creates no store.
func openStoreForCheck(ctx context.Context, rc node.RegionConfig) (replication.Driver, error) {
	if dir, ok := strings.CutPrefix(rc.Store, "file://"); ok {
		if _, err := os.Stat(dir); err != nil {
			return nil, fmt.Errorf("store %s: %w", replication.RedactStoreURL(rc.Store), err)
		}
	}
	return replication.OpenStore(ctx, replication.StoreConfig{Region: rc.Name, URL: rc.Store, AccessKey: rc.AccessKey, SecretKey: rc.SecretKey})
}
