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
	"maps"
	"net/http"
	"net/url"
	"slices"
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
//	blobs/<alg>/<hex>           committed blobs
//	uploads/<id>/state          the upload's state (JSON, below), rewritten by every write
//	uploads/<id>/data           multipart upload target; once completed, the upload's first bytes
//	uploads/<id>/tail.<random>  the last bytes, too few for an S3 part (< 5 MiB)
//
// # Uploads
//
// S3 parts must be at least 5 MiB (except the last) and cannot be read before
// their multipart upload is completed. A chunk is cut into parts of PartSize
// that stream into a multipart upload at uploads/<id>/data as the bytes
// arrive; a remainder of 5 MiB or more becomes a part too, and only one
// shorter than 5 MiB is parked as a tail object, which the next chunk reads
// back once and prepends. So one write costs at most one PartSize buffer, and
// a tail is re-read at most once per chunk.
//
// The state object records the multipart upload id, the accepted parts
// (number, size, ETag), the tail object (key, size, ETag) and, after
// OpenUpload, the completed data object (the base). Any process can continue
// an upload from it. A chunk only ever adds part numbers above the recorded
// ones and a tail under a fresh random key, and becomes part of the upload
// only when the new state is written; if anything fails before, the recorded
// state still describes the upload exactly as it was (parts beyond the
// recorded list are never completed and are overwritten or aborted later).
//
// Reading an upload (OpenUpload, used to hash sha512) completes the
// multipart upload into uploads/<id>/data, which then serves as the readable
// base; the next part needed starts a new multipart upload whose first parts
// are server-side copies (UploadPartCopy) of the base.
//
// An S3 multipart upload is bound to its key when it starts, and the digest,
// hence the blob's key, is known only at commit. So CommitUpload completes
// the multipart upload into uploads/<id>/data, with the tail copied in
// server-side as the last (small) part, and then copies that object
// server-side to blobs/<alg>/<hex> (CopyObject, or parallel UploadPartCopy
// above CopyPartSize). The blob's bytes never pass through this process
// again; the store copies them once. An upload of no more than a tail is
// committed by copying the tail object; an empty one by a zero-byte PUT.
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
// and tail use If-Match, for the same reason. What is not guaranteed across
// processes: such a race can leave the upload unusable (the client must
// start over); an OpenUpload racing a write in another process can make one
// of them fail; a reader returned by OpenUpload fails if the upload is
// written while it reads. A store that ignores conditional headers loses
// the cross-process guarantees (versitygw, MinIO and AWS S3 honour them).
type S3 struct {
	cfg    S3Config
	client *minio.Client
	core   minio.Core
	bufs   sync.Pool // *[]byte of PartSize
	locks  uploadLocks
	copies sync.Map // multipart upload ids of copies in progress, which PurgeUploads leaves alone
}

var (
	_ Driver           = (*S3)(nil)
	_ Presigner        = (*S3)(nil)
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
	s3MaxParts        = 10000
	s3CopyConcurrency = 4
	s3MaxStateSize    = 1 << 20
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

// NewS3 connects to the bucket and checks that it exists and that the
// credentials are accepted (they need to list, read, write and delete
// objects in it, and to list and abort multipart uploads).
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
	s := &S3{cfg: cfg, client: client, core: minio.Core{Client: client}}
	s.bufs.New = func() any {
		b := make([]byte, cfg.PartSize)
		return &b
	}
	if err := s.checkBucket(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

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
		return fmt.Errorf("replication: s3 store %s: bucket %q does not exist at %s", s.cfg, s.cfg.Bucket, s.cfg.Endpoint)
	case isCredentialsError(err):
		return fmt.Errorf("replication: s3 store %s: %s refused the credentials (access key %q) for bucket %q: %w",
			s.cfg, s.cfg.Endpoint, s.cfg.AccessKey, s.cfg.Bucket, err)
	}
	return fmt.Errorf("replication: s3 store %s: checking bucket %q at %s: %w", s.cfg, s.cfg.Bucket, s.cfg.Endpoint, err)
}

// Endpoint is the store's host:port.
func (s *S3) Endpoint() string { return s.cfg.Endpoint }

// String names the store without its credentials.
func (s *S3) String() string { return s.cfg.String() }

// Stat implements Driver.
func (s *S3) Stat(ctx context.Context, dgst digest.Digest) (int64, error) {
	if err := checkDigest(dgst); err != nil {
		return 0, err
	}
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	info, err := s.client.StatObject(ctx, s.cfg.Bucket, s.blobKey(dgst), minio.StatObjectOptions{})
	if err != nil {
		return 0, s.blobError(dgst, err)
	}
	return info.Size, nil
}

// Open implements Driver with one (ranged) GET whose body streams to the
// caller.
func (s *S3) Open(ctx context.Context, dgst digest.Digest, offset int64) (io.ReadCloser, error) {
	if err := checkDigest(dgst); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if offset < 0 {
		return nil, fmt.Errorf("replication: open blob %s: negative offset %d", dgst, offset)
	}
	var opts minio.GetObjectOptions
	if offset > 0 {
		opts.SetRange(offset, 0) // bytes=offset-
	}
	body, _, _, err := s.core.GetObject(ctx, s.cfg.Bucket, s.blobKey(dgst), opts)
	if err == nil {
		return body, nil
	}
	if s3Code(err) != "InvalidRange" {
		return nil, s.blobError(dgst, err)
	}
	// S3 refuses a range that starts at the end; the contract wants an
	// empty reader there and an error beyond.
	size, serr := s.Stat(ctx, dgst)
	if serr != nil {
		return nil, serr
	}
	if offset == size {
		return io.NopCloser(bytes.NewReader(nil)), nil
	}
	return nil, fmt.Errorf("replication: open blob %s: offset %d outside its %d bytes", dgst, offset, size)
}

// Delete implements Driver. S3 deletes of absent keys succeed, so the blob
// is looked up first.
func (s *S3) Delete(ctx context.Context, dgst digest.Digest) error {
	if _, err := s.Stat(ctx, dgst); err != nil {
		return err
	}
	if err := s.client.RemoveObject(ctx, s.cfg.Bucket, s.blobKey(dgst), minio.RemoveObjectOptions{}); err != nil {
		return s.blobError(dgst, err)
	}
	return nil
}

// PresignGet implements Presigner. It does no I/O.
func (s *S3) PresignGet(ctx context.Context, dgst digest.Digest, ttl time.Duration) (*url.URL, error) {
	if err := checkDigest(dgst); err != nil {
		return nil, err
	}
	u, err := s.client.PresignedGetObject(ctx, s.cfg.Bucket, s.blobKey(dgst), ttl, nil)
	if err != nil {
		return nil, fmt.Errorf("replication: presign blob %s: %w", dgst, err)
	}
	return u, nil
}

// CopyBlob implements ServerSideCopier for a source S3 store on the same
// endpoint. The copy is made with this store's credentials; if they cannot
// read the source bucket, it reports ErrNotSameBackend. A copy is a single
// CopyObject or a multipart copy, either of which S3 makes visible only
// complete.
func (s *S3) CopyBlob(ctx context.Context, src Driver, dgst digest.Digest) error {
	if err := checkDigest(dgst); err != nil {
		return err
	}
	from, ok := src.(*S3)
	if !ok || !strings.EqualFold(from.cfg.Endpoint, s.cfg.Endpoint) || from.cfg.Secure != s.cfg.Secure {
		return fmt.Errorf("%w: %T is not on %s", ErrNotSameBackend, src, s)
	}
	srcKey, dstKey := from.blobKey(dgst), s.blobKey(dgst)
	info, err := from.client.StatObject(ctx, from.cfg.Bucket, srcKey, minio.StatObjectOptions{})
	if err != nil {
		return from.blobError(dgst, err)
	}
	if from.cfg.Bucket == s.cfg.Bucket && srcKey == dstKey {
		return nil
	}
	err = s.copyObjects(ctx, dstKey, []copySource{{from.cfg.Bucket, srcKey, info.Size, info.ETag}})
	if err != nil && s3Code(err) == "AccessDenied" && from.cfg.AccessKey != s.cfg.AccessKey {
		return fmt.Errorf("%w: the credentials of %s cannot read %s: %w", ErrNotSameBackend, s, from, err)
	}
	if err != nil {
		return s.blobError(dgst, err)
	}
	return nil
}

// StartUpload implements Driver: the upload exists once its state does.
func (s *S3) StartUpload(ctx context.Context) (string, error) {
	if err := ctx.Err(); err != nil {
		return "", err
	}
	id := newUploadID()
	if _, err := s.putState(ctx, id, &uploadState{}, ""); err != nil {
		return "", fmt.Errorf("replication: start upload: %w", err)
	}
	return id, nil
}

// WriteUpload implements Driver; see the type's comment for how a chunk is
// stored.
func (s *S3) WriteUpload(ctx context.Context, id string, offset int64, r io.Reader) (int64, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	unlock, st, etag, err := s.lockUpload(ctx, id)
	if err != nil {
		return 0, err
	}
	defer unlock()
	if offset != st.Size {
		return 0, fmt.Errorf("%w: write at %d, upload %s holds %d bytes", ErrUploadOffset, offset, id, st.Size)
	}
	a := &appender{s: s, ctx: ctx, id: id, st: st.clone()}
	defer a.release()
	n, err := a.append(r)
	if err == nil && n > 0 {
		if _, err = s.putState(ctx, id, &a.st, etag); err != nil {
			err = s.writeConflict(ctx, id, offset, err)
		}
	}
	if err != nil || n == 0 {
		a.discard()
		return 0, err
	}
	a.dropReplaced()
	return n, nil
}

// UploadSize implements Driver.
func (s *S3) UploadSize(ctx context.Context, id string) (int64, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	st, _, _, err := s.loadState(ctx, id)
	if err != nil {
		return 0, err
	}
	return st.Size, nil
}

// OpenUpload implements Driver. Parts cannot be read before their multipart
// upload is completed, so if the upload has parts, they are first completed
// into uploads/<id>/data (the base); the reader then streams the base and
// the tail, each pinned to its recorded ETag.
func (s *S3) OpenUpload(ctx context.Context, id string) (io.ReadCloser, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	unlock, st, etag, err := s.lockUpload(ctx, id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if st.MPU != "" && st.headSize() > st.baseSize() {
		if st, _, err = s.stage(ctx, id, st, etag, false); err != nil {
			return nil, err
		}
	}
	r := &objectsReader{ctx: ctx, s: s, objs: st.readable()}
	if err := r.next(); err != nil {
		return nil, fmt.Errorf("replication: open upload %s: %w", id, err)
	}
	return r, nil
}

// CommitUpload implements Driver: complete the multipart upload (tail
// included) into uploads/<id>/data, copy that server-side to the blob's key,
// remove the upload.
func (s *S3) CommitUpload(ctx context.Context, id string, size int64, dgst digest.Digest) error {
	if err := checkDigest(dgst); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	unlock, st, etag, err := s.lockUpload(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()
	if st.Size != size {
		return fmt.Errorf("%w: commit of %d bytes, upload %s holds %d", ErrUploadOffset, size, id, st.Size)
	}
	key := s.blobKey(dgst)
	info, err := s.client.StatObject(ctx, s.cfg.Bucket, key, minio.StatObjectOptions{})
	switch {
	case err == nil && info.Size == size:
		return s.removeUpload(ctx, id, st) // content-addressed: already there
	case err != nil && !isNoSuchKey(err):
		return s.blobError(dgst, err)
	}
	if st.MPU != "" {
		if st, _, err = s.stage(ctx, id, st, etag, true); err != nil {
			return err
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if srcs := st.readable(); len(srcs) == 0 {
		_, err = s.core.PutObject(ctx, s.cfg.Bucket, key, bytes.NewReader(nil), 0, "", "", s.putOptions())
	} else {
		cs := make([]copySource, len(srcs))
		for i, o := range srcs {
			cs[i] = copySource{s.cfg.Bucket, o.Key, o.Size, o.ETag}
		}
		err = s.copyObjects(ctx, key, cs)
	}
	if err != nil {
		return s3StorageError(fmt.Errorf("replication: commit upload %s as %s: %w", id, dgst, err))
	}
	return s.removeUpload(ctx, id, st)
}

// CancelUpload implements Driver.
func (s *S3) CancelUpload(ctx context.Context, id string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	unlock, st, _, err := s.lockUpload(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()
	return s.removeUpload(ctx, id, st)
}

// PurgeUploads implements Driver, using the state object's modification time
// (whole seconds on most stores). It also removes objects under uploads/
// left without a state, and aborts multipart uploads older than olderThan
// that no state records: those of failed writes, and copies into blobs/
// interrupted by a crash. Uploads this process is using are skipped.
func (s *S3) PurgeUploads(ctx context.Context, olderThan time.Time) (int, error) {
	type found struct {
		state  *minio.ObjectInfo
		others []minio.ObjectInfo
	}
	uploads := map[string]*found{}
	prefix := s.uploadsPrefix()
	lctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for obj := range s.client.ListObjects(lctx, s.cfg.Bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true}) {
		if obj.Err != nil {
			return 0, fmt.Errorf("replication: purge uploads: %w", obj.Err)
		}
		id, name, ok := strings.Cut(strings.TrimPrefix(obj.Key, prefix), "/")
		if !ok || !validUploadID(id) || name == "" || strings.HasSuffix(name, "/") {
			continue
		}
		f := uploads[id]
		if f == nil {
			f = &found{}
			uploads[id] = f
		}
		if name == "state" {
			f.state = &obj
		} else {
			f.others = append(f.others, obj)
		}
	}
	removed := 0
	kept := map[string]bool{} // uploads whose state stays
	for _, id := range slices.Sorted(maps.Keys(uploads)) {
		f := uploads[id]
		if f.state != nil && !f.state.LastModified.Before(olderThan) {
			kept[id] = true
			continue
		}
		ok, err := s.purgeUpload(ctx, id, olderThan, f.state != nil, f.others)
		if err != nil {
			return removed, fmt.Errorf("replication: purge uploads: %w", err)
		}
		if ok {
			removed++
		} else if f.state != nil {
			kept[id] = true
		}
	}
	if err := s.abortStaleMultipart(ctx, olderThan, kept); err != nil {
		return removed, fmt.Errorf("replication: purge uploads: %w", err)
	}
	return removed, nil
}

// purgeUpload removes upload id if this process is not using it and its
// state, re-read now, was last written before olderThan; with no state, it
// removes the leftovers written before olderThan. It reports whether an
// upload was removed.
func (s *S3) purgeUpload(ctx context.Context, id string, olderThan time.Time, hasState bool, others []minio.ObjectInfo) (bool, error) {
	unlock, ok := s.locks.tryLock(id)
	if !ok {
		return false, nil
	}
	defer unlock()
	removed := false
	if hasState {
		st, _, mod, err := s.loadState(ctx, id)
		switch {
		case errors.Is(err, ErrUploadNotFound):
		case err != nil:
			return false, err
		case !mod.Before(olderThan):
			return false, nil
		default:
			if err := s.removeUpload(ctx, id, st); err != nil {
				return false, err
			}
			removed = true
		}
	}
	for _, o := range others {
		if o.LastModified.Before(olderThan) || removed {
			if err := s.client.RemoveObject(ctx, s.cfg.Bucket, o.Key, minio.RemoveObjectOptions{}); err != nil && !isNoSuchKey(err) {
				return removed, err
			}
		}
	}
	return removed, nil
}

// abortStaleMultipart aborts multipart uploads under uploads/ and blobs/
// initiated before olderThan, except those recorded by the state of an
// upload in kept and those of uploads this process is using.
func (s *S3) abortStaleMultipart(ctx context.Context, olderThan time.Time, kept map[string]bool) error {
	recorded := map[string]string{} // upload id → its state's multipart upload, loaded on demand
	for _, prefix := range []string{s.uploadsPrefix(), s.cfg.Prefix + "blobs/"} {
		keyMarker, idMarker := "", ""
		for {
			res, err := s.core.ListMultipartUploads(ctx, s.cfg.Bucket, prefix, keyMarker, idMarker, "", 1000)
			if err != nil {
				return err
			}
			for _, u := range res.Uploads {
				if _, copying := s.copies.Load(u.UploadID); copying || !u.Initiated.Before(olderThan) {
					continue
				}
				id, _, _ := strings.Cut(strings.TrimPrefix(u.Key, s.uploadsPrefix()), "/")
				if strings.HasPrefix(u.Key, s.uploadsPrefix()) && validUploadID(id) {
					if s.locks.inUse(id) {
						continue
					}
					if kept[id] {
						mpu, ok := recorded[id]
						if !ok {
							st, _, _, err := s.loadState(ctx, id)
							if err != nil && !errors.Is(err, ErrUploadNotFound) {
								return err
							}
							mpu, recorded[id] = st.MPU, st.MPU
						}
						if mpu == u.UploadID {
							continue
						}
					}
				}
				if err := s.core.AbortMultipartUpload(ctx, s.cfg.Bucket, u.Key, u.UploadID); err != nil && s3Code(err) != "NoSuchUpload" {
					return err
				}
			}
			if !res.IsTruncated {
				break
			}
			keyMarker, idMarker = res.NextKeyMarker, res.NextUploadIDMarker
		}
	}
	return nil
}

// uploadState is the JSON state object of an upload. Its bytes are, in
// order: the head, then the tail. The head is the multipart upload's
// recorded parts when MPU is set (whose first parts are copies of Base, if
// any), else Base, else nothing.
type uploadState struct {
	Seq   int64     `json:"seq"` // incremented by every write, so every version's ETag differs
	Size  int64     `json:"size"`
	Base  *s3Object `json:"base,omitempty"`  // completed uploads/<id>/data: the first Base.Size bytes
	MPU   string    `json:"mpu,omitempty"`   // multipart upload at uploads/<id>/data
	Parts []s3Part  `json:"parts,omitempty"` // its recorded parts, ascending
	Tail  *s3Object `json:"tail,omitempty"`  // parked bytes, fewer than S3MinPartSize
}

type s3Object struct {
	Key  string `json:"key"`
	Size int64  `json:"size"`
	ETag string `json:"etag"`
}

type s3Part struct {
	N    int    `json:"n"`
	Size int64  `json:"size"`
	ETag string `json:"etag"`
}

func (st *uploadState) clone() uploadState {
	c := *st
	c.Parts = slices.Clone(st.Parts)
	return c
}

func (st *uploadState) baseSize() int64 {
	if st.Base == nil {
		return 0
	}
	return st.Base.Size
}

func (st *uploadState) headSize() int64 {
	if st.MPU == "" {
		return st.baseSize()
	}
	var n int64
	for _, p := range st.Parts {
		n += p.Size
	}
	return n
}

func (st *uploadState) tailSize() int64 {
	if st.Tail == nil {
		return 0
	}
	return st.Tail.Size
}

// readable lists the objects holding the upload's bytes, in order; valid
// only when the head is not an uncompleted multipart upload.
func (st *uploadState) readable() []s3Object {
	var objs []s3Object
	if st.Base != nil && st.Base.Size > 0 {
		objs = append(objs, *st.Base)
	}
	if st.Tail != nil {
		objs = append(objs, *st.Tail)
	}
	return objs
}

func (st *uploadState) nextPart() int {
	if len(st.Parts) == 0 {
		return 1
	}
	return st.Parts[len(st.Parts)-1].N + 1
}

func (st *uploadState) check() error {
	if st.MPU != "" && len(st.Parts) == 0 {
		return errors.New("multipart upload without parts")
	}
	if st.Size != st.headSize()+st.tailSize() {
		return fmt.Errorf("size %d is not head %d + tail %d", st.Size, st.headSize(), st.tailSize())
	}
	return nil
}

// appender adds one chunk to an upload. It changes nothing the recorded
// state refers to: new bytes go to part numbers above the recorded ones (in
// a new multipart upload if there is none) and to a new tail object, so
// discard leaves the upload as it was.
type appender struct {
	s   *S3
	ctx context.Context
	id  string
	st  uploadState // the state being built

	bufp       *[]byte // from s.bufs
	buf        []byte
	n          int       // bytes in buf
	tailLoaded bool      // the old tail's bytes are in buf[:len]
	replaced   *s3Object // old tail, to delete once the new state is recorded
	createdMPU string
	newTail    *s3Object
}

// append reads r to its end, storing parts as the buffer fills, and parks
// the remainder. It returns the bytes read from r.
func (a *appender) append(r io.Reader) (int64, error) {
	a.bufp = a.s.bufs.Get().(*[]byte)
	a.buf = *a.bufp
	a.n = int(a.st.tailSize()) // reserved for the old tail, read only if r has bytes
	var read int64
	for {
		m, rerr := fill(r, a.buf[a.n:])
		a.n += m
		read += int64(m)
		if a.n == len(a.buf) {
			if err := a.flushPart(); err != nil {
				return 0, err
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return 0, fmt.Errorf("replication: write upload %s: reading input failed after %d bytes, chunk dropped: %w", a.id, read, rerr)
		}
		if err := a.ctx.Err(); err != nil {
			return 0, err
		}
	}
	if read == 0 {
		return 0, nil
	}
	if err := a.finish(); err != nil {
		return 0, err
	}
	a.st.Size += read
	return read, nil
}

// finish stores what is left in the buffer: as a part if S3 accepts one
// that small in the middle of an upload, else as the new tail.
func (a *appender) finish() error {
	if err := a.loadTail(); err != nil {
		return err
	}
	if a.n >= S3MinPartSize {
		return a.flushPart()
	}
	if a.n == 0 {
		return nil
	}
	key := a.s.uploadKey(a.id, "tail."+hex.EncodeToString(randomBytes(8)))
	info, err := a.s.core.PutObject(a.ctx, a.s.cfg.Bucket, key, bytes.NewReader(a.buf[:a.n]), int64(a.n), "", "", a.s.putOptions())
	if err != nil {
		return s3StorageError(fmt.Errorf("replication: write upload %s: %w", a.id, err))
	}
	a.newTail = &s3Object{Key: key, Size: int64(a.n), ETag: trimETag(info.ETag)}
	a.st.Tail = a.newTail
	return nil
}

// flushPart stores the buffer as the next part.
func (a *appender) flushPart() error {
	if err := a.loadTail(); err != nil {
		return err
	}
	if err := a.ensureMPU(); err != nil {
		return err
	}
	n := a.st.nextPart()
	if n > s3MaxParts {
		return fmt.Errorf("replication: write upload %s: more than S3's %d parts (send larger chunks or raise the part size)", a.id, s3MaxParts)
	}
	p, err := a.s.core.PutObjectPart(a.ctx, a.s.cfg.Bucket, a.s.uploadKey(a.id, "data"), a.st.MPU, n,
		bytes.NewReader(a.buf[:a.n]), int64(a.n), minio.PutObjectPartOptions{})
	if err != nil {
		return s3StorageError(fmt.Errorf("replication: write upload %s: part %d: %w", a.id, n, err))
	}
	a.st.Parts = append(a.st.Parts, s3Part{N: n, Size: int64(a.n), ETag: trimETag(p.ETag)})
	a.n = 0
	return nil
}

// loadTail reads the recorded tail into the front of the buffer, once.
func (a *appender) loadTail() error {
	if a.tailLoaded || a.st.Tail == nil {
		return nil
	}
	old := a.st.Tail
	body, err := a.s.getPinned(a.ctx, *old)
	if err == nil {
		_, err = io.ReadFull(body, a.buf[:old.Size])
		body.Close()
	}
	if err != nil {
		return fmt.Errorf("replication: write upload %s: reading its tail: %w", a.id, err)
	}
	a.tailLoaded, a.replaced, a.st.Tail = true, old, nil
	return nil
}

// ensureMPU starts a multipart upload if the state has none, beginning it
// with server-side copies of the base.
func (a *appender) ensureMPU() error {
	if a.st.MPU != "" {
		return nil
	}
	key := a.s.uploadKey(a.id, "data")
	mpu, err := a.s.core.NewMultipartUpload(a.ctx, a.s.cfg.Bucket, key, a.s.putOptions())
	if err != nil {
		return s3StorageError(fmt.Errorf("replication: write upload %s: %w", a.id, err))
	}
	a.createdMPU, a.st.MPU = mpu, mpu
	if b := a.st.Base; b != nil && b.Size > 0 {
		parts, err := a.s.copyParts(a.ctx, key, mpu, 1, []copySource{{a.s.cfg.Bucket, b.Key, b.Size, b.ETag}})
		if err != nil {
			return s3StorageError(fmt.Errorf("replication: write upload %s: copying its base: %w", a.id, err))
		}
		a.st.Parts = parts
	}
	return nil
}

// discard removes what this chunk stored, best effort: leftovers are
// unrecorded, so they are never used, and PurgeUploads removes them.
func (a *appender) discard() {
	ctx, cancel := cleanupContext(a.ctx)
	defer cancel()
	if a.newTail != nil {
		a.s.client.RemoveObject(ctx, a.s.cfg.Bucket, a.newTail.Key, minio.RemoveObjectOptions{})
	}
	if a.createdMPU != "" {
		a.s.core.AbortMultipartUpload(ctx, a.s.cfg.Bucket, a.s.uploadKey(a.id, "data"), a.createdMPU)
	}
}

// dropReplaced deletes the tail the recorded state no longer refers to.
func (a *appender) dropReplaced() {
	if a.replaced != nil {
		ctx, cancel := cleanupContext(a.ctx)
		defer cancel()
		a.s.client.RemoveObject(ctx, a.s.cfg.Bucket, a.replaced.Key, minio.RemoveObjectOptions{})
	}
}

func (a *appender) release() {
	if a.bufp != nil {
		a.s.bufs.Put(a.bufp)
		a.bufp, a.buf = nil, nil
	}
}

// stage completes the upload's multipart upload into uploads/<id>/data,
// with the tail as the last part if withTail, and records the result as the
// base. It returns the new state and its ETag.
func (s *S3) stage(ctx context.Context, id string, st uploadState, etag string, withTail bool) (uploadState, string, error) {
	key := s.uploadKey(id, "data")
	next := st.clone()
	parts := next.Parts
	if withTail && st.Tail != nil {
		n := st.nextPart()
		p, err := s.core.CopyObjectPart(ctx, s.cfg.Bucket, st.Tail.Key, s.cfg.Bucket, key, st.MPU, n, 0, st.Tail.Size,
			ifMatchSource(st.Tail.ETag))
		if err != nil {
			return st, "", s3StorageError(fmt.Errorf("replication: upload %s: copying its tail: %w", id, err))
		}
		parts = append(parts, s3Part{N: n, Size: st.Tail.Size, ETag: trimETag(p.ETag)})
		next.Tail = nil
	}
	complete := make([]minio.CompletePart, len(parts))
	var size int64
	for i, p := range parts {
		complete[i] = minio.CompletePart{PartNumber: p.N, ETag: p.ETag}
		size += p.Size
	}
	info, err := s.core.CompleteMultipartUpload(ctx, s.cfg.Bucket, key, st.MPU, complete, s.putOptions())
	if err != nil {
		if s3Code(err) == "InvalidPart" {
			err = fmt.Errorf("a part was overwritten by a concurrent write from another process, the upload cannot be completed: %w", err)
		}
		return st, "", s3StorageError(fmt.Errorf("replication: upload %s: completing its parts: %w", id, err))
	}
	next.Base = &s3Object{Key: key, Size: size, ETag: trimETag(info.ETag)}
	next.MPU, next.Parts = "", nil
	newETag, err := s.putState(ctx, id, &next, etag)
	if err != nil {
		return st, "", fmt.Errorf("replication: upload %s: %w", id, err)
	}
	if withTail && st.Tail != nil {
		cctx, cancel := cleanupContext(ctx)
		defer cancel()
		s.client.RemoveObject(cctx, s.cfg.Bucket, st.Tail.Key, minio.RemoveObjectOptions{})
	}
	return next, newETag, nil
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
// pinned to its source's ETag.
func (s *S3) copyObjects(ctx context.Context, dstKey string, srcs []copySource) error {
	if len(srcs) == 1 && srcs[0].size <= s.cfg.CopyPartSize {
		src := srcs[0]
		_, err := s.core.CopyObject(ctx, src.bucket, src.key, s.cfg.Bucket, dstKey, ifMatchSource(src.etag),
			minio.CopySrcOptions{}, s.putOptions())
		return err
	}
	mpu, err := s.core.NewMultipartUpload(ctx, s.cfg.Bucket, dstKey, s.putOptions())
	if err != nil {
		return err
	}
	s.copies.Store(mpu, struct{}{})
	defer s.copies.Delete(mpu)
	parts, err := s.copyParts(ctx, dstKey, mpu, 1, srcs)
	if err == nil {
		complete := make([]minio.CompletePart, len(parts))
		for i, p := range parts {
			complete[i] = minio.CompletePart{PartNumber: p.N, ETag: p.ETag}
		}
		_, err = s.core.CompleteMultipartUpload(ctx, s.cfg.Bucket, dstKey, mpu, complete, s.putOptions())
	}
	if err != nil {
		cctx, cancel := cleanupContext(ctx)
		defer cancel()
		s.core.AbortMultipartUpload(cctx, s.cfg.Bucket, dstKey, mpu)
	}
	return err
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

// lockUpload takes this process's lock on upload id and loads its state.
func (s *S3) lockUpload(ctx context.Context, id string) (unlock func(), st uploadState, etag string, err error) {
	if !validUploadID(id) {
		return nil, st, "", fmt.Errorf("%w: malformed id %q", ErrUploadNotFound, id)
	}
	unlock, err = s.locks.lock(ctx, id)
	if err != nil {
		return nil, st, "", fmt.Errorf("replication: lock upload %s: %w", id, err)
	}
	st, etag, _, err = s.loadState(ctx, id)
	if err != nil {
		unlock()
		return nil, st, "", err
	}
	return unlock, st, etag, nil
}

// loadState reads upload id's state, its ETag and modification time.
func (s *S3) loadState(ctx context.Context, id string) (uploadState, string, time.Time, error) {
	var st uploadState
	if !validUploadID(id) {
		return st, "", time.Time{}, fmt.Errorf("%w: malformed id %q", ErrUploadNotFound, id)
	}
	body, info, _, err := s.core.GetObject(ctx, s.cfg.Bucket, s.uploadKey(id, "state"), minio.GetObjectOptions{})
	if err != nil {
		if isNoSuchKey(err) {
			return st, "", time.Time{}, fmt.Errorf("%w: %s", ErrUploadNotFound, id)
		}
		return st, "", time.Time{}, s3StorageError(fmt.Errorf("replication: upload %s: reading its state: %w", id, err))
	}
	defer body.Close()
	b, err := io.ReadAll(io.LimitReader(body, s3MaxStateSize))
	if err != nil {
		return st, "", time.Time{}, fmt.Errorf("replication: upload %s: reading its state: %w", id, err)
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, "", time.Time{}, fmt.Errorf("replication: upload %s: corrupt state: %w", id, err)
	}
	if err := st.check(); err != nil {
		return st, "", time.Time{}, fmt.Errorf("replication: upload %s: corrupt state: %w", id, err)
	}
	return st, trimETag(info.ETag), info.LastModified, nil
}

// putState writes upload id's state if its current ETag is matchETag, or,
// with matchETag empty, if it has none. It bumps st.Seq and returns the new
// ETag. A state that changed meanwhile gives an error with S3 code
// PreconditionFailed; one that was removed, ErrUploadNotFound.
func (s *S3) putState(ctx context.Context, id string, st *uploadState, matchETag string) (string, error) {
	st.Seq++
	b, err := json.Marshal(st)
	if err != nil {
		return "", err
	}
	opts := s.putOptions()
	opts.ContentType = "application/json"
	if matchETag == "" {
		opts.SetMatchETagExcept("*")
	} else {
		opts.SetMatchETag(matchETag)
	}
	info, err := s.core.PutObject(ctx, s.cfg.Bucket, s.uploadKey(id, "state"), bytes.NewReader(b), int64(len(b)), "", "", opts)
	if err != nil {
		if isNoSuchKey(err) {
			return "", fmt.Errorf("%w: %s (removed meanwhile)", ErrUploadNotFound, id)
		}
		return "", s3StorageError(fmt.Errorf("replication: upload %s: writing its state: %w", id, err))
	}
	return trimETag(info.ETag), nil
}

// writeConflict explains a failed state write of a chunk at offset: if
// another process wrote a chunk first, ErrUploadOffset, as for a write at a
// stale offset.
func (s *S3) writeConflict(ctx context.Context, id string, offset int64, err error) error {
	if s3Code(err) != "PreconditionFailed" {
		return err
	}
	st, _, _, lerr := s.loadState(ctx, id)
	if lerr != nil {
		return lerr
	}
	if st.Size != offset {
		return fmt.Errorf("%w: write at %d, upload %s now holds %d bytes (written concurrently)", ErrUploadOffset, offset, id, st.Size)
	}
	return fmt.Errorf("replication: write upload %s: changed by another process during the write, chunk dropped: %w", id, err)
}

// removeUpload deletes upload id: first its state, so the id is gone even
// if the rest fails (PurgeUploads removes leftovers), then its objects and
// multipart upload.
func (s *S3) removeUpload(ctx context.Context, id string, st uploadState) error {
	ctx, cancel := cleanupContext(ctx)
	defer cancel()
	if err := s.client.RemoveObject(ctx, s.cfg.Bucket, s.uploadKey(id, "state"), minio.RemoveObjectOptions{}); err != nil {
		return fmt.Errorf("replication: removing upload %s: %w", id, err)
	}
	if st.MPU != "" {
		s.core.AbortMultipartUpload(ctx, s.cfg.Bucket, s.uploadKey(id, "data"), st.MPU)
	}
	for _, o := range st.readable() {
		s.client.RemoveObject(ctx, s.cfg.Bucket, o.Key, minio.RemoveObjectOptions{})
	}
	return nil
}

// getPinned starts reading object o, failing if it is no longer the version
// recorded (its ETag changed).
func (s *S3) getPinned(ctx context.Context, o s3Object) (io.ReadCloser, error) {
	var opts minio.GetObjectOptions
	if err := opts.SetMatchETag(o.ETag); err != nil {
		return nil, err
	}
	body, _, _, err := s.core.GetObject(ctx, s.cfg.Bucket, o.Key, opts)
	return body, err
}

// objectsReader streams a list of objects one after the other, checking
// that each has its recorded size.
type objectsReader struct {
	ctx  context.Context
	s    *S3
	objs []s3Object
	cur  io.ReadCloser
	left int64 // bytes still expected from cur
}

func (r *objectsReader) next() error {
	if len(r.objs) == 0 {
		return nil
	}
	body, err := r.s.getPinned(r.ctx, r.objs[0])
	if err != nil {
		return err
	}
	r.cur, r.left, r.objs = body, r.objs[0].Size, r.objs[1:]
	return nil
}

func (r *objectsReader) Read(p []byte) (int, error) {
	for {
		if r.cur == nil {
			if len(r.objs) == 0 {
				return 0, io.EOF
			}
			if err := r.next(); err != nil {
				return 0, err
			}
		}
		n, err := r.cur.Read(p)
		r.left -= int64(n)
		if err == io.EOF {
			r.cur.Close()
			r.cur = nil
			if r.left != 0 {
				return n, io.ErrUnexpectedEOF
			}
			if n == 0 {
				continue
			}
			return n, nil
		}
		return n, err
	}
}

func (r *objectsReader) Close() error {
	if r.cur != nil {
		return r.cur.Close()
	}
	return nil
}

func (s *S3) blobKey(dgst digest.Digest) string {
	return s.cfg.Prefix + "blobs/" + dgst.Algorithm().String() + "/" + dgst.Encoded()
}

func (s *S3) uploadsPrefix() string { return s.cfg.Prefix + "uploads/" }

func (s *S3) uploadKey(id, name string) string { return s.uploadsPrefix() + id + "/" + name }

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

// uploadLocks serializes, within this process, the operations that change
// an upload.
type uploadLocks struct {
	mu sync.Mutex
	m  map[string]*uploadLock
}

type uploadLock struct {
	ch   chan struct{} // holds a token while locked
	refs int
}

func (l *uploadLocks) entry(id string) *uploadLock {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.m == nil {
		l.m = map[string]*uploadLock{}
	}
	e := l.m[id]
	if e == nil {
		e = &uploadLock{ch: make(chan struct{}, 1)}
		l.m[id] = e
	}
	e.refs++
	return e
}

func (l *uploadLocks) release(id string, e *uploadLock) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e.refs--; e.refs == 0 {
		delete(l.m, id)
	}
}

// lock waits for upload id's lock until ctx ends.
func (l *uploadLocks) lock(ctx context.Context, id string) (func(), error) {
	e := l.entry(id)
	select {
	case e.ch <- struct{}{}:
		return func() { <-e.ch; l.release(id, e) }, nil
	case <-ctx.Done():
		l.release(id, e)
		return nil, ctx.Err()
	}
}

func (l *uploadLocks) tryLock(id string) (func(), bool) {
	e := l.entry(id)
	select {
	case e.ch <- struct{}{}:
		return func() { <-e.ch; l.release(id, e) }, true
	default:
		l.release(id, e)
		return nil, false
	}
}

func (l *uploadLocks) inUse(id string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.m[id] != nil
}
