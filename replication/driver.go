package replication

import (
	"context"
	_ "crypto/sha256" // registers sha256 so digest.Digest.Validate accepts it
	_ "crypto/sha512" // registers sha512 so digest.Digest.Validate accepts it
	"errors"
	"fmt"
	"io"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"
)

// Driver stores blob bytes for one region.
//
// A blob becomes visible only through CommitUpload, which the caller invokes
// after verifying the upload's digest; until then its bytes live in an upload
// that no reader can see. Implementations must be safe for concurrent use and
// must stream: no method may buffer a whole blob in memory. Errors are the
// sentinels below (tested with errors.Is), wrapped with context, or a backend
// error that has no domain meaning. Every implementation must pass
// drivertest.Run.
type Driver interface {
	// Stat returns the size of a committed blob, or ErrBlobNotFound.
	Stat(ctx context.Context, dgst digest.Digest) (int64, error)

	// Open returns the blob's bytes from offset to the end. An offset equal
	// to the size gives an empty reader; a larger or negative one is an
	// error. Filesystem: the reader is an *os.File positioned at offset, so
	// net/http can use sendfile.
	Open(ctx context.Context, dgst digest.Digest, offset int64) (io.ReadCloser, error)

	// Delete removes a committed blob (ErrBlobNotFound if absent).
	Delete(ctx context.Context, dgst digest.Digest) error

	// StartUpload creates an empty upload and returns its opaque id
	// (URL-safe, unguessable: 128 random bits).
	StartUpload(ctx context.Context) (string, error)

	// WriteUpload writes r into upload id starting at offset and returns the
	// number of bytes written.
	//
	// Bytes the upload already holds at or past offset (left by an earlier
	// request that failed after writing) are discarded first, so retrying a
	// chunk with the same offset is idempotent. ErrUploadNotFound if the id is
	// unknown, malformed, completed or cancelled; ErrUploadOffset if offset is
	// greater than the upload's current size (or negative).
	//
	// If r fails midway, the bytes written so far stay (the caller learns n)
	// and the caller decides. If the store fails (ErrStorageFull, I/O
	// errors), the upload is left as it was at offset and n is 0.
	WriteUpload(ctx context.Context, id string, offset int64, r io.Reader) (int64, error)

	// UploadSize returns how many bytes the upload holds.
	UploadSize(ctx context.Context, id string) (int64, error)

	// OpenUpload reads the upload's bytes from the start (used to hash with
	// an algorithm that was not streamed, e.g. sha512).
	OpenUpload(ctx context.Context, id string) (io.ReadCloser, error)

	// CommitUpload makes the upload's first size bytes durable and visible as
	// blob dgst (the caller verified the digest). Afterwards the upload id no
	// longer exists. Committing over an existing blob of that digest succeeds
	// (content-addressed). ErrInvalidDigest for a malformed digest (the upload
	// is kept); ErrUploadNotFound; ErrUploadOffset if the upload holds fewer
	// than size bytes.
	//
	// Filesystem: truncate to size if longer, fsync the file, rename into
	// place, fsync the directory.
	CommitUpload(ctx context.Context, id string, size int64, dgst digest.Digest) error

	// CancelUpload discards an upload (ErrUploadNotFound if unknown).
	CancelUpload(ctx context.Context, id string) error

	// PurgeUploads removes uploads last written before olderThan and returns
	// how many it removed. Uploads in use at that moment may be skipped.
	PurgeUploads(ctx context.Context, olderThan time.Time) (int, error)
}

// Errors returned by drivers, wrapped with context; test them with errors.Is.
var (
	// ErrBlobNotFound means no committed blob has that digest.
	ErrBlobNotFound = errors.New("replication: blob not found")

	// ErrUploadNotFound means the upload id is unknown, malformed, already
	// committed, cancelled or purged. The client must start a new upload.
	ErrUploadNotFound = errors.New("replication: upload not found")

	// ErrUploadOffset means a write did not start within the bytes the
	// upload holds, or a commit asked for more bytes than it holds. The
	// caller can ask UploadSize and resume from there.
	ErrUploadOffset = errors.New("replication: upload offset out of range")

	// ErrStorageFull means the store is out of space or over quota. The
	// wrapped error keeps the backend cause (path, errno).
	ErrStorageFull = errors.New("replication: storage full")

	// ErrInvalidDigest means the digest is malformed or uses an algorithm
	// other than sha256 or sha512.
	ErrInvalidDigest = errors.New("replication: invalid digest")
)

// checkDigest returns ErrInvalidDigest (wrapped) unless dgst is a well-formed
// sha256 or sha512 digest. A valid digest's encoded part is lowercase hex of
// a fixed length, so it is safe to use in a path or an object key.
func checkDigest(dgst digest.Digest) error {
	if err := dgst.Validate(); err != nil {
		return fmt.Errorf("%w %q: %w", ErrInvalidDigest, string(dgst), err)
	}
	if alg := dgst.Algorithm(); alg != digest.SHA256 && alg != digest.SHA512 {
		return fmt.Errorf("%w %q: algorithm %s is not supported", ErrInvalidDigest, string(dgst), alg)
	}
	return nil
}

// storageError translates a backend error that means "out of space" or "over
// quota" into ErrStorageFull, keeping the original error (and its message with
// the path) in the chain. Other errors are returned unchanged.
func storageError(err error) error {
	if err == nil || errors.Is(err, ErrStorageFull) {
		return err
	}
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("%w: %w", ErrStorageFull, err)
	}
	return err
}
