package chaos

import (
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// cliJSON is m as `meridian gc … --json` prints it.
func cliJSON(t *testing.T, m proto.Message) []byte {
	t.Helper()
	b, err := protojson.MarshalOptions{Multiline: true, EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestGCJSON: the harness reads what `meridian gc run --json` and
// `meridian gc status --json` print: a run's outcome, the removals each
// region has left, and whether the answering node has applied the run.
func TestGCJSON(t *testing.T) {
	run, err := parseGCRun(cliJSON(t, &pb.RunGCResponse{
		RunId: "r1", Blobs: []*pb.GCBlob{{Digest: testDigest("b"), Size: 300, Condemned: true}},
		Run:           &pb.GCRun{RunId: "r1", StartedUnixNano: 1000, Candidates: 4, BlobsCondemned: 2, BytesCondemned: 300, LinksDropped: 3},
		DurationNanos: int64(45 * time.Millisecond),
	}))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := run.String(), "run r1: 4 candidates, 3 links dropped, 2 blobs condemned (300 bytes) in 45ms"; got != want {
		t.Fatalf("%q, want %q", got, want)
	}
	if _, err := parseGCRun(cliJSON(t, &pb.RunGCResponse{DryRun: true})); err == nil {
		t.Fatal("a run without an id was taken for a run")
	}

	status := cliJSON(t, &pb.GCStatusResponse{
		LastRun: &pb.GCRun{RunId: "r1", StartedUnixNano: 5000},
		Regions: []*pb.GCRegion{{Region: "us-east", BlobsPending: 2, BytesPending: 10}, {Region: "eu-west", BlobsFreed: 7}},
	})
	pending, current, err := gcPending(status, 5000)
	if err != nil || !current || len(pending) != 2 || pending["us-east"] != 2 || pending["eu-west"] != 0 {
		t.Fatalf("pending %v, current %v, err %v", pending, current, err)
	}
	if _, current, _ := gcPending(status, 5001); current {
		t.Fatal("a run that began before the harness sent its own counted as applied")
	}
	if _, current, _ := gcPending(cliJSON(t, &pb.GCStatusResponse{}), 1); current {
		t.Fatal("a node that never ran a collection counted as current")
	}
}
