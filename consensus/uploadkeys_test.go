package consensus

import (
	"bytes"
	"testing"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

func rotateKey(k []byte, at, retireBefore int64) *pb.LogEntry {
	return &pb.LogEntry{Version: LogVersion, TimeUnixNano: at, Command: &pb.LogEntry_RotateUploadKey{
		RotateUploadKey: &pb.RotateUploadKey{Key: k, RetireBeforeUnixNano: retireBefore}}}
}

// The ring starts from a cluster's first key (id 0), grows by one id per
// rotation, and drops a key once its successor was made before the
// rotation's retire time; a short key is refused.
func TestUploadKeyRing(t *testing.T) {
	h := newTestFSM(t)
	k := func(b byte) []byte { return bytes.Repeat([]byte{b}, 32) }
	h.mustApply(setUploadKey(k(1)))
	h.mustApply(rotateKey(k(2), 100, 0))
	h.mustApply(rotateKey(k(3), 200, 50))
	keys, err := h.store.UploadKeys(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	ids := func(keys []*pb.UploadKey) (out []uint32) {
		for _, k := range keys {
			out = append(out, k.Id)
		}
		return out
	}
	if got := ids(keys); len(got) != 3 || got[0] != 0 || got[2] != 2 || !bytes.Equal(keys[2].Key, k(3)) || keys[2].CreatedUnixNano != 200 {
		t.Fatalf("ring %v, want ids 0,1,2 with the newest key last", got)
	}
	// Key 0 was replaced at 100, key 1 at 200: retiring before 150 drops 0.
	h.mustApply(rotateKey(k(4), 300, 150))
	keys, _ = h.store.UploadKeys(t.Context())
	if got := ids(keys); len(got) != 3 || got[0] != 1 || got[2] != 3 {
		t.Fatalf("ring after retiring: %v, want 1,2,3", got)
	}
	if newest, _ := h.store.UploadKey(t.Context()); !bytes.Equal(newest, k(4)) {
		t.Error("UploadKey is not the newest key")
	}
	h.reject(rotateKey([]byte("short"), 400, 0), pb.ErrInvalidArgument)
	h.checkApplied()
}
