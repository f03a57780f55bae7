package replication

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/minio/minio-go/v7/pkg/s3utils"
	"github.com/opencontainers/go-digest"
)

// S3 is a Driver that keeps a region's blobs in a bucket of an S3-compatible
// object store (AWS S3, MinIO, versitygw, Ceph RGW, …).
//
// Layout under the configured prefix:
//
//	blobs/<alg>/<hex>           link: a small JSON object naming the blob's data object (s3Link)
//	data/<id>                   bytes: an upload's multipart target, then its committed blob
//	uploads/<id>/state          the upload's state (JSON, uploadState), rewritten by every write
//	uploads/<id>/tail.<random>  the last bytes, too few for an S3 part (< 5 MiB)
//
// # Blobs are links
//
// An S3 multipart upload is bound to its key when it starts, and the digest
// is known only at commit. So a blob's bytes stay where its upload completed
// them, data/<id> (id is the upload's), and the digest's key holds a link
// naming that object and its size. Committing costs O(1) in the blob's
// size: the bytes are never copied or read again (only a tail under 5 MiB is
// copied in as the last part). Stat reads the link (one small GET); Open,
// PresignGet, Delete and CopyBlob read it, then address the data object. A
// data object is written once and never changed. Data keys are outside
// uploads/, so removing uploads never touches committed bytes.
//
// # Intents
//
// A data key says nothing of its digest, so a data object whose link was
// never written (a commit that crashed) cannot be told from a linked one by
// looking at it. Hence every operation that may leave data linked or not
// first records an intent, {digest, data key}, in a state object under
// uploads/: a commit in the upload's own state, in the conditional write that
// records the completed data; CopyBlob and Delete in the state of a fresh
// id. Links are written only after their intent, and from then on the link
// alone decides the data's fate: when the operation ends, or PurgeUploads
// finds its state stale, the data object is kept if the digest's link names
// it and removed otherwise. So a commit, copy or delete interrupted at any
// step leaves nothing that PurgeUploads does not clean, and PurgeUploads
// never removes linked data. (An upload without an intent was never linked:
// removing it removes data/<id>.) A state with an intent is no longer an
// upload that can be written or read; only a retried CommitUpload of the
// same digest resumes it, by writing the link.
//
// # Uploads
//
// S3 parts must be at least 5 MiB (except the last) and cannot be read before
// their multipart upload is completed. A chunk is cut into parts of PartSize
// that stream into a multipart upload at data/<id> as the bytes arrive; a
// remainder of 5 MiB or more becomes a part too, and only one shorter than
// 5 MiB is parked as a tail object, which the next chunk reads back once and
// prepends. So one write costs at most one PartSize buffer, and a tail is
// re-read at most once per chunk.
//
// The state object records the multipart upload id, the accepted parts
// (number, size, ETag), the tail object (key, size, ETag) and, once the
// multipart upload is completed, the data object (the base). Any process can
// continue an upload from it. A chunk only ever adds part numbers above the
// recorded ones and a tail under a fresh random key, and becomes part of the
// upload only when the new state is written; if anything fails before, the
// recorded state still describes the upload exactly as it was (parts beyond
// the recorded list are never completed and are overwritten or aborted
// later).
//
// CommitUpload completes the multipart upload into data/<id>, with the tail
// copied in server-side as the last (small) part, records that and the
// intent in the state, writes the link, and removes the state. An upload of
// no more than a tail is committed by copying the tail to data/<id>; an
// empty one by a zero-byte PUT.
//
// Reading an upload (OpenUpload, used to hash sha512) completes it the same
// way, so a commit after it only writes the link. A write after a read starts
// a new multipart upload whose first parts are server-side copies
// (UploadPartCopy) of the base, even if the write only parks a tail: bytes
// after a base are always in a multipart upload, so a commit never has to
// copy the base to append to it.
//
// # Concurrency
//
// Within one process, the operations that change an upload are serialized
// by a mutex per upload id. Between processes sharing a bucket, every state
// write is conditional (If-Match on the ETag read, If-None-Match: * on
// creation; the state carries a sequence number so no two versions have the
// same ETag), so of two writes at the same offset at most one is recorded;
// the other gets ErrUploadOffset. Because both may have stored part N, the
// loser may overwrite the winner's part bytes; completion passes the
// recorded ETags, so the store then refuses to complete (InvalidPart) rather
// than commit bytes that were not recorded. Every server-side copy carries
// x-amz-copy-source-if-match with the recorded ETag, and reads of the base
// and tail use If-Match, for the same reason. Links are created with
// If-None-Match: * (a link whose data is missing is replaced with If-Match),
// so of concurrent commits of one digest, in one process or several, one
// links its data and the others remove theirs. What is not guaranteed across
// processes: such a race can leave the upload unusable (the client must
// start over); an OpenUpload racing a write in another process can make one
// of them fail; a reader returned by OpenUpload fails if the upload is
// written while it reads; a commit resumed after PurgeUploads' cutoff can
// race a purge in another process. A store that ignores conditional headers
// loses the cross-process guarantees (versitygw, MinIO and AWS S3 honour
// them).
type S3 struct {
	cfg    S3Config
	client *minio.Client
	core   minio.Core
	bufs   sync.Pool // *[]byte of PartSize
	reads  *readBudget
	locks  uploadLocks
}

var (
	_ Driver           = (*S3)(nil)
	_ Presigner        = (*S3)(nil)
	_ RangeOpener      = (*S3)(nil)
	_ ServerSideCopier = (*S3)(nil)
)

// S3Config locates a bucket (and a key prefix in it) and says how to reach it.
type S3Config struct {
	Endpoint  string // host:port, no scheme
	Secure    bool   // HTTPS
	Region    string // default "us-east-1"
	Bucket    string
	Prefix    string // optional key prefix; "a/b" is stored as "a/b/"
	AccessKey string
	SecretKey string
	// PathStyle addresses the bucket as endpoint/bucket; otherwise minio-go
	// chooses (virtual-host style for AWS and Google, path style elsewhere).
	PathStyle bool
	// PartSize is the size of multipart parts and of a write's buffer
	// (default 16 MiB, at least 5 MiB, at most 5 GiB).
	PartSize int64
	// CopyPartSize is the piece size of server-side copies: larger objects
	// are copied as parallel UploadPartCopy pieces of 1 to 2 times this size
	// (default 256 MiB, at least 5 MiB, at most 2.5 GiB).
	CopyPartSize int64
	// ReadPartSize is the size of the ranged GETs a blob larger than it is
	// read with, several at once (default 8 MiB, at least 64 KiB).
	ReadPartSize int64
	// ReadBuffers bounds the memory of those reads: at most this many
	// ReadPartSize buffers are in use across all readers; a reader that
	// finds none free streams one GET instead (default 16).
	ReadBuffers int
	// MaxRetries is how many times minio-go tries a request that fails
	// with a retryable error (default 0: minio-go's 10).
	MaxRetries int
}

const (
	// DefaultS3PartSize is S3Config.PartSize when left zero.
	DefaultS3PartSize = 16 << 20
	// DefaultS3CopyPartSize is S3Config.CopyPartSize when left zero.
	DefaultS3CopyPartSize = 256 << 20
	// S3MinPartSize is the smallest part S3 accepts except the last one.
	S3MinPartSize = 5 << 20

	s3MaxPartSize     = 5 << 30
	s3MinReadPartSize = 64 << 10
	s3MaxParts        = 10000
	s3CopyConcurrency = 4
	s3MaxStateSize    = 1 << 20
	s3MaxLinkSize     = 64 << 10
	s3LinkAttempts    = 3
	s3CleanupTimeout  = 30 * time.Second
)

// withDefaults fills the fields left zero and normalizes the prefix.
func (c S3Config) withDefaults() S3Config {
	if c.Region == "" {
		c.Region = "us-east-1"
	}
	if c.PartSize == 0 {
		c.PartSize = DefaultS3PartSize
	}
	if c.CopyPartSize == 0 {
		c.CopyPartSize = DefaultS3CopyPartSize
	}
	if c.ReadPartSize == 0 {
		c.ReadPartSize = DefaultS3ReadPartSize
	}
	if c.ReadBuffers == 0 {
		c.ReadBuffers = DefaultS3ReadBuffers
	}
	if c.Prefix = strings.Trim(c.Prefix, "/"); c.Prefix != "" {
		c.Prefix += "/"
	}
	return c
}

// Validate reports the first problem with c (after defaults are applied).
func (c S3Config) Validate() error {
	c = c.withDefaults()
	switch {
	case c.Endpoint == "":
		return errors.New("replication: s3: endpoint is empty")
	case strings.Contains(c.Endpoint, "://") || strings.ContainsAny(c.Endpoint, "/?#@"):
		return fmt.Errorf("replication: s3: endpoint %q must be host[:port], without scheme or path", c.Endpoint)
	case c.AccessKey == "" || c.SecretKey == "":
		return fmt.Errorf("replication: s3 store %s: access key and secret key are required", c)
	case c.PartSize < S3MinPartSize || c.PartSize > s3MaxPartSize:
		return fmt.Errorf("replication: s3 store %s: part size %d is outside S3's 5 MiB to 5 GiB", c, c.PartSize)
	case c.CopyPartSize < S3MinPartSize || c.CopyPartSize > s3MaxPartSize/2:
		return fmt.Errorf("replication: s3 store %s: copy part size %d is outside 5 MiB to 2.5 GiB", c, c.CopyPartSize)
	case c.ReadPartSize < s3MinReadPartSize || c.ReadPartSize > s3MaxPartSize:
		return fmt.Errorf("replication: s3 store %s: read part size %d is outside 64 KiB to 5 GiB", c, c.ReadPartSize)
	case c.ReadBuffers < 0:
		return fmt.Errorf("replication: s3 store %s: negative ReadBuffers", c)
	case c.MaxRetries < 0:
		return fmt.Errorf("replication: s3 store %s: negative MaxRetries", c)
	}
	if err := s3utils.CheckValidBucketNameStrict(c.Bucket); err != nil {
		return fmt.Errorf("replication: s3 store %s: bucket %q: %w", c, c.Bucket, err)
	}
	for _, seg := range strings.Split(strings.TrimSuffix(c.Prefix, "/"), "/") {
		if c.Prefix != "" && (seg == "" || seg == "." || seg == "..") {
			return fmt.Errorf("replication: s3 store %s: prefix %q has an empty, . or .. segment", c, c.Prefix)
		}
	}
	return nil
}

// String names the store without its credentials.
func (c S3Config) String() string {
	scheme := "https"
	if !c.Secure {
		scheme = "http"
	}
	return scheme + "://" + c.Endpoint + "/" + c.Bucket + "/" + strings.Trim(c.Prefix, "/")
}

// startCheckTimeout bounds NewS3's bucket check, so a stalled server
// cannot hold a process's start.
const startCheckTimeout = 10 * time.Second

// NewS3 connects to the bucket and checks that it exists and that the
// credentials are accepted (they need to list, read, write and delete
// objects in it, and to list and abort multipart uploads). A missing
// bucket or refused credentials is an error; a server that does not answer
// the check in time returns the driver together with an error wrapping
// ErrStoreUnreachable, for the caller to start anyway.
func NewS3(ctx context.Context, cfg S3Config) (*S3, error) {
	cfg = cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	lookup := minio.BucketLookupAuto
	if cfg.PathStyle {
		lookup = minio.BucketLookupPath
	}
	client, err := minio.New(cfg.Endpoint, &minio.Options{
		Creds:        credentials.NewStaticV4(cfg.AccessKey, cfg.SecretKey, ""),
		Secure:       cfg.Secure,
		Region:       cfg.Region,
		BucketLookup: lookup,
		MaxRetries:   cfg.MaxRetries,
	})
	if err != nil {
		return nil, fmt.Errorf("replication: s3 store %s: %w", cfg, err)
	}
	s := &S3{cfg: cfg, client: client, core: minio.Core{Client: client},
		reads: newReadBudget(int(cfg.ReadPartSize), cfg.ReadBuffers)}
	s.bufs.New = func() any {
		b := make([]byte, cfg.PartSize)
		return &b
	}
	cctx, cancel := context.WithTimeout(ctx, startCheckTimeout)
	defer cancel()
	if err := s.checkBucket(cctx); err != nil {
		if errors.Is(err, errDefinite) || ctx.Err() != nil {
			return nil, err
		}
		return s, fmt.Errorf("%w: %w", ErrStoreUnreachable, err)
	}
	return s, nil
}

// errDefinite marks check failures that waiting will not fix.
var errDefinite = errors.New("configuration")

// checkBucket lists one key of the store to check that the bucket exists
// and the credentials are accepted. It lists rather than sends HEAD because
// a HEAD error has no body, so its code is guessed from the status, and some
// servers (versitygw) answer 404 for an unknown access key.
func (s *S3) checkBucket(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // ends the listing after its first answer
	var err error
	for obj := range s.client.ListObjects(ctx, s.cfg.Bucket, minio.ListObjectsOptions{Prefix: s.cfg.Prefix, MaxKeys: 1}) {
		err = obj.Err
		break
	}
	switch {
	case err == nil:
		return nil
	case s3Code(err) == "NoSuchBucket":
		return fmt.Errorf("replication: s3 store %s: bucket %q does not exist at %s%w", s.cfg, s.cfg.Bucket, s.cfg.Endpoint, silent{errDefinite})
	case isCredentialsError(err):
		return fmt.Errorf("replication: s3 store %s: %s refused the credentials (access key %q) for bucket %q: %w%w",
			s.cfg, s.cfg.Endpoint, s.cfg.AccessKey, s.cfg.Bucket, err, silent{errDefinite})
	}
	return fmt.Errorf("replication: s3 store %s: checking bucket %q at %s: %w", s.cfg, s.cfg.Bucket, s.cfg.Endpoint, err)
}

// silent wraps an error for errors.Is without adding to the message.
type silent struct{ err error }

func (s silent) Error() string { return "" }
func (s silent) Unwrap() error { return s.err }

// Endpoint is the store's host:port.
func (s *S3) Endpoint() string { return s.cfg.Endpoint }

// String names the store without its credentials.
func (s *S3) String() string { return s.cfg.String() }

// Stat implements Driver: the size is the link's.
func (s *S3) Stat(ctx context.Context, dgst digest.Digest) (int64, error) {
	if err := checkDigest(dgst); err != nil {
		return 0, err
	}
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	l, _, err := s.readLink(ctx, dgst)
	if err != nil {
		return 0, err
	}
	return l.Size, nil
}

// Open implements Driver with the link's GET, then either parallel ranged
// GETs of the data object (more than ReadPartSize bytes to read, and read
// buffers free: see s3read.go) or one (ranged) GET whose body streams to the
// caller. Errors of the first part are Open's; later ones are the reader's.
func (s *S3) Open(ctx context.Context, dgst digest.Digest, offset int64) (io.ReadCloser, error) {
	return s.open(ctx, dgst, offset, -1)
}

// OpenRange implements RangeOpener: the parts and the GET stop at the
// range's end, so a small range of a large blob costs the store that
// range, not a read part and its read-ahead.
func (s *S3) OpenRange(ctx context.Context, dgst digest.Digest, offset, length int64) (io.ReadCloser, error) {
	if length < 0 {
		return nil, fmt.Errorf("replication: open blob %s: negative length %d", dgst, length)
	}
	return s.open(ctx, dgst, offset, length)
}

// open reads dgst from offset to its end, or length bytes when length is
// not negative.
func (s *S3) open(ctx context.Context, dgst digest.Digest, offset, length int64) (io.ReadCloser, error) {
	if err := checkDigest(dgst); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if offset < 0 {
		return nil, fmt.Errorf("replication: open blob %s: negative offset %d", dgst, offset)
	}
	l, _, err := s.readLink(ctx, dgst)
	if err != nil {
		return nil, err
	}
	end := l.Size
	if length >= 0 {
		end = offset + length
	}
	switch {
	case offset > l.Size || end > l.Size:
		return nil, fmt.Errorf("replication: open blob %s: bytes %d to %d outside its %d bytes", dgst, offset, end, l.Size)
	case offset == end: // S3 refuses a range that starts at the end
		return io.NopCloser(bytes.NewReader(nil)), nil
	}
	key := s.key(l.Data)
	if end-offset > s.cfg.ReadPartSize {
		if bufs := s.reads.take(s3ReadAhead); len(bufs) > 0 {
			fail := func(err error) error { return s.blobError(dgst, err) }
			r := newPartReader(ctx, s.fetchRange(key), fail, s.reads, bufs, offset, end)
			if err := r.start(); err != nil {
				r.Close()
				return nil, err
			}
			return r, nil
		}
	}
	var opts minio.GetObjectOptions
	switch {
	case end < l.Size:
		opts.SetRange(offset, end-1) // bytes=offset-(end-1)
	case offset > 0:
		opts.SetRange(offset, 0) // bytes=offset-
	}
	body, _, _, err := s.core.GetObject(ctx, s.cfg.Bucket, key, opts)
	if err != nil {
		return nil, s.blobError(dgst, err) // a link whose data is gone is no blob
	}
	return body, nil
}

// Delete implements Driver: under an intent, remove the link, then the data.
func (s *S3) Delete(ctx context.Context, dgst digest.Digest) error {
	if err := checkDigest(dgst); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	l, _, err := s.readLink(ctx, dgst)
	if err != nil {
		return err
	}
	id, unlock, st, err := s.beginIntent(ctx, dgst, s.key(l.Data))
	if err != nil {
		return fmt.Errorf("replication: delete blob %s: %w", dgst, err)
	}
	defer unlock()
	if err := s.client.RemoveObject(ctx, s.cfg.Bucket, s.blobKey(dgst), minio.RemoveObjectOptions{}); err != nil {
		s.settle(ctx, id, st)
		return s.blobError(dgst, err)
	}
	// The blob is gone. Should removing its data fail, the intent stays,
	// and PurgeUploads removes the data.
	s.removeUpload(ctx, id, st, false)
	return nil
}

// PresignGet implements Presigner with one small GET, of the link: the URL
// reads the data object it names. A missing blob gives ErrBlobNotFound.
func (s *S3) PresignGet(ctx context.Context, dgst digest.Digest, ttl time.Duration) (*url.URL, error) {
	if err := checkDigest(dgst); err != nil {
		return nil, err
	}
	l, _, err := s.readLink(ctx, dgst)
	if err != nil {
		return nil, err
	}
	u, err := s.client.PresignedGetObject(ctx, s.cfg.Bucket, s.key(l.Data), ttl, nil)
	if err != nil {
		return nil, fmt.Errorf("replication: presign blob %s: %w", dgst, err)
	}
	return u, nil
}

// CopyBlob implements ServerSideCopier for a source S3 store on the same
// endpoint. The copy is made with this store's credentials; if they cannot
// read the source bucket, it reports ErrNotSameBackend. Under an intent, the
// source's data object is copied to a fresh data object (a single CopyObject
// or a multipart copy, either of which S3 makes visible only complete),
// which is then linked. A blob already in this store is not copied again.
func (s *S3) CopyBlob(ctx context.Context, src Driver, dgst digest.Digest) error {
	if err := checkDigest(dgst); err != nil {
		return err
	}
	from, ok := src.(*S3)
	if !ok || !strings.EqualFold(from.cfg.Endpoint, s.cfg.Endpoint) || from.cfg.Secure != s.cfg.Secure {
		return fmt.Errorf("%w: %T is not on %s", ErrNotSameBackend, src, s)
	}
	l, _, err := from.readLink(ctx, dgst)
	if err != nil {
		return err
	}
	if from.cfg.Bucket == s.cfg.Bucket && from.cfg.Prefix == s.cfg.Prefix {
		return nil
	}
	present, replace, err := s.lookup(ctx, dgst, false)
	if err != nil || present {
		return err
	}
	id, unlock, st, err := s.beginIntent(ctx, dgst, "")
	if err != nil {
		return fmt.Errorf("replication: copy blob %s: %w", dgst, err)
	}
	defer unlock()
	data := st.Intent.Data
	etag, err := s.copyObjects(ctx, data, []copySource{{from.cfg.Bucket, from.key(l.Data), l.Size, l.ETag}})
	if err != nil {
		s.removeUpload(ctx, id, st, false)
		if s3Code(err) == "AccessDenied" && from.cfg.AccessKey != s.cfg.AccessKey {
			return fmt.Errorf("%w: the credentials of %s cannot read %s: %w", ErrNotSameBackend, s, from, err)
		}
		return s.blobError(dgst, err)
	}
	linked, err := s.link(ctx, dgst, s3Link{Data: s.rel(data), Size: l.Size, ETag: etag}, replace)
	if err != nil {
		s.settle(ctx, id, st)
		return fmt.Errorf("replication: copy blob %s: %w", dgst, err)
	}
	return s.removeUpload(ctx, id, st, linked)
}

// s3Link is the JSON body of blobs/<alg>/<hex>.
type s3Link struct {
	Data string `json:"data"` // the data object's key under the prefix: data/<id>
	Size int64  `json:"size"`
	ETag string `json:"etag"` // the data object's, to pin server-side copies of it
}

func (l s3Link) check() error {
	id, ok := strings.CutPrefix(l.Data, "data/")
	switch {
	case !ok || !validUploadID(id):
		return fmt.Errorf("data key %q is not data/<id>", l.Data)
	case l.Size < 0:
		return fmt.Errorf("negative size %d", l.Size)
	}
	return nil
}

// readLink reads blob dgst's link and the link's ETag: ErrBlobNotFound
// (wrapped) if there is none.
func (s *S3) readLink(ctx context.Context, dgst digest.Digest) (s3Link, string, error) {
	var l s3Link
	body, info, _, err := s.core.GetObject(ctx, s.cfg.Bucket, s.blobKey(dgst), minio.GetObjectOptions{})
	if err != nil {
		return l, "", s.blobError(dgst, err)
	}
	defer body.Close()
	b, err := io.ReadAll(io.LimitReader(body, s3MaxLinkSize))
	if err != nil {
		return l, "", s.blobError(dgst, fmt.Errorf("reading its link: %w", err))
	}
	if err := json.Unmarshal(b, &l); err != nil {
		return l, "", fmt.Errorf("replication: blob %s in %s: corrupt link: %w", dgst, s, err)
	}
	if err := l.check(); err != nil {
		return l, "", fmt.Errorf("replication: blob %s in %s: corrupt link: %w", dgst, s, err)
	}
	return l, trimETag(info.ETag), nil
}

// lookup reports whether blob dgst is here, its data object included. For a
// link whose data object is missing (or, with verify, whose bytes do not
// hash to dgst: a commit keeps a blob only once hashed), it returns the
// link's ETag as replace, for link to replace it.
func (s *S3) lookup(ctx context.Context, dgst digest.Digest, verify bool) (present bool, replace string, err error) {
	l, etag, err := s.readLink(ctx, dgst)
	switch {
	case errors.Is(err, ErrBlobNotFound):
		return false, "", nil
	case err != nil:
		return false, "", err
	}
	if !verify {
		_, err = s.client.StatObject(ctx, s.cfg.Bucket, s.key(l.Data), minio.StatObjectOptions{})
	} else {
		err = s.hashes(ctx, l, dgst)
		if errors.Is(err, errWrongBytes) {
			return false, etag, nil // replaced like a dangling link
		}
	}
	switch {
	case err == nil:
		return true, "", nil
	case isNoSuchKey(err):
		return false, etag, nil
	}
	return false, "", s.blobError(dgst, err)
}

// hashes reads the data object of link l through a hash: errWrongBytes
// when its bytes are not dgst's.
func (s *S3) hashes(ctx context.Context, l s3Link, dgst digest.Digest) error {
	obj, err := s.client.GetObject(ctx, s.cfg.Bucket, s.key(l.Data), minio.GetObjectOptions{})
	if err != nil {
		return err
	}
	defer obj.Close()
	v := dgst.Verifier()
	if _, err := io.Copy(v, obj); err != nil {
		return err
	}
	if !v.Verified() {
		return errWrongBytes
	}
	return nil
}

// link creates blob dgst's link to l.Data, or, with replace set, replaces
// the link whose ETag that is. A link is only ever created where none
// exists (If-None-Match: *), so of two concurrent links of one digest the
// first wins. It reports whether the link names l.Data afterwards (false:
// another commit's data won).
func (s *S3) link(ctx context.Context, dgst digest.Digest, l s3Link, replace string) (bool, error) {
	b, err := json.Marshal(l)
	if err != nil {
		return false, err
	}
	for attempt := 1; ; attempt++ {
		opts := s.putOptions()
		opts.ContentType = "application/json"
		if replace == "" {
			opts.SetMatchETagExcept("*")
		} else {
			opts.SetMatchETag(replace)
		}
		_, err := s.core.PutObject(ctx, s.cfg.Bucket, s.blobKey(dgst), bytes.NewReader(b), int64(len(b)), "", "", opts)
		switch {
		case err == nil:
			return true, nil
		case attempt == s3LinkAttempts || !isConditionFailed(err) && !(replace != "" && isNoSuchKey(err)):
			return false, s3StorageError(fmt.Errorf("replication: linking blob %s: %w", dgst, err))
		}
		cur, _, rerr := s.readLink(ctx, dgst)
		switch {
		case rerr == nil:
			return cur.Data == l.Data, nil
		case !errors.Is(rerr, ErrBlobNotFound):
			return false, rerr
		}
		replace = "" // removed meanwhile (or a conflicting write failed): try again
	}
}

// s3Intent says that data object Data is being linked as Digest, or
// unlinked from it: from the moment it is recorded, the link alone decides
// whether Data is kept (see the Intents section of S3).
type s3Intent struct {
	Digest digest.Digest `json:"digest"`
	Data   string        `json:"data"` // the data object's key
}

// beginIntent records an intent for dgst and data object key (data/<id> if
// empty) in the state of a fresh id, and returns the id locked, so that this
// process's PurgeUploads leaves it alone while the operation runs.
func (s *S3) beginIntent(ctx context.Context, dgst digest.Digest, key string) (string, func(), uploadState, error) {
	id := newUploadID()
	if key == "" {
		key = s.dataKey(id)
	}
	unlock, err := s.locks.lock(ctx, id)
	if err != nil {
		return "", nil, uploadState{}, err
	}
	st := uploadState{Intent: &s3Intent{Digest: dgst, Data: key}}
	if _, err := s.putState(ctx, id, &st, ""); err != nil {
		unlock()
		return "", nil, uploadState{}, err
	}
	return id, unlock, st, nil
}

// settle removes upload id, keeping the data object of its intent only if
// the intent's digest links to it. It works on after ctx ends, since it
// cleans up after operations that failed.
func (s *S3) settle(ctx context.Context, id string, st uploadState) error {
	ctx, cancel := cleanupContext(ctx)
	defer cancel()
	keep := false
	if st.Intent != nil {
		l, _, err := s.readLink(ctx, st.Intent.Digest)
		switch {
		case err == nil:
			keep = s.key(l.Data) == st.Intent.Data
		case !errors.Is(err, ErrBlobNotFound):
			return err
		}
	}
	return s.removeUpload(ctx, id, st, keep)
}

// copySource is an object (or the whole of one) to copy server-side.
type copySource struct {
	bucket, key string
	size        int64
	etag        string
}

// copyObjects writes the concatenation of srcs to dstKey server-side: one
// CopyObject for a single source up to CopyPartSize, else a multipart upload
// of parallel UploadPartCopy pieces, aborted on failure. Every piece is
// pinned to its source's ETag. It returns the new object's ETag.
func (s *S3) copyObjects(ctx context.Context, dstKey string, srcs []copySource) (string, error) {
	if len(srcs) == 1 && srcs[0].size <= s.cfg.CopyPartSize {
		src := srcs[0]
		info, err := s.core.CopyObject(ctx, src.bucket, src.key, s.cfg.Bucket, dstKey, ifMatchSource(src.etag),
			minio.CopySrcOptions{}, s.putOptions())
		return trimETag(info.ETag), err
	}
	mpu, err := s.core.NewMultipartUpload(ctx, s.cfg.Bucket, dstKey, s.putOptions())
	if err != nil {
		return "", err
	}
	parts, err := s.copyParts(ctx, dstKey, mpu, 1, srcs)
	var info minio.UploadInfo
	if err == nil {
		info, err = s.core.CompleteMultipartUpload(ctx, s.cfg.Bucket, dstKey, mpu, completeParts(parts), s.putOptions())
	}
	if err != nil {
		cctx, cancel := cleanupContext(ctx)
		defer cancel()
		s.core.AbortMultipartUpload(cctx, s.cfg.Bucket, dstKey, mpu)
		return "", err
	}
	return trimETag(info.ETag), nil
}

// copyParts copies srcs, in order, into multipart upload mpu at dstKey as
// parts numbered from first, each source cut into pieces of CopyPartSize to
// twice that (so every piece but the last source's may sit mid-upload).
func (s *S3) copyParts(ctx context.Context, dstKey, mpu string, first int, srcs []copySource) ([]s3Part, error) {
	type piece struct {
		src      copySource
		off, len int64
	}
	var pieces []piece
	for _, src := range srcs {
		n := max(1, src.size/s.cfg.CopyPartSize)
		for i, off := int64(0), int64(0); i < n; i++ {
			l := src.size / n
			if i < src.size%n {
				l++
			}
			pieces = append(pieces, piece{src, off, l})
			off += l
		}
	}
	if first+len(pieces)-1 > s3MaxParts {
		return nil, fmt.Errorf("copy needs more than S3's %d parts", s3MaxParts)
	}
	parts := make([]s3Part, len(pieces))
	errs := make([]error, len(pieces))
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sem := make(chan struct{}, s3CopyConcurrency)
	var wg sync.WaitGroup
	for i, p := range pieces {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			cp, err := s.core.CopyObjectPart(ctx, p.src.bucket, p.src.key, s.cfg.Bucket, dstKey, mpu, first+i,
				p.off, p.len, ifMatchSource(p.src.etag))
			if err != nil {
				errs[i] = err
				cancel()
				return
			}
			parts[i] = s3Part{N: first + i, Size: p.len, ETag: trimETag(cp.ETag)}
		})
	}
	wg.Wait()
	if err := firstError(errs); err != nil {
		return nil, err
	}
	return parts, nil
}

func completeParts(parts []s3Part) []minio.CompletePart {
	complete := make([]minio.CompletePart, len(parts))
	for i, p := range parts {
		complete[i] = minio.CompletePart{PartNumber: p.N, ETag: p.ETag}
	}
	return complete
}

func (s *S3) blobKey(dgst digest.Digest) string {
	return s.cfg.Prefix + "blobs/" + dgst.Algorithm().String() + "/" + dgst.Encoded()
}

func (s *S3) dataPrefix() string { return s.cfg.Prefix + "data/" }

func (s *S3) dataKey(id string) string { return s.dataPrefix() + id }

func (s *S3) uploadsPrefix() string { return s.cfg.Prefix + "uploads/" }

func (s *S3) uploadKey(id, name string) string { return s.uploadsPrefix() + id + "/" + name }

// key is the object key of rel, a key relative to the prefix (as links
// record them); rel is its inverse.
func (s *S3) key(rel string) string { return s.cfg.Prefix + rel }

func (s *S3) rel(key string) string { return strings.TrimPrefix(key, s.cfg.Prefix) }

// putOptions are the options of every PUT: PartSize is always set because
// minio-go otherwise sizes buffers for the largest possible object.
func (s *S3) putOptions() minio.PutObjectOptions {
	return minio.PutObjectOptions{PartSize: uint64(s.cfg.PartSize)}
}

func (s *S3) blobError(dgst digest.Digest, err error) error {
	if isNoSuchKey(err) {
		return fmt.Errorf("%w: %s", ErrBlobNotFound, dgst)
	}
	return s3StorageError(fmt.Errorf("replication: blob %s in %s: %w", dgst, s, err))
}

// s3StorageFullCodes are the S3 error codes that mean out of space or over
// quota. (EntityTooLarge is a per-object limit, not a full store.)
var s3StorageFullCodes = map[string]bool{
	"XMinioStorageFull":              true,
	"XMinioAdminBucketQuotaExceeded": true,
	"QuotaExceeded":                  true,
	"StorageFull":                    true,
	"InsufficientStorage":            true,
}

// s3StorageError is storageError for S3 errors: it wraps ErrStorageFull
// around errors whose S3 code or HTTP status (507) means the store is full.
func s3StorageError(err error) error {
	var e minio.ErrorResponse
	if errors.As(err, &e) && (s3StorageFullCodes[e.Code] || e.StatusCode == http.StatusInsufficientStorage) {
		return fmt.Errorf("%w: %w", ErrStorageFull, err)
	}
	return err
}

func s3Code(err error) string {
	var e minio.ErrorResponse
	if errors.As(err, &e) {
		return e.Code
	}
	return ""
}

// isNoSuchKey reports whether S3 said the key does not exist. A store that
// cannot be reached or answers with another error is not a missing key.
// (For HEAD, whose errors have no body, minio-go reads any 404 as
// NoSuchKey; versitygw also answers 404 to an unknown access key, which
// NewS3 rules out at start but not if the key is deleted later.)
func isNoSuchKey(err error) bool { return s3Code(err) == "NoSuchKey" }

// isConditionFailed reports whether a conditional write was refused: the
// object changed (or exists), or AWS saw a concurrent conditional write.
func isConditionFailed(err error) bool {
	c := s3Code(err)
	return c == "PreconditionFailed" || c == "ConditionalRequestConflict"
}

func isCredentialsError(err error) bool {
	switch s3Code(err) {
	case "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
		"XAdminUserNotFound": // versitygw's unknown access key
		return true
	}
	return false
}

func ifMatchSource(etag string) map[string]string {
	return map[string]string{"x-amz-copy-source-if-match": etag}
}

func trimETag(etag string) string { return strings.Trim(etag, `"`) }

// cleanupContext is for removing leftovers after ctx failed or was
// cancelled: it keeps ctx's values, not its cancellation, and is bounded.
func cleanupContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), s3CleanupTimeout)
}

// fill reads from r until p is full or r fails; err is nil only if p is full.
func fill(r io.Reader, p []byte) (int, error) {
	n := 0
	for n < len(p) {
		m, err := r.Read(p[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

func firstError(errs []error) error {
	for _, err := range errs {
		if err != nil && !errors.Is(err, context.Canceled) {
			return err
		}
	}
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

func newUploadID() string {
	return hex.EncodeToString(randomBytes(uploadIDBytes))
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b) // never fails (crypto/rand, Go 1.24+)
	return b
}
