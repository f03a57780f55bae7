package replication_test

import (
	"bytes"
	"context"
	"io"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
	"github.com/meridian-registry/meridian/replication"
)

type scrubRecords []*pb.BlobRecord

func (r scrubRecords) Blobs(_ context.Context, after string, limit int) ([]*pb.BlobRecord, error) {
	sorted := slices.SortedFunc(slices.Values(r), func(a, b *pb.BlobRecord) int { return strings.Compare(a.Digest, b.Digest) })
	var out []*pb.BlobRecord
	for _, b := range sorted {
		if b.Digest > after && len(out) < limit {
			out = append(out, b)
		}
	}
	return out, nil
}

func putBlob(t *testing.T, d replication.Driver, content []byte) digest.Digest {
	t.Helper()
	ctx := t.Context()
	id, err := d.StartUpload(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.WriteUpload(ctx, id, 0, bytes.NewReader(content)); err != nil {
		t.Fatal(err)
	}
	dgst := digest.FromBytes(content)
	if err := d.CommitUpload(ctx, id, int64(len(content)), dgst); err != nil {
		t.Fatal(err)
	}
	return dgst
}

// A copy whose bytes rotted (or were planted) is found, counted and
// replaced from the other region's verified copy; a copy no other region
// holds is reported unrepaired; a second pass finds nothing.
func TestScrubFindsAndRepairs(t *testing.T) {
	east, err := replication.NewFilesystem(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	west, err := replication.NewFilesystem(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	regions := replication.NewRegions("east")
	regions.Add("east", east)
	regions.Add("west", west)

	shared := bytes.Repeat([]byte("layer bytes "), 1000)
	only := bytes.Repeat([]byte("only in east "), 500)
	good := bytes.Repeat([]byte("untouched "), 300)
	dShared, dOnly, dGood := putBlob(t, east, shared), putBlob(t, east, only), putBlob(t, east, good)
	putBlob(t, west, shared)
	putBlob(t, west, good)
	recs := scrubRecords{
		{Digest: dShared.String(), Size: int64(len(shared)), Regions: []string{"east", "west"}},
		{Digest: dOnly.String(), Size: int64(len(only)), Regions: []string{"east"}},
		{Digest: dGood.String(), Size: int64(len(good)), Regions: []string{"east", "west"}},
	}
	// Damage east's copies in place, keeping their sizes.
	for _, d := range []digest.Digest{dShared, dOnly} {
		path := east.BlobFile(d)
		os.Chmod(path, 0o600)
		b, _ := os.ReadFile(path)
		b[len(b)/2] ^= 0xff
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}

	s, err := replication.NewScrubber(replication.ScrubConfig{Regions: regions, Source: recs})
	if err != nil {
		t.Fatal(err)
	}
	rep, err := s.Pass(t.Context(), nil, 0, false)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Checked != 5 || len(rep.Mismatches) != 2 {
		t.Fatalf("checked %d copies with %d mismatches %+v; want 5 and 2", rep.Checked, len(rep.Mismatches), rep.Mismatches)
	}
	for _, m := range rep.Mismatches {
		switch {
		case m.Region != "east":
			t.Errorf("mismatch reported in %s", m.Region)
		case m.Digest == dShared.String() && !m.Repaired:
			t.Errorf("the shared blob was not repaired: %s", m.Detail)
		case m.Digest == dOnly.String() && m.Repaired:
			t.Errorf("a blob no other region holds was reported repaired")
		}
	}
	rc, err := east.Open(t.Context(), dShared, 0)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(rc)
	rc.Close()
	if !bytes.Equal(got, shared) {
		t.Error("east still serves the damaged bytes of the shared blob")
	}
	rep, err = s.Pass(t.Context(), []string{"east"}, 0, false)
	if err != nil || rep.Checked != 3 || len(rep.Mismatches) != 1 || rep.Mismatches[0].Digest != dOnly.String() {
		t.Errorf("second pass over east: %+v, %v; want only the unrepairable blob", rep, err)
	}
}
