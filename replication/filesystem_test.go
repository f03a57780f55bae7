package replication_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/meridian-registry/meridian/replication"
	"github.com/meridian-registry/meridian/replication/drivertest"
)

func newFilesystem(tb testing.TB, root string) *replication.Filesystem {
	tb.Helper()
	d, err := replication.NewFilesystem(root)
	if err != nil {
		tb.Fatalf("NewFilesystem(%s): %v", root, err)
	}
	return d
}

func TestFilesystemConformance(t *testing.T) {
	drivertest.Run(t, func(t *testing.T) replication.Driver {
		return newFilesystem(t, t.TempDir())
	})
}

// TestFilesystemStaysUnderRoot drives every operation, with hostile ids and
// digests too, and checks that nothing outside root was created or changed.
func TestFilesystemStaysUnderRoot(t *testing.T) {
	ctx := t.Context()
	parent := t.TempDir()
	victim := filepath.Join(parent, "victim")
	if err := os.WriteFile(victim, []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(parent, "store")
	d := newFilesystem(t, root)

	content := []byte("layer bytes")
	dgst := digest.FromBytes(content)
	id := startWrite(t, d, content)
	if err := d.CommitUpload(ctx, id, int64(len(content)), dgst); err != nil {
		t.Fatal(err)
	}
	cancelled := startWrite(t, d, content)
	if err := d.CancelUpload(ctx, cancelled); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"../victim", "../../victim", "../store/uploads/" + id, victim, "a/b", "..", ""} {
		d.WriteUpload(ctx, bad, 0, strings.NewReader("evil"))
		d.UploadSize(ctx, bad)
		if rc, err := d.OpenUpload(ctx, bad); err == nil {
			rc.Close()
			t.Errorf("OpenUpload(%q) succeeded", bad)
		}
		d.CommitUpload(ctx, bad, 4, digest.FromString("evil"))
		d.CancelUpload(ctx, bad)
	}
	traversal := digest.Digest("sha256:../../../victim" + strings.Repeat("0", 64-len("../../../victim")))
	d.Stat(ctx, traversal)
	d.Delete(ctx, traversal)
	if _, err := d.PurgeUploads(ctx, time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}

	if b, err := os.ReadFile(victim); err != nil || string(b) != "keep" {
		t.Fatalf("file outside root changed: %q, %v", b, err)
	}
	err := filepath.WalkDir(parent, func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if path != parent && path != victim && path != root && !strings.HasPrefix(path, root+string(filepath.Separator)) {
			t.Errorf("created outside root: %s", path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestFilesystemLayout checks where committed blobs land and that commits and
// cancels leave nothing behind under uploads/.
func TestFilesystemLayout(t *testing.T) {
	ctx := t.Context()
	root := t.TempDir()
	d := newFilesystem(t, root)

	content := []byte("config bytes")
	dgst := digest.FromBytes(content)
	for range 2 { // the second commit of the same digest takes the dedupe path
		id := startWrite(t, d, content)
		if err := d.CommitUpload(ctx, id, int64(len(content)), dgst); err != nil {
			t.Fatal(err)
		}
	}
	sha512 := digest.SHA512.FromBytes(content)
	if err := d.CommitUpload(ctx, startWrite(t, d, content), int64(len(content)), sha512); err != nil {
		t.Fatal(err)
	}
	if err := d.CancelUpload(ctx, startWrite(t, d, content)); err != nil {
		t.Fatal(err)
	}

	if left, err := os.ReadDir(filepath.Join(root, "uploads")); err != nil || len(left) != 0 {
		t.Fatalf("uploads/ after commits and a cancel: %v, %v; want empty", left, err)
	}
	var files []string
	filepath.WalkDir(filepath.Join(root, "blobs"), func(path string, e fs.DirEntry, err error) error {
		if err == nil && !e.IsDir() {
			rel, _ := filepath.Rel(root, path)
			files = append(files, rel)
		}
		return err
	})
	want := []string{
		filepath.Join("blobs", "sha256", dgst.Encoded()[:2], dgst.Encoded()),
		filepath.Join("blobs", "sha512", sha512.Encoded()[:2], sha512.Encoded()),
	}
	if fmt.Sprint(files) != fmt.Sprint(want) {
		t.Fatalf("files under blobs/: %v; want %v", files, want)
	}
}

// TestFilesystemOpenIsFile guards the sendfile path: net/http only uses
// sendfile when the body it copies is an *os.File.
func TestFilesystemOpenIsFile(t *testing.T) {
	ctx := t.Context()
	d := newFilesystem(t, t.TempDir())
	content := bytes.Repeat([]byte("0123456789"), 1000)
	dgst := digest.FromBytes(content)
	if err := d.CommitUpload(ctx, startWrite(t, d, content), int64(len(content)), dgst); err != nil {
		t.Fatal(err)
	}
	rc, err := d.Open(ctx, dgst, 1234)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	f, ok := rc.(*os.File)
	if !ok {
		t.Fatalf("Open returned %T, want *os.File", rc)
	}
	if pos, err := f.Seek(0, io.SeekCurrent); err != nil || pos != 1234 {
		t.Fatalf("file position = %d, %v; want 1234", pos, err)
	}
}

// TestFilesystemUploadLock checks that a commit cannot slip in while a write
// to the same upload is still streaming, and proceeds once it ends.
func TestFilesystemUploadLock(t *testing.T) {
	ctx := t.Context()
	d := newFilesystem(t, t.TempDir())
	id, err := d.StartUpload(ctx)
	if err != nil {
		t.Fatal(err)
	}
	blocked := &blockingReader{reached: make(chan struct{}), release: make(chan struct{})}
	done := make(chan error, 1)
	go func() {
		r := io.MultiReader(strings.NewReader("first half "), blocked, strings.NewReader("second half"))
		_, err := d.WriteUpload(ctx, id, 0, r)
		done <- err
	}()
	<-blocked.reached // the write holds the upload and is waiting for more input

	dgst := digest.FromString("first half second half")
	short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	if err := d.CommitUpload(short, id, 22, dgst); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("CommitUpload during a write: got %v, want it to wait until its deadline", err)
	}
	close(blocked.release)
	if err := <-done; err != nil {
		t.Fatalf("WriteUpload: %v", err)
	}
	if err := d.CommitUpload(ctx, id, 22, dgst); err != nil {
		t.Fatalf("CommitUpload after the write: %v", err)
	}
}

// blockingReader stands for a slow client: its first Read signals reached
// and returns EOF once release is closed.
type blockingReader struct {
	reached, release chan struct{}
}

func (r *blockingReader) Read([]byte) (int, error) {
	close(r.reached)
	<-r.release
	return 0, io.EOF
}

func TestStorageErrorTranslation(t *testing.T) {
	tests := []struct {
		name string
		err  error
		full bool
	}{
		{"ENOSPC", &os.PathError{Op: "write", Path: "/data/uploads/abc", Err: syscall.ENOSPC}, true},
		{"EDQUOT", fmt.Errorf("commit: %w", &os.LinkError{Op: "rename", Old: "/a", New: "/b", Err: syscall.EDQUOT}), true},
		{"EIO", &os.PathError{Op: "write", Path: "/data/uploads/abc", Err: syscall.EIO}, false},
		{"other", errors.New("boom"), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := replication.StorageError(tt.err)
			if errors.Is(got, replication.ErrStorageFull) != tt.full {
				t.Fatalf("errors.Is(%v, ErrStorageFull) = %v, want %v", got, !tt.full, tt.full)
			}
			if !errors.Is(got, tt.err) {
				t.Fatalf("translation lost the cause: %v", got)
			}
			if !strings.Contains(got.Error(), tt.err.Error()) {
				t.Fatalf("message %q lost the cause %q", got, tt.err)
			}
		})
	}
	if replication.StorageError(nil) != nil {
		t.Fatal("StorageError(nil) != nil")
	}
}

// TestFilesystemDiskFull fills a 1 MiB tmpfs for real: the failed write must
// report ErrStorageFull and leave the upload as it was at its offset, and
// nothing partial may appear under blobs/.
func TestFilesystemDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=1m"); err != nil {
		t.Skipf("cannot mount a 1 MiB tmpfs here (%v); the translation itself is covered by TestStorageErrorTranslation", err)
	}
	t.Cleanup(func() { // runs before t.TempDir's removal
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	ctx := t.Context()
	d := newFilesystem(t, dir)

	content := make([]byte, 512<<10)
	rand.NewChaCha8([32]byte{1}).Read(content)
	id := startWrite(t, d, content)
	n, err := d.WriteUpload(ctx, id, int64(len(content)), io.LimitReader(zeros{}, 2<<20))
	if !errors.Is(err, replication.ErrStorageFull) || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write past the end of the disk: got %v, want ErrStorageFull wrapping ENOSPC", err)
	}
	if n != 0 {
		t.Errorf("failed write reported %d bytes written, want 0", n)
	}
	if size, err := d.UploadSize(ctx, id); err != nil || size != int64(len(content)) {
		t.Fatalf("after ENOSPC the upload holds %d bytes (%v), want %d as before the write", size, err, len(content))
	}
	// The space was given back and the upload is intact: it commits.
	dgst := digest.FromBytes(content)
	if err := d.CommitUpload(ctx, id, int64(len(content)), dgst); err != nil {
		t.Fatalf("CommitUpload after ENOSPC: %v", err)
	}
	rc, err := d.Open(ctx, dgst, 0)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.Equal(got, content) {
		t.Fatalf("blob committed after ENOSPC differs (%d bytes, %v)", len(got), err)
	}
	// A new upload that cannot fit fails cleanly too and leaves no blob.
	big := startWrite(t, d, nil)
	if _, err := d.WriteUpload(ctx, big, 0, io.LimitReader(zeros{}, 1<<20)); !errors.Is(err, replication.ErrStorageFull) {
		t.Fatalf("second write on a full disk: got %v, want ErrStorageFull", err)
	}
	if size, err := d.UploadSize(ctx, big); err != nil || size != 0 {
		t.Fatalf("upload after a failed first write holds %d bytes (%v), want 0", size, err)
	}
	entries, _ := filepath.Glob(filepath.Join(dir, "blobs", "*", "*", "*"))
	if len(entries) != 1 {
		t.Fatalf("blobs on disk: %v; want only %s", entries, dgst)
	}
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

func startWrite(t *testing.T, d replication.Driver, content []byte) string {
	t.Helper()
	id, err := d.StartUpload(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if n, err := d.WriteUpload(t.Context(), id, 0, bytes.NewReader(content)); err != nil || n != int64(len(content)) {
		t.Fatalf("WriteUpload = %d, %v", n, err)
	}
	return id
}

// BenchmarkFilesystemUpload measures the push hot path: stream 256 MiB into
// an upload and commit it (fsync, rename, fsync). Set TMPDIR to benchmark a
// particular disk.
func BenchmarkFilesystemUpload(b *testing.B) {
	const size = 256 << 20
	ctx := b.Context()
	d := newFilesystem(b, b.TempDir())
	pattern := make([]byte, 1<<20)
	rand.NewChaCha8([32]byte{2}).Read(pattern)
	b.SetBytes(size)
	b.ResetTimer()
	for i := range b.N {
		id, err := d.StartUpload(ctx)
		if err != nil {
			b.Fatal(err)
		}
		// Reads of 32 KiB, as from a request body, not the buffer size.
		r := io.LimitReader(&repeatReader{pattern: pattern, max: 32 << 10}, size)
		if n, err := d.WriteUpload(ctx, id, 0, r); err != nil || n != size {
			b.Fatalf("WriteUpload = %d, %v", n, err)
		}
		// The driver trusts the caller's digest; a distinct one per
		// iteration makes every commit a real fsync and rename.
		dgst := digest.FromString(strconv.Itoa(i))
		if err := d.CommitUpload(ctx, id, size, dgst); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if err := d.Delete(ctx, dgst); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}

// repeatReader returns pattern over and over, at most max bytes per Read.
type repeatReader struct {
	pattern []byte
	max     int
	off     int
}

func (r *repeatReader) Read(p []byte) (int, error) {
	n := copy(p[:min(len(p), r.max)], r.pattern[r.off:])
	r.off = (r.off + n) % len(r.pattern)
	return n, nil
}
