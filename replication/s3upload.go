package replication

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/opencontainers/go-digest"
)

// This file holds the S3 driver's uploads: the state machine its type
// comment describes (sections Uploads, Intents and Concurrency).

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
	if st.Intent != nil {
		return 0, errCommitting(id)
	}
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
	if st.Intent != nil {
		return 0, errCommitting(id)
	}
	return st.Size, nil
}

// OpenUpload implements Driver. Parts cannot be read before their multipart
// upload is completed, so if the upload has parts, it is first completed
// into data/<id> (the base), tail included; the reader then streams the
// base and the tail, each pinned to its recorded ETag.
func (s *S3) OpenUpload(ctx context.Context, id string) (io.ReadCloser, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	unlock, st, etag, err := s.lockUpload(ctx, id)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if st.Intent != nil {
		return nil, errCommitting(id)
	}
	if st.MPU != "" && st.headSize() > st.baseSize() {
		if st, _, err = s.complete(ctx, id, st, etag, nil); err != nil {
			return nil, err
		}
	}
	r := &objectsReader{ctx: ctx, s: s, objs: st.readable()}
	if err := r.next(); err != nil {
		return nil, fmt.Errorf("replication: open upload %s: %w", id, err)
	}
	return r, nil
}

// CommitUpload implements Driver: complete the upload into data/<id>, record
// the intent, link the digest to data/<id>, remove the upload. No step reads
// or copies more than the tail. A commit that failed after recording its
// intent is resumed by a retry with the same digest.
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
	data := s.dataKey(id)
	if in := st.Intent; in != nil && (in.Digest != dgst || in.Data != data || st.Base == nil) {
		return fmt.Errorf("%w: %s is being committed as %s", ErrUploadNotFound, id, in.Digest)
	}
	if st.Size != size {
		return fmt.Errorf("%w: commit of %d bytes, upload %s holds %d", ErrUploadOffset, size, id, st.Size)
	}
	present, replace, err := s.lookup(ctx, dgst, true) // kept only once hashed
	switch {
	case err != nil:
		return err
	case present && st.Intent == nil:
		return s.removeUpload(ctx, id, st, false) // content-addressed: already there
	case st.Intent == nil:
		st, _, err = s.complete(ctx, id, st, etag, &s3Intent{Digest: dgst, Data: data})
	default:
		// Resuming: rewrite the state, so that a purge racing us sees it
		// fresh (and a commit racing us in another process fails).
		_, err = s.putState(ctx, id, &st, etag)
	}
	if err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	linked, err := s.link(ctx, dgst, s3Link{Data: s.rel(data), Size: size, ETag: st.Base.ETag}, replace)
	if err != nil {
		return fmt.Errorf("replication: commit upload %s as %s: %w", id, dgst, err)
	}
	return s.removeUpload(ctx, id, st, linked)
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
	return s.settle(ctx, id, st)
}

// PurgeUploads implements Driver, using the state object's modification time
// (whole seconds on most stores). Stale states with an intent (commits,
// copies and deletes that were interrupted) count as uploads: their data
// object goes unless their digest links to it. It also removes objects
// under uploads/ left without a state, and aborts multipart uploads under
// data/ older than olderThan that no state records: those of failed writes
// and of interrupted copies. Uploads this process is using are skipped.
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
			if err := s.settle(ctx, id, st); err != nil {
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

// abortStaleMultipart aborts multipart uploads under data/ initiated before
// olderThan, except those recorded by the state of an upload in kept and
// those of uploads (and copies) this process is using. Aborting never
// touches a completed object at the same key.
func (s *S3) abortStaleMultipart(ctx context.Context, olderThan time.Time, kept map[string]bool) error {
	recorded := map[string]string{} // upload id → its state's multipart upload, loaded on demand
	keyMarker, idMarker := "", ""
	for {
		res, err := s.core.ListMultipartUploads(ctx, s.cfg.Bucket, s.dataPrefix(), keyMarker, idMarker, "", 1000)
		if err != nil {
			return err
		}
		for _, u := range res.Uploads {
			if !u.Initiated.Before(olderThan) {
				continue
			}
			if id := strings.TrimPrefix(u.Key, s.dataPrefix()); validUploadID(id) {
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
			return nil
		}
		keyMarker, idMarker = res.NextKeyMarker, res.NextUploadIDMarker
	}
}

// errCommitting is the error of upload operations other than CommitUpload
// on an upload whose state records an intent: as far as writers and readers
// are concerned, it is committed.
func errCommitting(id string) error {
	return fmt.Errorf("%w: %s is being committed", ErrUploadNotFound, id)
}

// uploadState is the JSON state object of an upload. Its bytes are, in
// order: the head, then the tail. The head is the multipart upload's
// recorded parts when MPU is set (whose first parts are copies of Base, if
// any), else Base, else nothing. Bytes follow a base only inside a
// multipart upload (with the tail), so completing it in place never needs
// the base copied.
type uploadState struct {
	Seq    int64     `json:"seq"` // incremented by every write, so every version's ETag differs
	Size   int64     `json:"size"`
	Base   *s3Object `json:"base,omitempty"`   // completed data/<id>: the first Base.Size bytes
	MPU    string    `json:"mpu,omitempty"`    // multipart upload at data/<id>
	Parts  []s3Part  `json:"parts,omitempty"`  // its recorded parts, ascending
	Tail   *s3Object `json:"tail,omitempty"`   // parked bytes, fewer than S3MinPartSize
	Intent *s3Intent `json:"intent,omitempty"` // set once Base may be linked (or, for a copy or delete, its data object)
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
	switch {
	case st.MPU != "" && len(st.Parts) == 0:
		return errors.New("multipart upload without parts")
	case st.MPU == "" && st.baseSize() > 0 && st.Tail != nil:
		return errors.New("a tail after a completed base outside a multipart upload")
	case st.Size != st.headSize()+st.tailSize():
		return fmt.Errorf("size %d is not head %d + tail %d", st.Size, st.headSize(), st.tailSize())
	}
	if st.Intent != nil {
		if err := checkDigest(st.Intent.Digest); err != nil || st.Intent.Data == "" {
			return fmt.Errorf("intent %+v", *st.Intent)
		}
	}
	return nil
}

// complete puts all the bytes of upload id into its data object, data/<id>,
// records that as the base, with intent (nil from OpenUpload), and returns
// the new state and its ETag. The multipart upload is completed in place,
// the tail copied in as its last part; an upload of only a tail is a copy of
// the tail, an empty one a zero-byte PUT; a base alone is already complete.
// Nothing is read or copied but the tail.
func (s *S3) complete(ctx context.Context, id string, st uploadState, etag string, intent *s3Intent) (uploadState, string, error) {
	key := s.dataKey(id)
	next := st.clone()
	switch {
	case st.MPU != "":
		parts := next.Parts
		if st.Tail != nil {
			n := st.nextPart()
			p, err := s.core.CopyObjectPart(ctx, s.cfg.Bucket, st.Tail.Key, s.cfg.Bucket, key, st.MPU, n, 0, st.Tail.Size,
				ifMatchSource(st.Tail.ETag))
			if err != nil {
				return st, "", s3StorageError(fmt.Errorf("replication: upload %s: copying its tail: %w", id, err))
			}
			parts = append(parts, s3Part{N: n, Size: st.Tail.Size, ETag: trimETag(p.ETag)})
		}
		info, err := s.core.CompleteMultipartUpload(ctx, s.cfg.Bucket, key, st.MPU, completeParts(parts), s.putOptions())
		if err != nil {
			if s3Code(err) == "InvalidPart" {
				err = fmt.Errorf("a part was overwritten by a concurrent write from another process, the upload cannot be completed: %w", err)
			}
			return st, "", s3StorageError(fmt.Errorf("replication: upload %s: completing its parts: %w", id, err))
		}
		next.Base = &s3Object{Key: key, Size: st.Size, ETag: trimETag(info.ETag)}
	case st.Tail != nil: // no base: check forbids one before a tail here
		info, err := s.core.CopyObject(ctx, s.cfg.Bucket, st.Tail.Key, s.cfg.Bucket, key, ifMatchSource(st.Tail.ETag),
			minio.CopySrcOptions{}, s.putOptions())
		if err != nil {
			return st, "", s3StorageError(fmt.Errorf("replication: upload %s: copying its tail: %w", id, err))
		}
		next.Base = &s3Object{Key: key, Size: st.Size, ETag: trimETag(info.ETag)}
	case st.Base == nil:
		info, err := s.core.PutObject(ctx, s.cfg.Bucket, key, bytes.NewReader(nil), 0, "", "", s.putOptions())
		if err != nil {
			return st, "", s3StorageError(fmt.Errorf("replication: upload %s: %w", id, err))
		}
		next.Base = &s3Object{Key: key, ETag: trimETag(info.ETag)}
	}
	next.MPU, next.Parts, next.Tail, next.Intent = "", nil, nil, intent
	newETag, err := s.putState(ctx, id, &next, etag)
	if err != nil {
		return st, "", fmt.Errorf("replication: upload %s: %w", id, err)
	}
	if st.Tail != nil {
		cctx, cancel := cleanupContext(ctx)
		defer cancel()
		s.client.RemoveObject(cctx, s.cfg.Bucket, st.Tail.Key, minio.RemoveObjectOptions{})
	}
	return next, newETag, nil
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

// removeUpload deletes upload id: first its data object unless keepData
// (the intent's, else data/<id>), then its multipart upload and tail, and
// its state last, so that a state, and the intent in it, outlives anything
// it may have left behind. Failing to remove the data or the state fails
// it, with the state kept for PurgeUploads; other leftovers are unrecorded,
// and PurgeUploads removes them.
func (s *S3) removeUpload(ctx context.Context, id string, st uploadState, keepData bool) error {
	ctx, cancel := cleanupContext(ctx)
	defer cancel()
	if !keepData {
		data := s.dataKey(id)
		if st.Intent != nil {
			data = st.Intent.Data
		}
		if err := s.client.RemoveObject(ctx, s.cfg.Bucket, data, minio.RemoveObjectOptions{}); err != nil {
			return fmt.Errorf("replication: removing upload %s: %w", id, err)
		}
	}
	if st.MPU != "" {
		s.core.AbortMultipartUpload(ctx, s.cfg.Bucket, s.dataKey(id), st.MPU)
	}
	if st.Tail != nil {
		s.client.RemoveObject(ctx, s.cfg.Bucket, st.Tail.Key, minio.RemoveObjectOptions{})
	}
	if err := s.client.RemoveObject(ctx, s.cfg.Bucket, s.uploadKey(id, "state"), minio.RemoveObjectOptions{}); err != nil {
		return fmt.Errorf("replication: removing upload %s: %w", id, err)
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
// that small in the middle of an upload, else as the new tail, behind a
// multipart upload that starts with the base if there is one.
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
	if a.st.baseSize() > 0 {
		if err := a.ensureMPU(); err != nil {
			return err
		}
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
	p, err := a.s.core.PutObjectPart(a.ctx, a.s.cfg.Bucket, a.s.dataKey(a.id), a.st.MPU, n,
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
	key := a.s.dataKey(a.id)
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
		a.s.core.AbortMultipartUpload(ctx, a.s.cfg.Bucket, a.s.dataKey(a.id), a.createdMPU)
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
