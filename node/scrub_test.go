package node_test

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// `meridian scrub` through any node re-hashes every region's copies: a
// copy whose bytes rotted in the directory region is found and replaced
// from an S3 region's verified copy, and the next pass finds nothing.
func TestGeoScrubRepairs(t *testing.T) {
	g := newGeo(t, nil, nil)
	ctx := within(t, 3*time.Minute)
	imgs := pushImages(t, ctx, g.c, 0, "scrub/app", 2)
	g.waitReplicated(t, ctx, 0)
	layer := imageBlobs(t, imgs[0])[1]

	// Damage ap-south's copy on disk, keeping its size.
	var root string
	for _, r := range g.regions {
		if r.Name == "ap-south" {
			root = strings.TrimPrefix(r.Store, "file://")
		}
	}
	var path string
	filepath.Walk(root, func(p string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() && info.Name() == layer.Encoded() {
			path = p
		}
		return nil
	})
	if path == "" {
		t.Fatalf("no file for %s under %s", layer, root)
	}
	good, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	bad := bytes.Clone(good)
	bad[len(bad)/3] ^= 0x5a
	os.Chmod(path, 0o600)
	if err := os.WriteFile(path, bad, 0o600); err != nil {
		t.Fatal(err)
	}

	cc := adminClient(t, g.c, 1)
	resp, err := cc.Scrub(ctx, &pb.ScrubRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Mismatches) != 1 || resp.Mismatches[0].Digest != layer.String() || resp.Mismatches[0].Region != "ap-south" || !resp.Mismatches[0].Repaired {
		t.Fatalf("scrub found %+v (checked %d); want ap-south's copy of %s, repaired", resp.Mismatches, resp.Checked, layer)
	}
	// Every blob of both images is in all three regions.
	if want := int64(3 * (len(imageBlobs(t, imgs[0])) + len(imageBlobs(t, imgs[1])))); resp.Checked < want {
		t.Errorf("checked %d copies, want at least %d", resp.Checked, want)
	}
	rc, err := g.store(t, "ap-south").Open(ctx, layer, 0)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(rc)
	rc.Close()
	if !bytes.Equal(got, good) {
		t.Error("ap-south still holds the damaged bytes")
	}
	again, err := cc.Scrub(ctx, &pb.ScrubRequest{Regions: []string{"ap-south"}})
	if err != nil || len(again.Mismatches) != 0 || again.Checked == 0 {
		t.Errorf("second pass: %+v, %v; want copies checked and no mismatch", again, err)
	}
	if _, err := cc.Scrub(ctx, &pb.ScrubRequest{Regions: []string{"mars"}}); err == nil {
		t.Error("scrub of an unknown region was accepted")
	}
}
