package node_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/meridian-registry/meridian/consensus"
	"github.com/meridian-registry/meridian/node/clustertest"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// backupFrom streams a backup from node i.
func backupFrom(ctx context.Context, t *testing.T, c *clustertest.Cluster, i int) ([]byte, error) {
	t.Helper()
	st, err := adminClient(t, c, i).Backup(ctx, &pb.BackupRequest{})
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	for {
		chunk, err := st.Recv()
		if errors.Is(err, io.EOF) {
			return buf.Bytes(), nil
		}
		if err != nil {
			return nil, err
		}
		buf.Write(chunk.Data)
	}
}

// A backup through a follower is linearizable: a follower cut off from the
// leader writes none (it could be missing an acknowledged push) and, once
// reconnected, writes one holding that push.
func TestBackupThroughAFollowerHoldsAcknowledgedWrites(t *testing.T) {
	c := clustertest.New(t, 3)
	ctx := within(t, 3*time.Minute)
	leader := mustLeader(t, ctx, c)
	follower := (leader + 1) % 3
	if err := c.WaitVoters(ctx, 3); err != nil {
		t.Fatal(err)
	}

	c.Cut(follower)
	img := randomImage(t, 512, 1)
	if err := remote.Write(ref(t, c, leader, "bk/app:v1"), img, remoteOpts(ctx, c)...); err != nil {
		t.Fatalf("push while a follower is cut off: %v", err)
	}
	short, cancel := context.WithTimeout(ctx, 5*time.Second)
	_, err := backupFrom(short, t, c, follower)
	cancel()
	if err == nil {
		t.Fatal("a follower cut off from the leader wrote a backup")
	}

	c.Heal(follower)
	var file []byte
	waitFor(t, ctx, "a backup through the reconnected follower", func() bool {
		file, err = backupFrom(ctx, t, c, follower)
		return err == nil
	})
	dir := filepath.Join(t.TempDir(), "restored")
	hdr, err := consensus.RestoreBackup(consensus.RestoreConfig{DataDir: dir, NodeID: "r", RaftAddr: "127.0.0.1:1"}, bytes.NewReader(file))
	if err != nil {
		t.Fatalf("RestoreBackup: %v", err)
	}
	if hdr.NodeId != c.Config(follower).NodeID || hdr.ReadIndex == 0 || hdr.RaftIndex == 0 {
		t.Fatalf("header %v", hdr)
	}
	store, err := consensus.OpenStore(filepath.Join(dir, "state"), slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	got, err := store.Tag(ctx, "bk/app", "v1")
	if want := mustDigest(t, img).String(); err != nil || got != want {
		t.Fatalf("the backup has bk/app:v1 at %q (%v), want %s", got, err, want)
	}
}
