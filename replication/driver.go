package replication

import (
	"context"
	_ "crypto/sha256" // registers sha256 so digest.Digest.Validate accepts it
	_ "crypto/sha512" // registers sha512 so digest.Digest.Validate accepts it
	"errors"
	"fmt"
	"io"
	"net/url"
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

	// WriteUpload appends r to upload id and returns the number of bytes
	// written. offset must equal the upload's current size; otherwise it
	// returns ErrUploadOffset and changes nothing. Bytes once written are
	// never rewritten: the gateway's session tokens carry a hash over the
	// upload's first offset bytes, and an earlier token must not be able to
	// replace bytes that a later token's hash already covers.
	//
	// A chunk is all or nothing: if reading r or writing fails midway, the
	// driver truncates the upload back to offset before returning 0 and the
	// error (ErrStorageFull, an I/O error, or r's error wrapped), so the
	// upload is exactly as it was and the same chunk can be retried at the
	// same offset. If even that truncation fails, the upload is removed.
	// Only a crash mid-write can leave the upload longer than any caller
	// knows; every later write or commit at the old size is then refused.
	//
	// Writes to one upload are serialized: of two writes at the same
	// offset, the second sees the first's bytes and gets ErrUploadOffset.
	// ErrUploadNotFound if the id is unknown, malformed, completed or
	// cancelled.
	WriteUpload(ctx context.Context, id string, offset int64, r io.Reader) (int64, error)

	// UploadSize returns how many bytes the upload holds.
	UploadSize(ctx context.Context, id string) (int64, error)

	// OpenUpload reads the upload's bytes from the start (used to hash with
	// an algorithm that was not streamed, e.g. sha512).
	OpenUpload(ctx context.Context, id string) (io.ReadCloser, error)

	// CommitUpload makes the upload's bytes durable and visible as blob dgst
	// (the caller verified the digest). The upload must hold exactly size
	// bytes, ErrUploadOffset otherwise: a commit never truncates, since
	// bytes past what the caller hashed can only come from a write it does
	// not know about. Afterwards the upload id no longer exists. Committing
	// over an existing blob of that digest succeeds (content-addressed).
	// ErrInvalidDigest for a malformed digest; ErrUploadNotFound. An upload
	// refused for its digest or its size is kept.
	//
	// Filesystem: fsync the file, rename into place, fsync the directory.
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

	// ErrUploadOffset means a write did not start at the end of the
	// upload, or a commit asked for a size other than the upload holds.
	// Nothing was changed.
	ErrUploadOffset = errors.New("replication: upload offset out of range")

	// ErrStorageFull means the store is out of space or over quota. The
	// wrapped error keeps the backend cause (path, errno).
	ErrStorageFull = errors.New("replication: storage full")

	// ErrInvalidDigest means the digest is malformed or uses an algorithm
	// other than sha256 or sha512.
	ErrInvalidDigest = errors.New("replication: invalid digest")

	// ErrStoreUnreachable comes from OpenStore, with a usable driver, when
	// the store did not answer its start-up check (down, stalled, 5xx). A
	// process still starts: one region's outage must not keep nodes and
	// gateways of other regions from starting; requests to the store fail
	// over to other regions until it answers.
	ErrStoreUnreachable = errors.New("replication: store unreachable")
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

// Presigner is implemented by drivers whose backend can hand a client a
// short-lived URL to read a blob directly (S3), so a gateway may answer a
// blob GET with a redirect instead of streaming the bytes itself.
type Presigner interface {
	// PresignGet returns a URL that reads committed blob dgst with a plain
	// GET until ttl passes, or ErrBlobNotFound when the store has no such
	// blob (a driver may find that out at no more cost than one small read).
	PresignGet(ctx context.Context, dgst digest.Digest, ttl time.Duration) (*url.URL, error)
}

// RangeOpener is implemented by drivers that read a stretch of a blob more
// cheaply when they know where it ends (S3: no bytes fetched past it). A
// gateway serving a Range request, or resuming one, uses it instead of Open.
type RangeOpener interface {
	// OpenRange reads length bytes of committed blob dgst from offset;
	// offset+length must not pass the blob's end. ErrBlobNotFound as Open.
	OpenRange(ctx context.Context, dgst digest.Digest, offset, length int64) (io.ReadCloser, error)
}

// ServerSideCopier is implemented by drivers that can copy a committed blob
// from another store on the same backend endpoint without the bytes passing
// through this process (S3 CopyObject between buckets of one endpoint).
type ServerSideCopier interface {
	// CopyBlob copies blob dgst from src into this store. It returns
	// ErrNotSameBackend, having changed nothing, when src is not on the
	// same endpoint (or is another kind of driver); the caller then streams.
	// The copy is visible under dgst only once complete.
	CopyBlob(ctx context.Context, src Driver, dgst digest.Digest) error
}

// ErrNotSameBackend means a server-side copy is impossible between the two
// stores; the caller must stream the bytes instead.
var ErrNotSameBackend = errors.New("replication: stores are not on the same backend")
