package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// TestLifecycleCLI drives immutability rules, a repository delete and
// garbage collection through the meridian binary against a real node, and
// checks the result where a user would: in the registry's answers and in
// the blob files on disk.
func TestLifecycleCLI(t *testing.T) {
	e2eNeedBinary(t)
	data := filepath.Join(t.TempDir(), "data")
	p := e2eServe(t, data)
	addr := "--addr=" + p.ready.GRPCAddr
	cli, mustCLI := adminCLI(t, addr)
	refuse := func(want string, args ...string) {
		t.Helper()
		out, err := cli(args...)
		if err == nil || !strings.Contains(out, want) {
			t.Fatalf("meridian %s: %v\n%s\nwant a refusal saying %q", strings.Join(args, " "), err, out, want)
		}
	}

	doomed, _ := random.Image(4096, 2)
	kept, _ := random.Image(4096, 1)
	other, _ := random.Image(1024, 1)
	if err := remote.Write(p.ref("life/app:v1"), doomed); err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(p.ref("life/kept:v1"), kept); err != nil {
		t.Fatal(err)
	}

	// Quotas: the tag limit refuses a third tag with the usage, and the
	// list shows what the covered repositories use.
	mustCLI("quota", "set", "--repositories", "life", "--max-tags", "2", "--max-bytes", "1GiB")
	tag, err := name.NewTag(p.ready.HTTPAddr+"/life/kept:v2", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	err = remote.Tag(tag, kept)
	if err == nil || !strings.Contains(err.Error(), "DENIED") || !strings.Contains(err.Error(), "quota exceeded: uses 2 of 2 tags") {
		t.Fatalf("a tag past the quota: %v; want DENIED with the usage", err)
	}
	if out := mustCLI("quota", "list"); !strings.Contains(out, "2 of 2") || !strings.Contains(out, "of 1.0 GiB") {
		t.Fatalf("quota list:\n%s", out)
	}
	refuse("at least one", "quota", "set", "--repositories", "x")
	refuse("--max-bytes", "quota", "set", "--repositories", "x", "--max-bytes", "lots")
	mustCLI("quota", "delete", "--repositories", "life")
	refuse("no quota", "quota", "delete", "--repositories", "life")

	// Immutable tags: a covered tag neither moves nor goes, nor does its
	// repository.
	mustCLI("immutable", "add", "--repositories", "life", "--tags", "v*")
	if out := mustCLI("immutable", "list"); !strings.Contains(out, "life") || !strings.Contains(out, "v*") {
		t.Fatalf("immutable list:\n%s", out)
	}
	err = remote.Write(p.ref("life/app:v1"), other)
	if err == nil || !strings.Contains(err.Error(), "DENIED") || !strings.Contains(err.Error(), "immutable") {
		t.Fatalf("overwriting an immutable tag: %v; want DENIED naming the rule", err)
	}
	refuse("immutable", "repo", "delete", "life/app")
	mustCLI("immutable", "delete", "--repositories", "life", "--tags", "v*")
	refuse("no immutability rule", "immutable", "delete", "--repositories", "life", "--tags", "v*")

	// Bad input reads clearly.
	refuse("invalid", "repo", "delete", "Not A Name")
	refuse("negative", "gc", "run", "--grace", "-1s")
	refuse("want run or status", "gc", "sweep")
	refuse("not found", "repo", "delete", "life/none")

	out := mustCLI("repo", "delete", "life/app")
	if !strings.Contains(out, "deleted repository life/app") {
		t.Fatalf("repo delete said:\n%s", out)
	}
	if resp, _ := p.do(http.MethodGet, "/v2/life/app/manifests/v1", nil, nil); resp.StatusCode != http.StatusNotFound {
		t.Fatalf("GET a deleted repository's tag: %d", resp.StatusCode)
	}

	// The refused push of other uploaded its blobs into life/app before
	// its manifest was refused: they go with the repository too.
	doomedBlobs := append(e2eImageBlobs(t, doomed), e2eImageBlobs(t, other)...)
	keptBlobs := e2eImageBlobs(t, kept)
	// A dry run lists the doomed blobs and frees nothing.
	out = mustCLI("gc", "run", "--dry-run", "--grace", "0s")
	for _, d := range doomedBlobs {
		if !strings.Contains(out, d) {
			t.Fatalf("dry run does not list %s:\n%s", d, out)
		}
	}
	for _, d := range keptBlobs {
		if strings.Contains(out, d) {
			t.Fatalf("dry run lists %s of a live image:\n%s", d, out)
		}
	}
	onDisk := e2eCheckBlobTree(t, data)
	for _, d := range doomedBlobs {
		if !onDisk[d] {
			t.Fatalf("the dry run removed %s", d)
		}
	}

	out = mustCLI("gc", "run", "--grace", "0s")
	if !strings.Contains(out, fmt.Sprintf("condemned %d blobs", len(doomedBlobs))) {
		t.Fatalf("gc run said:\n%s", out)
	}
	p.poll("the condemned blobs to leave the disk", time.Minute, func() error {
		onDisk := e2eCheckBlobTree(t, data)
		for _, d := range doomedBlobs {
			if onDisk[d] {
				return fmt.Errorf("%s still on disk", d)
			}
		}
		for _, d := range keptBlobs {
			if !onDisk[d] {
				t.Fatalf("gc removed %s of a live image", d)
			}
		}
		return nil
	})
	p.poll("gc status to show the region freed", 30*time.Second, func() error {
		var st struct {
			LastRun struct{ BlobsCondemned string } `json:"lastRun"`
			Regions []struct {
				Region                   string
				BlobsFreed, BlobsPending string
			}
		}
		out := mustCLI("gc", "status", "--json")
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			t.Fatalf("gc status --json: %v\n%s", err, out)
		}
		want := fmt.Sprint(len(doomedBlobs))
		if st.LastRun.BlobsCondemned != want || len(st.Regions) != 1 || st.Regions[0].BlobsFreed != want || st.Regions[0].BlobsPending != "0" {
			return fmt.Errorf("gc status: %+v", st)
		}
		return nil
	})
	if out := mustCLI("gc", "status"); !strings.Contains(out, "last run") || !strings.Contains(out, "REGION") {
		t.Fatalf("gc status:\n%s", out)
	}
	if err := remote.Write(p.ref("life/app:v1"), doomed); err != nil {
		t.Fatalf("pushing the collected image again: %v", err)
	}
	e2eCheckBlobTree(t, data)
}

// e2eImageBlobs lists the config and layer digests of img.
func e2eImageBlobs(t *testing.T, img v1.Image) []string {
	t.Helper()
	cfg, err := img.ConfigName()
	if err != nil {
		t.Fatal(err)
	}
	out := []string{cfg.String()}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		d, err := l.Digest()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, d.String())
	}
	return out
}

// TestRetentionCLI sets a retention rule with the meridian binary and runs
// it against a real node: the newest tag stays, as do a protected tag and
// a tag pulled recently (the pull reaches the state through the node's
// batched pull log); the rest goes, and the audit log names it.
func TestRetentionCLI(t *testing.T) {
	e2eNeedBinary(t)
	data := filepath.Join(t.TempDir(), "data")
	ready := filepath.Join(filepath.Dir(data), "data.ready.json")
	p := e2eStart(t, ready, e2eEnv(), slices.Concat([]string{"serve", "--data-dir", data, "--node-id", "e2e", "--ready-file", ready,
		"--gc-pull-resolution", "1s", "--gc-interval", "0"}, e2eLoopback)...)
	p.waitReady()
	addr := "--addr=" + p.ready.GRPCAddr
	cli, mustCLI := adminCLI(t, addr)
	for _, tag := range []string{"v1", "v2", "v3", "v4"} {
		img, _ := random.Image(1024, 1)
		if err := remote.Write(p.ref("ret/app:"+tag), img); err != nil {
			t.Fatal(err)
		}
	}
	// v1 is in use: pulled now.
	if _, err := remote.Get(p.ref("ret/app:v1")); err != nil {
		t.Fatal(err)
	}
	if out, err := cli("retention", "set", "--repositories", "ret"); err == nil || !strings.Contains(out, "--keep-tags") {
		t.Fatalf("a rule that keeps nothing in particular: %v\n%s", err, out)
	}
	mustCLI("retention", "set", "--repositories", "ret", "--keep-tags", "1", "--keep-pulled-within", "1h", "--protect", "v3")
	if out := mustCLI("retention", "list"); !strings.Contains(out, "ret") || !strings.Contains(out, "[v3]") {
		t.Fatalf("retention list:\n%s", out)
	}
	// The pull reaches the state within a second or two; until then v1
	// looks unused, so wait for the dry run to spare it.
	var dry string
	p.poll("the pull of v1 to be recorded", 30*time.Second, func() error {
		dry = mustCLI("retention", "run", "--dry-run")
		if strings.Contains(dry, "ret/app:v1") {
			return fmt.Errorf("dry run still deletes v1:\n%s", dry)
		}
		return nil
	})
	if !strings.Contains(dry, "ret/app:v2") || strings.Contains(dry, "ret/app:v3") || strings.Contains(dry, "ret/app:v4") ||
		!strings.Contains(dry, "would delete 1 tags") {
		t.Fatalf("dry run:\n%s", dry)
	}
	if resp, _ := p.do(http.MethodGet, "/v2/ret/app/manifests/v2", nil, nil); resp.StatusCode != http.StatusOK {
		t.Fatalf("the dry run deleted v2: %d", resp.StatusCode)
	}
	if out := mustCLI("retention", "run"); !strings.Contains(out, "deleted 1 tags and 1 manifests") {
		t.Fatalf("retention run:\n%s", out)
	}
	for tag, want := range map[string]int{"v1": 200, "v2": 404, "v3": 200, "v4": 200} {
		if resp, _ := p.do(http.MethodGet, "/v2/ret/app/manifests/"+tag, nil, nil); resp.StatusCode != want {
			t.Fatalf("GET ret/app:%s after retention = %d, want %d", tag, resp.StatusCode, want)
		}
	}
	if out := mustCLI("audit", "--since", "1h"); !strings.Contains(out, "apply_retention") || !strings.Contains(out, "ret/app:v2") {
		t.Fatalf("the audit log does not show the retention run:\n%s", out)
	}
}

// adminCLI runs meridian admin commands against addr (a --addr flag) with
// the harness's admin credentials: cli returns the combined output and
// the error, mustCLI fails the test on an error.
func adminCLI(t *testing.T, addr string) (cli func(args ...string) (string, error), mustCLI func(args ...string) string) {
	cli = func(args ...string) (string, error) {
		cmd := exec.Command(e2eBinary, append(args, addr)...)
		cmd.Env = e2eEnv()
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		err := cmd.Run()
		return out.String(), err
	}
	mustCLI = func(args ...string) string {
		t.Helper()
		out, err := cli(args...)
		if err != nil {
			t.Fatalf("meridian %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}
	return cli, mustCLI
}
