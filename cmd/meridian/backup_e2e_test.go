package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"google.golang.org/protobuf/encoding/protojson"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// bke2eRun runs a meridian command with env and returns its combined output.
func bke2eRun(env []string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, e2eBinary, args...)
	cmd.Env = env
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

func bke2eMust(t *testing.T, args ...string) string {
	t.Helper()
	out, err := bke2eRun(e2eEnv(), args...)
	if err != nil {
		t.Fatalf("meridian %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// bke2eAcked is what the pushers had acknowledged, in order.
type bke2eAcked struct {
	mu   sync.Mutex
	refs []string
	imgs map[string]v1.Image
}

func (a *bke2eAcked) add(ref string, img v1.Image) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.refs = append(a.refs, ref)
	a.imgs[ref] = img
}

func (a *bke2eAcked) snapshot() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.refs)
}

// A backup taken while pushers run holds every image acknowledged before it
// began. The cluster is then destroyed (data directories gone, blob stores
// kept), restored from the file into a new one-node cluster that serves
// every such image byte for byte, takes new pushes, and lets a second node
// join; no member of the old cluster survives in it.
func TestBackupRestoreUnderLoad(t *testing.T) {
	e2eNeedBinary(t)
	dir := t.TempDir()
	regions := []string{
		"--region-store", "us-east=file://" + filepath.Join(dir, "blobs", "us-east"),
		"--region-store", "eu-west=file://" + filepath.Join(dir, "blobs", "eu-west"),
	}
	start := func(id, region, clusterID string, join *e2eProc) *e2eProc {
		args := slices.Concat([]string{"serve", "--node-id", id, "--region", region, "--cluster-id", clusterID,
			"--gossip-profile", "local", "--data-dir", filepath.Join(dir, id)}, e2eLoopback, regions)
		if join != nil {
			args = append(args, "--join", join.ready.GossipAddr)
		}
		p := gwe2eStart(t, id, dir, args...)
		p.waitWritten()
		return p
	}
	// Two nodes share us-east's store; n2 runs in eu-west.
	n0 := start("n0", "us-east", "old", nil)
	n1 := start("n1", "us-east", "old", n0)
	n2 := start("n2", "eu-west", "old", n0)
	for _, p := range []*e2eProc{n0, n1, n2} {
		p.waitReady()
	}

	acked := &bke2eAcked{imgs: map[string]v1.Image{}}
	ctx, stopPushing := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	pushErrs := make(chan error, 3)
	for w, p := range []*e2eProc{n0, n1, n0} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ctx.Err() == nil; i++ {
				img, err := random.Image(2048, 2)
				if err != nil {
					pushErrs <- err
					return
				}
				ref := fmt.Sprintf("load/p%d:t%d", w, i)
				if err := remote.Write(p.ref(ref), img, remote.WithContext(ctx)); err != nil {
					if ctx.Err() == nil {
						pushErrs <- fmt.Errorf("push %s: %w", ref, err)
					}
					return
				}
				acked.add(ref, img)
			}
		}()
	}
	defer func() { stopPushing(); wg.Wait() }()
	n0.poll("pushes acknowledged", time.Minute, func() error {
		if n := len(acked.snapshot()); n < 12 {
			return fmt.Errorf("%d pushes acknowledged", n)
		}
		return nil
	})

	file := filepath.Join(dir, "cluster.backup")
	before := acked.snapshot()
	out := bke2eMust(t, "backup", "--to", file, "--addr", n2.ready.GRPCAddr)
	t.Logf("backup with %d images acknowledged before it:\n%s", len(before), out)
	if !strings.Contains(out, "backup of cluster old at Raft index") {
		t.Fatalf("backup said:\n%s", out)
	}
	// The pushers keep going a little past the backup, then stop.
	n0.poll("pushes after the backup", time.Minute, func() error {
		if n := len(acked.snapshot()); n < len(before)+3 {
			return fmt.Errorf("%d pushes acknowledged", n)
		}
		return nil
	})
	stopPushing()
	wg.Wait()
	close(pushErrs)
	for err := range pushErrs {
		t.Fatal(err)
	}
	if _, err := os.Stat(file + ".tmp"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the backup left %s.tmp behind: %v", file, err)
	}

	// Destroy the cluster; keep the blob stores.
	for _, p := range []*e2eProc{n0, n1, n2} {
		p.kill()
		if err := os.RemoveAll(filepath.Join(dir, p.ready.NodeID)); err != nil {
			t.Fatal(err)
		}
	}

	restoreArgs := slices.Concat([]string{"restore", "--from", file, "--node-id", "r0", "--region", "us-east",
		"--cluster-id", "new", "--data-dir", filepath.Join(dir, "r0")}, e2eLoopback, regions)
	if out := bke2eMust(t, slices.Concat(restoreArgs, []string{"--check"})...); !strings.Contains(out, "verified") {
		t.Fatalf("restore --check said:\n%s", out)
	}
	if _, err := os.Stat(filepath.Join(dir, "r0")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("restore --check wrote the data directory: %v", err)
	}
	out = bke2eMust(t, restoreArgs...)
	t.Logf("restore:\n%s", out)

	r0 := start("r0", "us-east", "new", nil)
	r0.waitReady()
	for _, ref := range before {
		e2eCheckImage(t, r0.ref(ref), acked.imgs[ref])
	}

	// New pushes are applied after the backup's index, not skipped.
	fresh, _ := random.Image(2048, 2)
	if err := remote.Write(r0.ref("after/restore:v1"), fresh); err != nil {
		t.Fatalf("push to the restored cluster: %v", err)
	}
	e2eCheckImage(t, r0.ref("after/restore:v1"), fresh)

	// A second node joins, in the other region, and serves both.
	r1 := start("r1", "eu-west", "new", r0)
	r1.waitReady()
	e2eCheckImage(t, r1.ref("after/restore:v1"), fresh)
	e2eCheckImage(t, r1.ref(before[0]), acked.imgs[before[0]])
	r0.poll("r1 to be a voter", time.Minute, func() error {
		out, err := bke2eRun(e2eEnv(), "cluster", "status", "--json", "--addr", r0.ready.GRPCAddr)
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		st := &pb.ClusterStatusResponse{}
		if err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal([]byte(out), st); err != nil {
			return err
		}
		var ids []string
		for _, m := range st.Members {
			ids = append(ids, m.Id+"/"+m.Suffrage)
		}
		slices.Sort(ids)
		if !slices.Equal(ids, []string{"r0/voter", "r1/voter"}) {
			return fmt.Errorf("members %v, want r0 and r1 as voters and no one else", ids)
		}
		return nil
	})
}

// A restore names every blob the stores lack and refuses to go on without
// --allow-missing; a damaged backup file is refused with a clear error;
// a used data directory is never restored over; and a caller without
// admin credentials gets no backup.
func TestRestoreRefusesMissingBlobsAndDamagedFiles(t *testing.T) {
	e2eNeedBinary(t)
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	p := e2eServe(t, data)
	img, _ := random.Image(4096, 2)
	if err := remote.Write(p.ref("keep/app:v1"), img); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(dir, "b.backup")

	// Plaintext without credentials: refused, and no file is left.
	var env []string
	for _, kv := range e2eEnv() {
		if !strings.HasPrefix(kv, "MERIDIAN_USERNAME=") && !strings.HasPrefix(kv, "MERIDIAN_PASSWORD=") {
			env = append(env, kv)
		}
	}
	out, err := bke2eRun(env, "backup", "--to", file, "--addr", p.ready.GRPCAddr)
	if err == nil || !strings.Contains(out, "Unauthenticated") {
		t.Fatalf("backup without credentials: %v\n%s", err, out)
	}
	for _, f := range []string{file, file + ".tmp"} {
		if _, err := os.Stat(f); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("a refused backup left %s: %v", f, err)
		}
	}

	bke2eMust(t, "backup", "--to", file, "--addr", p.ready.GRPCAddr)
	p.stop()
	good, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	blobDir := filepath.Join(data, "blobs")
	restore := func(target string, extra ...string) (string, error) {
		return bke2eRun(e2eEnv(), slices.Concat([]string{"restore", "--node-id", "again", "--blob-dir", blobDir,
			"--data-dir", target}, e2eLoopback, extra)...)
	}

	t.Run("damaged files", func(t *testing.T) {
		flipped := slices.Clone(good)
		flipped[len(flipped)/2] ^= 1
		for name, b := range map[string][]byte{"cut short": good[:len(good)-20], "a byte changed": flipped, "no backup": []byte("hello")} {
			bad := filepath.Join(dir, strings.ReplaceAll(name, " ", "-"))
			if err := os.WriteFile(bad, b, 0o600); err != nil {
				t.Fatal(err)
			}
			target := filepath.Join(dir, "from-"+filepath.Base(bad))
			for _, extra := range [][]string{{"--from", bad, "--check"}, {"--from", bad}} {
				out, err := restore(target, extra...)
				if err == nil || !strings.Contains(out, "corrupt or truncated backup file") {
					t.Errorf("%s: restore %v: %v\n%s", name, extra, err, out)
				}
			}
			if _, err := os.Stat(target); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("%s: a refused restore created %s", name, target)
			}
		}
	})

	t.Run("used data directory", func(t *testing.T) {
		out, err := restore(data, "--from", file)
		if err == nil || !strings.Contains(out, "not empty") {
			t.Fatalf("restore into the node's own data directory: %v\n%s", err, out)
		}
	})

	t.Run("missing blob", func(t *testing.T) {
		layers, _ := img.Layers()
		gone, _ := layers[1].Digest()
		path := filepath.Join(blobDir, "blobs", gone.Algorithm, gone.Hex[:2], gone.Hex)
		if err := os.Remove(path); err != nil {
			t.Fatalf("remove a blob from the store: %v", err)
		}
		want := "MISSING " + gone.String() + " in region local"
		target := filepath.Join(dir, "restored")
		for _, extra := range [][]string{{"--from", file, "--check"}, {"--from", file}} {
			out, err := restore(target, extra...)
			if err == nil || !strings.Contains(out, want) || !strings.Contains(out, "1 of 3 blob copies") {
				t.Fatalf("restore %v with a blob gone: %v\n%s\nwant it to fail naming %q", extra, err, out, want)
			}
		}
		if _, err := os.Stat(filepath.Join(target, "state")); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("a refused restore wrote %s/state", target)
		}
		out, err := restore(target, "--from", file, "--allow-missing")
		if err != nil || !strings.Contains(out, want) || !strings.Contains(out, "restored into") {
			t.Fatalf("restore --allow-missing: %v\n%s", err, out)
		}
	})
}
