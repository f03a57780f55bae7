package consensus

import (
	"encoding/binary"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync/atomic"

	"github.com/cockroachdb/pebble/v2"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// Log format versions, and the gate that keeps a mixed cluster applying
// the same log.
//
// An entry carries the format its command needs, not the newest format of
// the binary that proposed it: commands that exist since format 1 are
// stamped 1 forever, so a node of an older release keeps applying every
// entry except those of commands added after it. A release that adds a
// command older binaries cannot apply raises LogVersion and lists the
// command in commandVersions with that version. The leader proposes such an
// entry only once every server of the Raft configuration advertises (in
// gossip) that it applies the format; until then the change is refused, and
// the rolling upgrade must finish first.

// commandVersions maps a LogEntry command (its oneof field name, which is
// also the Command intent's) to the first log format that can apply it.
// A command not listed needs format 1.
var commandVersions = map[string]uint32{
	// Format 2: webhooks (webhooks.go). Releases before them panic on these
	// entries, so a cluster takes its first webhook once every node runs a
	// release that has them.
	"put_webhook":         2,
	"delete_webhook":      2,
	"webhook_progress":    2,
	"replay_dead_letters": 2,
	// Format 3: an upload's link carries written_after_index and the last
	// removal of a blob leaves its index (lifecycle.go), so a push cannot
	// link bytes that garbage collection deleted under it. Both commands
	// existed before: see degradableCommands.
	"link_blob":    3,
	"blob_removed": 3,
}

// degradableCommands existed before the format listed for them added a
// safeguard. While a server cannot apply that format they enter the log in
// format 1, as older releases wrote them, rather than being refused: a
// rolling upgrade must not stop pushes or garbage collection.
var degradableCommands = map[protoreflect.Name]bool{"link_blob": true, "blob_removed": true}

// degrade rewrites e in format 1 when its command allows it, dropping what
// format 1 does not have; it reports whether it did.
func degrade(e *pb.LogEntry) bool {
	which := e.ProtoReflect().WhichOneof(commandOneof)
	if which == nil || !degradableCommands[which.Name()] || e.Version <= 1 {
		return false
	}
	e.Version = 1
	if l := e.GetLinkBlob(); l != nil && l.WrittenAfterIndex != 0 {
		l = proto.Clone(l).(*pb.LinkBlob)
		l.WrittenAfterIndex = 0
		e.Command = &pb.LogEntry_LinkBlob{LinkBlob: l}
	}
	return true
}

// followUpCommands need a newer format but act on something whose creation
// already passed the gate (a webhook's progress, replay or delete: every
// server applied format 2 when the webhook went in). They are not gated
// again, so a server that is down does not stall delivery.
var followUpCommands = map[protoreflect.Name]bool{
	"webhook_progress": true, "replay_dead_letters": true, "delete_webhook": true,
}

// versionTable is what entries are stamped and checked against; tests swap
// it (OverrideCommandVersionForTest) while nodes may be running.
type versionTable struct {
	commands map[string]uint32
	// applies is the newest format Apply accepts: LogVersion.
	applies uint32
}

var versions atomic.Pointer[versionTable]

func init() {
	versions.Store(&versionTable{commands: commandVersions, applies: LogVersion})
}

func (t *versionTable) of(command protoreflect.Name) uint32 {
	if v, ok := t.commands[string(command)]; ok {
		return v
	}
	return 1
}

// CommandVersion is the log format an entry of cmd is stamped with: 1 for
// a command every release applies, more for one added later (Entry stamps
// it; propose refuses it while a server cannot apply it).
func CommandVersion(cmd *pb.Command) uint32 {
	f := cmd.ProtoReflect().WhichOneof(intentOneof)
	if f == nil {
		return 1
	}
	return versions.Load().of(f.Name())
}

var intentOneof = (&pb.Command{}).ProtoReflect().Descriptor().Oneofs().ByName("intent")

// entryVersion is the format e's command needs.
func entryVersion(e *pb.LogEntry) uint32 {
	which := e.ProtoReflect().WhichOneof(commandOneof)
	if which == nil {
		return 1
	}
	return versions.Load().of(which.Name())
}

// appliesUpTo is the newest format this process applies: LogVersion.
func appliesUpTo() uint32 { return versions.Load().applies }

// OverrideCommandVersionForTest makes entries of command (a LogEntry oneof
// field name, such as "set_policy") need log format version, and lets
// this process apply up to that format, as a binary of a newer release
// would. It exists so that tests can exercise the format gate with a
// command that needs a newer format; it returns the function that undoes
// it. Nothing else may call it.
func OverrideCommandVersionForTest(command string, version uint32) (restore func()) {
	if commandOneof.Fields().ByName(protoreflect.Name(command)) == nil {
		panic(fmt.Sprintf("consensus: no log command %q", command))
	}
	old := versions.Load()
	t := &versionTable{commands: maps.Clone(old.commands), applies: max(old.applies, version)}
	t.commands[command] = version
	versions.Store(t)
	return func() { versions.Store(old) }
}

// checkLogFormat refuses entry e, of a format above 1, unless every server
// of the Raft configuration applies it, as far as Config.LogVersionOf
// knows. Only the leader proposes, so the check runs where the entry would
// enter the log, whichever node the change came through.
func (n *Node) checkLogFormat(e *pb.LogEntry) error {
	need := e.Version
	if which := e.ProtoReflect().WhichOneof(commandOneof); need <= 1 || which != nil && followUpCommands[which.Name()] {
		return nil
	}
	servers, err := n.Servers()
	if err != nil {
		return fmt.Errorf("%w: read the Raft configuration: %v", pb.ErrUnavailable, err)
	}
	var behind []string
	for _, s := range servers {
		v, ok := uint32(1), true
		if n.cfg.LogVersionOf != nil {
			v, ok = n.cfg.LogVersionOf(s.ID)
		}
		switch {
		case !ok:
			behind = append(behind, s.ID+" (not alive in gossip)")
		case v < need:
			behind = append(behind, fmt.Sprintf("%s (format %d)", s.ID, max(v, 1)))
		}
	}
	if len(behind) == 0 {
		return nil
	}
	slices.Sort(behind)
	return pb.Errorf(pb.Code_CODE_PRECONDITION_FAILED,
		"this change needs log format %d on every node of the Raft configuration; %s still run an older Meridian or cannot be asked (finish the rolling upgrade first)",
		need, strings.Join(behind, ", "))
}

// noteLogFormat records the newest format an applied entry had: a server
// of an older release must not join a log holding entries it cannot apply.
func noteLogFormat(b *pebble.Batch, version uint32) error {
	if version <= 1 {
		return nil
	}
	v, ok, err := get(b, key(tableLogFormat))
	if err != nil || ok && len(v) == 8 && binary.BigEndian.Uint64(v) >= uint64(version) {
		return err
	}
	return b.Set(key(tableLogFormat), encodeUint64s(uint64(version)), nil)
}

// NewestLogFormat is the newest log format among the entries applied so
// far (1 when none needed more).
func (s *Store) NewestLogFormat() (uint32, error) {
	v := uint32(1)
	err := s.read(func(db *pebble.DB) error {
		b, ok, err := get(db, key(tableLogFormat))
		if err == nil && ok && len(b) == 8 {
			v = uint32(binary.BigEndian.Uint64(b))
		}
		return err
	})
	return v, err
}
