package replication

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"
)

// Filesystem is a Driver that keeps a region's blobs in a directory: a local
// disk when the region has one node, a shared mount otherwise.
//
// Layout under the root directory:
//
//	blobs/<alg>/<first two hex>/<hex>   committed blobs, never modified
//	uploads/<id>                        uploads in progress (the only temporary data)
//
// A blob appears under blobs/ only by renaming a complete upload that has been
// fsynced, and the rename is followed by an fsync of the directory, so a crash
// at any point leaves under blobs/ either nothing or the whole blob.
//
// Operations that change one upload (write, commit, purge) are serialized with
// flock(2) on the upload file, which also holds between processes sharing the
// directory (Linux maps flock to byte-range locks on NFS). Different uploads
// proceed in parallel.
type Filesystem struct {
	root    string
	blobs   string
	uploads string

	// syncedDirs holds the directories under blobs/ whose entries this
	// process has made durable (fsynced their parents), so each costs one
	// fsync per process instead of one per commit.
	syncedDirs sync.Map
}

var _ Driver = (*Filesystem)(nil)

const (
	// uploadIDBytes is the randomness of an upload id; ids are its lowercase
	// hex encoding, which is URL-safe and safe as a file name.
	uploadIDBytes = 16
	uploadIDLen   = 2 * uploadIDBytes

	// copyBufferSize is the size of the writes into an upload file. Buffered
	// writes reach the disk in the kernel's own sizes whatever this is; small
	// writes reuse warm page-cache pages, and 1 MiB writes measured up to 3x
	// slower on virtual machines that fault in cold memory.
	copyBufferSize = 64 << 10
	// writebackEvery starts the kernel writing an upload's bytes to disk as
	// they arrive, so the fsync at commit has little left to do.
	writebackEvery = 8 << 20
)

var copyBuffers = sync.Pool{New: func() any {
	b := make([]byte, copyBufferSize)
	return &b
}}

// NewFilesystem returns a Filesystem driver rooted at root, creating
// root/blobs and root/uploads if they do not exist.
func NewFilesystem(root string) (*Filesystem, error) {
	if root == "" {
		return nil, errors.New("replication: filesystem root is empty")
	}
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("replication: filesystem root: %w", err)
	}
	f := &Filesystem{
		root:    abs,
		blobs:   filepath.Join(abs, "blobs"),
		uploads: filepath.Join(abs, "uploads"),
	}
	for _, dir := range []string{f.blobs, f.uploads} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, storageError(fmt.Errorf("replication: filesystem root: %w", err))
		}
	}
	return f, nil
}

// Stat implements Driver.
func (f *Filesystem) Stat(ctx context.Context, dgst digest.Digest) (int64, error) {
	if err := checkDigest(dgst); err != nil {
		return 0, err
	}
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	_, path := f.blobPath(dgst)
	fi, err := os.Stat(path)
	if err != nil {
		return 0, blobError(dgst, err)
	}
	return fi.Size(), nil
}

// Open implements Driver. The reader is the *os.File itself, positioned at
// offset, so that io.Copy into an http.ResponseWriter uses sendfile.
func (f *Filesystem) Open(ctx context.Context, dgst digest.Digest, offset int64) (io.ReadCloser, error) {
	if err := checkDigest(dgst); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	_, path := f.blobPath(dgst)
	file, err := os.Open(path)
	if err != nil {
		return nil, blobError(dgst, err)
	}
	fi, err := file.Stat()
	if err != nil {
		file.Close()
		return nil, fmt.Errorf("replication: open blob %s: %w", dgst, err)
	}
	if offset < 0 || offset > fi.Size() {
		file.Close()
		return nil, fmt.Errorf("replication: open blob %s: offset %d outside its %d bytes", dgst, offset, fi.Size())
	}
	if _, err := file.Seek(offset, io.SeekStart); err != nil {
		file.Close()
		return nil, fmt.Errorf("replication: open blob %s: %w", dgst, err)
	}
	return file, nil
}

// Delete implements Driver.
func (f *Filesystem) Delete(ctx context.Context, dgst digest.Digest) error {
	if err := checkDigest(dgst); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	_, path := f.blobPath(dgst)
	if err := os.Remove(path); err != nil {
		return blobError(dgst, err)
	}
	return nil
}

// StartUpload implements Driver.
func (f *Filesystem) StartUpload(ctx context.Context) (string, error) {
	if err := ctx.Err(); err != nil {
		return "", err
	}
	var b [uploadIDBytes]byte
	rand.Read(b[:]) // never fails (crypto/rand, Go 1.24+)
	id := hex.EncodeToString(b[:])
	file, err := os.OpenFile(filepath.Join(f.uploads, id), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", storageError(fmt.Errorf("replication: start upload: %w", err))
	}
	if err := file.Close(); err != nil {
		return "", storageError(fmt.Errorf("replication: start upload: %w", err))
	}
	return id, nil
}

// WriteUpload implements Driver: append under the upload's lock, and on any
// failure truncate back to where the upload stood.
func (f *Filesystem) WriteUpload(ctx context.Context, id string, offset int64, r io.Reader) (int64, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	file, size, err := f.lockUpload(ctx, id)
	if err != nil {
		return 0, err
	}
	defer file.Close()
	if offset != size {
		return 0, fmt.Errorf("%w: write at %d, upload %s holds %d bytes", ErrUploadOffset, offset, id, size)
	}
	if _, err := file.Seek(offset, io.SeekStart); err != nil {
		return 0, fmt.Errorf("replication: write upload %s: %w", id, err)
	}
	n, werr, rerr := copyToFile(file, r)
	var failed error
	switch {
	case werr != nil:
		failed = storageError(fmt.Errorf("replication: write upload %s: %w", id, werr))
	case rerr != nil:
		failed = fmt.Errorf("replication: write upload %s: reading input failed after %d bytes, chunk dropped: %w", id, n, rerr)
	default:
		return n, nil
	}
	// A partial chunk is dropped, so the bytes the caller knows of (and has
	// hashed) stay exactly those the upload holds; if even that fails, the
	// upload goes and the client starts over.
	if err := file.Truncate(offset); err != nil {
		os.Remove(file.Name())
		return 0, fmt.Errorf("%w (upload removed: %w)", failed, err)
	}
	return 0, failed
}

// UploadSize implements Driver.
func (f *Filesystem) UploadSize(ctx context.Context, id string) (int64, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	path, err := f.uploadPath(id)
	if err != nil {
		return 0, err
	}
	fi, err := os.Stat(path)
	if err != nil {
		return 0, uploadError(id, err)
	}
	return fi.Size(), nil
}

// OpenUpload implements Driver.
func (f *Filesystem) OpenUpload(ctx context.Context, id string) (io.ReadCloser, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	path, err := f.uploadPath(id)
	if err != nil {
		return nil, err
	}
	file, err := os.Open(path)
	if err != nil {
		return nil, uploadError(id, err)
	}
	return file, nil
}

// CommitUpload implements Driver: check the upload holds exactly size bytes,
// fsync it, rename it into blobs/, fsync the blob's directory.
func (f *Filesystem) CommitUpload(ctx context.Context, id string, size int64, dgst digest.Digest) error {
	if err := checkDigest(dgst); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	file, held, err := f.lockUpload(ctx, id)
	if err != nil {
		return err
	}
	defer file.Close()
	if held != size {
		return fmt.Errorf("%w: commit of %d bytes, upload %s holds %d", ErrUploadOffset, size, id, held)
	}
	dir, dst := f.blobPath(dgst)
	if err := f.ensureDir(dir); err != nil {
		return storageError(fmt.Errorf("replication: commit upload %s: %w", id, err))
	}
	if fi, err := os.Stat(dst); err == nil && fi.Mode().IsRegular() && fi.Size() == size && fileHashesTo(dst, dgst) {
		return f.commitExisting(id, file.Name(), dir)
	}
	// Absent, or present with other bytes than its name says: the upload's
	// bytes, which the caller hashed, take the name.
	if err := file.Sync(); err != nil {
		// After a failed fsync the kernel may have dropped the dirty pages
		// while reporting later fsyncs as successful: the upload's bytes
		// can no longer be trusted, so it goes and the client starts over.
		os.Remove(file.Name())
		return storageError(fmt.Errorf("replication: commit upload %s (upload removed): %w", id, err))
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := os.Rename(file.Name(), dst); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			// Cancelled or purged while we held the lock.
			return fmt.Errorf("%w: %s", ErrUploadNotFound, id)
		}
		return storageError(fmt.Errorf("replication: commit upload %s: %w", id, err))
	}
	if err := syncDir(dir); err != nil {
		return storageError(fmt.Errorf("replication: commit upload %s: blob %s is in place but may not survive a crash: %w", id, dgst, err))
	}
	return nil
}

// fileHashesTo reports whether the file at path holds the bytes of dgst.
// A commit reads an existing blob once before keeping it: bytes are
// trusted only after they were hashed, and a name is not a hash.
func fileHashesTo(path string, dgst digest.Digest) bool {
	file, err := os.Open(path)
	if err != nil {
		return false
	}
	defer file.Close()
	v := dgst.Verifier()
	_, err = io.Copy(v, file)
	return err == nil && v.Verified()
}

// commitExisting finishes a commit whose blob is already present and verified: its bytes
// are identical (content-addressed) and were fsynced before they were renamed
// into place, so only the directory entry, which a concurrent commit may not
// have synced yet, needs to be made durable. This skips an fsync of the whole
// upload when a layer is pushed again.
func (f *Filesystem) commitExisting(id, uploadPath, dir string) error {
	if err := syncDir(dir); err != nil {
		return storageError(fmt.Errorf("replication: commit upload %s: %w", id, err))
	}
	if err := os.Remove(uploadPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("replication: commit upload %s: blob is in place, removing the upload: %w", id, err)
	}
	return nil
}

// CancelUpload implements Driver. It does not wait for a write in progress on
// the upload: that write ends in an unlinked file and the upload is gone.
func (f *Filesystem) CancelUpload(ctx context.Context, id string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	path, err := f.uploadPath(id)
	if err != nil {
		return err
	}
	if err := os.Remove(path); err != nil {
		return uploadError(id, err)
	}
	return nil
}

// PurgeUploads implements Driver, using the upload file's modification time.
// Uploads locked by a write or commit in progress are skipped.
func (f *Filesystem) PurgeUploads(ctx context.Context, olderThan time.Time) (int, error) {
	dir, err := os.Open(f.uploads)
	if err != nil {
		return 0, fmt.Errorf("replication: purge uploads: %w", err)
	}
	defer dir.Close()
	removed := 0
	for {
		if err := ctx.Err(); err != nil {
			return removed, err
		}
		entries, rerr := dir.ReadDir(1024)
		for _, e := range entries {
			if !validUploadID(e.Name()) || !e.Type().IsRegular() {
				continue
			}
			ok, err := purgeUpload(filepath.Join(f.uploads, e.Name()), olderThan)
			if err != nil {
				return removed, fmt.Errorf("replication: purge uploads: %w", err)
			}
			if ok {
				removed++
			}
		}
		if rerr == io.EOF {
			return removed, nil
		}
		if rerr != nil {
			return removed, fmt.Errorf("replication: purge uploads: %w", rerr)
		}
	}
}

// purgeUpload removes the upload at path if nobody holds it and it was last
// written before olderThan.
func purgeUpload(path string, olderThan time.Time) (bool, error) {
	file, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	defer file.Close()
	if err := flock(file, syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return false, nil // in use right now, so not stale
		}
		return false, err
	}
	fi, err := file.Stat()
	if err != nil {
		return false, err
	}
	if !fi.ModTime().Before(olderThan) || !samePath(path, fi) {
		return false, nil
	}
	if err := os.Remove(path); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return false, nil
		}
		return false, err
	}
	return true, nil
}

// lockUpload opens upload id for writing, waits for an exclusive lock on it,
// and returns it with its size. Closing the file releases the lock.
func (f *Filesystem) lockUpload(ctx context.Context, id string) (*os.File, int64, error) {
	path, err := f.uploadPath(id)
	if err != nil {
		return nil, 0, err
	}
	file, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, 0, uploadError(id, err)
	}
	if err := lockWait(ctx, file); err != nil {
		file.Close()
		return nil, 0, fmt.Errorf("replication: lock upload %s: %w", id, err)
	}
	fi, err := file.Stat()
	if err != nil {
		file.Close()
		return nil, 0, fmt.Errorf("replication: upload %s: %w", id, err)
	}
	// A commit, cancel or purge may have moved or removed the file while we
	// waited; the lock then guards nothing that the id still names.
	if !samePath(path, fi) {
		file.Close()
		return nil, 0, fmt.Errorf("%w: %s", ErrUploadNotFound, id)
	}
	return file, fi.Size(), nil
}

// lockWait takes an exclusive flock on file, polling so that a cancelled
// context ends the wait (a blocking flock cannot be interrupted).
func lockWait(ctx context.Context, file *os.File) error {
	delay := time.Millisecond
	for {
		err := flock(file, syscall.LOCK_EX|syscall.LOCK_NB)
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			return err
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		delay = min(2*delay, 50*time.Millisecond)
	}
}

func flock(file *os.File, how int) error {
	for {
		err := syscall.Flock(int(file.Fd()), how)
		if !errors.Is(err, syscall.EINTR) {
			return err
		}
	}
}

// samePath reports whether path still names the file described by fi.
func samePath(path string, fi fs.FileInfo) bool {
	pi, err := os.Lstat(path)
	return err == nil && os.SameFile(fi, pi)
}

// copyToFile copies r to file through a pooled buffer, filling the buffer
// before each write so that the disk sees large sequential writes however
// small the reads are. It reports the bytes written and separates the store's
// error (werr) from the reader's (rerr).
func copyToFile(file *os.File, r io.Reader) (written int64, werr, rerr error) {
	bp := copyBuffers.Get().(*[]byte)
	defer copyBuffers.Put(bp)
	buf := *bp
	start, _ := file.Seek(0, io.SeekCurrent)
	flushed := start
	for {
		if pos := start + written; pos-flushed >= writebackEvery {
			startWriteback(file, flushed, pos-flushed)
			flushed = pos
		}
		n := 0
		for n < len(buf) && rerr == nil {
			var m int
			m, rerr = r.Read(buf[n:])
			n += m
		}
		if n > 0 {
			m, err := file.Write(buf[:n])
			written += int64(m)
			if err != nil {
				return written, err, nil
			}
		}
		if rerr == io.EOF {
			return written, nil, nil
		}
		if rerr != nil {
			return written, nil, rerr
		}
	}
}

// ensureDir creates dir (a directory under blobs/) if needed and makes its
// entry, and those of its ancestors up to the root, durable.
func (f *Filesystem) ensureDir(dir string) error {
	if _, ok := f.syncedDirs.Load(dir); ok {
		return nil
	}
	parent := filepath.Dir(dir)
	if dir != f.blobs {
		if err := f.ensureDir(parent); err != nil {
			return err
		}
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	if err := syncDir(parent); err != nil {
		return err
	}
	f.syncedDirs.Store(dir, struct{}{})
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// blobPath returns the directory and file of a blob; dgst must have passed
// checkDigest, so its encoded part is lowercase hex.
func (f *Filesystem) blobPath(dgst digest.Digest) (dir, file string) {
	enc := dgst.Encoded()
	dir = filepath.Join(f.blobs, dgst.Algorithm().String(), enc[:2])
	return dir, filepath.Join(dir, enc)
}

// uploadPath returns the file of upload id, or ErrUploadNotFound if id is not
// something StartUpload could have returned: the check is what keeps ids such
// as "../x" from naming anything outside uploads/.
func (f *Filesystem) uploadPath(id string) (string, error) {
	if !validUploadID(id) {
		return "", fmt.Errorf("%w: malformed id %q", ErrUploadNotFound, id)
	}
	return filepath.Join(f.uploads, id), nil
}

func validUploadID(id string) bool {
	if len(id) != uploadIDLen {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

func blobError(dgst digest.Digest, err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%w: %s", ErrBlobNotFound, dgst)
	}
	return storageError(fmt.Errorf("replication: blob %s: %w", dgst, err))
}

func uploadError(id string, err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%w: %s", ErrUploadNotFound, id)
	}
	return storageError(fmt.Errorf("replication: upload %s: %w", id, err))
}
