package consensus

import (
	"context"
	"encoding/binary"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

func setPolicyCmd(prefix string) *pb.Command {
	return &pb.Command{Intent: &pb.Command_SetPolicy{SetPolicy: &pb.SetPolicy{Policy: &pb.Policy{Prefix: prefix}}}}
}

// Entries are stamped with the format their command needs, not the
// binary's newest: a command of format 1 stays format 1 when a newer
// command exists, so older binaries keep applying it.
func TestEntryStampsTheCommandsVersion(t *testing.T) {
	defer OverrideCommandVersionForTest("set_policy", LogVersion+1)()
	now := time.Unix(1700000000, 0)
	put := &pb.Command{Intent: &pb.Command_DeleteTag{DeleteTag: &pb.DeleteTag{Repository: "r", Tag: "t"}}}
	for _, tc := range []struct {
		cmd  *pb.Command
		want uint32
	}{{put, 1}, {setPolicyCmd("x/"), LogVersion + 1}} {
		e, err := Entry(tc.cmd, nil, now)
		if err != nil {
			t.Fatal(err)
		}
		if e.Version != tc.want || CommandVersion(tc.cmd) != tc.want {
			t.Errorf("%T: entry version %d, CommandVersion %d, want %d", tc.cmd.Intent, e.Version, CommandVersion(tc.cmd), tc.want)
		}
	}
}

// fakeGossip stands in for the node's gossip in LogVersionOf: what each
// server advertises, absent when it is not alive.
type fakeGossip struct {
	mu       sync.Mutex
	versions map[string]uint32
}

func (g *fakeGossip) set(id string, v uint32) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if v == 0 {
		delete(g.versions, id)
		return
	}
	g.versions[id] = v
}

func (g *fakeGossip) logVersionOf(id string) (uint32, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	v, ok := g.versions[id]
	return v, ok
}

// The leader refuses an entry of a newer format while a server of the
// configuration does not advertise it (or cannot be asked), names the
// servers holding it back, commits nothing, keeps committing entries of
// format 1 meanwhile, and accepts the entry once every server applies it.
func TestLogFormatGate(t *testing.T) {
	defer OverrideCommandVersionForTest("set_policy", LogVersion+1)()
	gossip := &fakeGossip{versions: map[string]uint32{"node-1": LogVersion + 1, "node-2": 1}}
	n := startNode(t, t.TempDir(), func(c *Config) { c.LogVersionOf = gossip.logVersionOf })
	ctx, cancel := context.WithTimeout(context.Background(), nodeTestTimeout)
	defer cancel()

	// A second server in the configuration: a non-voter (so the leader
	// still commits alone) whose binary is older.
	gone := listenExcept(t, "")
	addr := gone.Addr().String()
	gone.Close()
	if err := n.AddServer(ctx, "node-2", addr, false); err != nil {
		t.Fatalf("AddServer: %v", err)
	}

	refused := func(want string) {
		t.Helper()
		_, err := n.Commit(ctx, setPolicyCmd("x/"), nil)
		if pb.CodeOf(err) != pb.Code_CODE_PRECONDITION_FAILED || !strings.Contains(err.Error(), fmt.Sprintf("log format %d", LogVersion+1)) ||
			!strings.Contains(err.Error(), want) {
			t.Fatalf("set_policy of format 2: %v, want PRECONDITION_FAILED naming %q", err, want)
		}
		if ps, err := n.Store().Policies(ctx); err != nil || len(ps) != 0 {
			t.Fatalf("after the refusal the store holds policies %v (%v)", ps, err)
		}
	}
	refused("node-2 (format 1)")
	gossip.set("node-2", 0)
	refused("node-2 (not alive in gossip)")

	// Format 1 commands do not wait for the upgrade: this one is applied
	// (and answers that there is no such tag).
	index, err := n.Commit(ctx, &pb.Command{Intent: &pb.Command_DeleteTag{DeleteTag: &pb.DeleteTag{Repository: "r", Tag: "t"}}}, nil)
	if index == 0 || pb.CodeOf(err) != pb.Code_CODE_MANIFEST_UNKNOWN {
		t.Fatalf("a format 1 command while node-2 is behind: index %d, %v", index, err)
	}

	gossip.set("node-2", LogVersion+1)
	if _, err := n.Commit(ctx, setPolicyCmd("x/"), nil); err != nil {
		t.Fatalf("set_policy once every server applies format 2: %v", err)
	}
	if ps, err := n.Store().Policies(ctx); err != nil || len(ps) != 1 || ps[0].Prefix != "x/" {
		t.Fatalf("policies after the commit: %v (%v)", ps, err)
	}
}

// A command that existed before its format was raised (an upload's link)
// still commits while a server cannot apply the new format: in format 1,
// without what format 1 lacks (the upload's fence). Once every server
// applies the format, it enters the log in it.
func TestLogFormatDegradesOlderCommands(t *testing.T) {
	gossip := &fakeGossip{versions: map[string]uint32{"node-1": LogVersion, "node-2": 1}}
	n := startNode(t, t.TempDir(), func(c *Config) { c.LogVersionOf = gossip.logVersionOf })
	ctx, cancel := context.WithTimeout(context.Background(), nodeTestTimeout)
	defer cancel()
	gone := listenExcept(t, "")
	addr := gone.Addr().String()
	gone.Close()
	if err := n.AddServer(ctx, "node-2", addr, false); err != nil {
		t.Fatalf("AddServer: %v", err)
	}
	format := func() uint64 {
		t.Helper()
		var v []byte
		if err := n.Store().read(func(db *pebble.DB) error {
			var err error
			v, _, err = get(db, key(tableLogFormat))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		if len(v) != 8 {
			return 1
		}
		return binary.BigEndian.Uint64(v)
	}
	link := &pb.LinkBlob{Repository: "r", Digest: "sha256:" + strings.Repeat("a", 64), Size: 1, PlacedRegion: "us", WrittenAfterIndex: 7}
	cmd := &pb.Command{Intent: &pb.Command_LinkBlob{LinkBlob: link}}
	if _, err := n.Commit(ctx, cmd, nil); err != nil {
		t.Fatalf("a link while node-2 applies format 1: %v", err)
	}
	if got := format(); got != 1 {
		t.Fatalf("log format after a link while node-2 is behind: %d, want 1", got)
	}
	if link.WrittenAfterIndex != 7 {
		t.Fatalf("degrading changed the caller's command: %+v", link)
	}
	gossip.set("node-2", LogVersion)
	if _, err := n.Commit(ctx, cmd, nil); err != nil {
		t.Fatalf("a link once every server applies format %d: %v", LogVersion, err)
	}
	if got := format(); got != uint64(LogVersion) {
		t.Fatalf("log format after the link: %d, want %d", got, LogVersion)
	}
}
