package consensus

import (
	"errors"
	"testing"
	"time"

	"google.golang.org/protobuf/reflect/protoreflect"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// Every intent a Command can carry becomes an entry of its command's
// format version with the proposer's time, whose command the FSM applies; an
// empty command becomes nothing.
func TestEntryCoversEveryIntent(t *testing.T) {
	now := time.Unix(1700000000, 42)
	oneof := (&pb.Command{}).ProtoReflect().Descriptor().Oneofs().ByName("intent")
	fields := oneof.Fields()
	for i := range fields.Len() {
		f := fields.Get(i)
		cmd := &pb.Command{}
		m := cmd.ProtoReflect()
		m.Set(f, protoreflect.ValueOfMessage(m.NewField(f).Message()))
		e, err := Entry(cmd, nil, now)
		if err != nil {
			t.Errorf("%s: %v", f.Name(), err)
			continue
		}
		if e.Version != CommandVersion(cmd) || e.TimeUnixNano != now.UnixNano() || e.Command == nil {
			t.Errorf("%s: entry %v", f.Name(), e)
		}
		// The entry's command is the same message under the same name.
		got := e.ProtoReflect().WhichOneof(e.ProtoReflect().Descriptor().Oneofs().ByName("command"))
		if got == nil || got.Name() != f.Name() {
			t.Errorf("%s became %v", f.Name(), got)
		}
	}
	if _, err := Entry(&pb.Command{}, nil, now); !errors.Is(err, pb.ErrInvalidArgument) {
		t.Errorf("empty command: %v, want ErrInvalidArgument", err)
	}
}
