package node

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// A node closed and reopened on the same data directory (on new ports) serves
// everything it held, whether it was written before or after a Raft
// snapshot, and its replicated state is exactly what it was.
func TestRestartInProcess(t *testing.T) {
	dataDir := t.TempDir()
	inDir := func(c *Config) { c.DataDir = dataDir }
	n := startNode(t, inDir)

	before, err := random.Image(16<<10, 2)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(n.ref("restart/app:before"), before); err != nil {
		t.Fatalf("push: %v", err)
	}
	if err := n.Consensus().Raft().Snapshot().Error(); err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	after, err := random.Image(16<<10, 3)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(n.ref("restart/app:after"), after); err != nil {
		t.Fatalf("push: %v", err)
	}
	sum, applied, err := n.Consensus().Store().Digest()
	if err != nil {
		t.Fatal(err)
	}

	closeIdleClientConns()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := n.Close(ctx); err != nil {
		t.Fatalf("close: %v", err)
	}

	n = startNode(t, inDir)
	gotSum, gotApplied, err := n.Consensus().Store().Digest()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(gotSum, sum) {
		t.Errorf("state digest changed across the restart (applied index %d, then %d)", applied, gotApplied)
	}
	if gotApplied < applied {
		t.Errorf("applied index went back from %d to %d", applied, gotApplied)
	}
	checkImage(t, n.ref("restart/app:before"), before)
	checkImage(t, n.ref("restart/app:after"), after)

	// The reopened node takes writes.
	again, err := random.Image(16<<10, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(n.ref("restart/app:again"), again); err != nil {
		t.Fatalf("push after restart: %v", err)
	}
	checkImage(t, n.ref("restart/app:again"), again)
}
