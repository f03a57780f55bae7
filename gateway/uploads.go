package gateway

import (
	"context"
	"crypto/sha256"
	"crypto/sha512"
	"encoding"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
	"github.com/meridian-registry/meridian/replication"
)

// startUpload handles POST …/blobs/uploads/: a cross-repository mount, a
// monolithic upload (?digest=), or the start of an upload session.
func (g *Gateway) startUpload(w http.ResponseWriter, r *http.Request, rt route) error {
	q := r.URL.Query()
	if m := q.Get("mount"); m != "" {
		mounted, err := g.mount(w, r, rt, m, q.Get("from"))
		if mounted || err != nil {
			return err
		}
		// Not mountable: the spec says to answer with a new session instead.
	}
	key, err := g.sealingKey(r.Context())
	if err != nil {
		return err
	}
	var want digest.Digest
	if ds, ok := q["digest"]; ok {
		if want, err = parseDigest(ds[0]); err != nil {
			return err
		}
	}
	region, store, id, err := g.openUpload(r.Context(), rt.name)
	if err != nil {
		return err
	}
	st := uploadState{Repo: rt.name, Region: region, ID: id, Expires: time.Now().Add(g.cfg.UploadTTL).Unix()}
	if want == "" {
		minChunk := g.cfg.ChunkMinLength
		if h, ok := store.(replication.ChunkHinter); ok {
			minChunk = max(minChunk, h.MinChunkLength())
		}
		if minChunk > 0 {
			w.Header().Set("OCI-Chunk-Min-Length", itoa(minChunk))
		}
		return g.writeSession(w, rt, key, st, http.StatusAccepted)
	}
	// Monolithic: the body is the whole blob.
	if st, err = g.receive(r, store, st); err == nil {
		err = g.complete(w, r, rt, store, st, want)
	}
	if err != nil {
		store.CancelUpload(context.WithoutCancel(r.Context()), id)
	}
	return err
}

// openUpload starts an upload in the nearest region the repository lives in,
// falling back to farther ones while stores fail.
func (g *Gateway) openUpload(ctx context.Context, repo string) (string, replication.Driver, string, error) {
	pol, err := g.meta.Policy(ctx, repo)
	if err != nil {
		return "", nil, "", err
	}
	regions := g.stores.Nearest(pol.Regions)
	if len(regions) == 0 {
		// The topology is not recorded yet (a new cluster): use our own.
		regions = []string{g.stores.Local()}
	}
	var lastErr error
	for _, region := range regions {
		store, ok := g.stores.Driver(region)
		if !ok {
			continue
		}
		start := time.Now()
		id, err := store.StartUpload(ctx)
		g.stores.Observe(region, time.Since(start), err)
		if err == nil {
			return region, store, id, nil
		}
		if errors.Is(err, replication.ErrStorageFull) {
			return "", nil, "", g.storeError(err)
		}
		g.logger.Warn("cannot start an upload; trying the next region", "region", region, "err", err)
		lastErr = err
	}
	if lastErr == nil {
		lastErr = fmt.Errorf("no store of regions %v is reachable", regions)
	}
	g.logger.Error("no blob store can take an upload", "repository", repo, "regions", regions, "err", lastErr)
	return "", nil, "", errorf(CodeUnavailable, "no blob store of this repository's regions can take the upload")
}

// sessionStore returns the store holding a session's bytes.
func (g *Gateway) sessionStore(st uploadState) (replication.Driver, error) {
	d, ok := g.stores.Driver(st.Region)
	if !ok {
		return nil, errorf(CodeBlobUploadUnknown, "upload session is in region %q, which this registry does not have", st.Region)
	}
	return d, nil
}

// mount links a blob that already exists into rt.name. It reports false when
// the blob cannot be mounted, so the caller starts a session instead.
func (g *Gateway) mount(w http.ResponseWriter, r *http.Request, rt route, m, from string) (bool, error) {
	d, err := parseDigest(m)
	if err != nil {
		return false, nil
	}
	if from != "" && validateName(from) != nil {
		return false, nil
	}
	if !mayMountFrom(r.Context(), from) {
		// Mounting would reveal another repository's blob: upload instead.
		return false, nil
	}
	err = g.meta.Commit(r.Context(), &pb.Command{Intent: &pb.Command_LinkBlob{
		LinkBlob: &pb.LinkBlob{Repository: rt.name, Digest: d.String(), MountFrom: from}}})
	if errors.Is(err, pb.ErrBlobUnknown) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return true, g.finish(w, r, rt, d)
}

// session verifies the token in the path and finds the store of its
// upload. It also returns the key that seals the session's next token: the
// newest, so sessions move onto a rotated key as they go.
func (g *Gateway) session(r *http.Request, rt route) (uploadState, *pb.UploadKey, replication.Driver, error) {
	key, err := g.sealingKey(r.Context())
	if err != nil {
		return uploadState{}, nil, nil, err
	}
	keyOf := func(id uint32) []byte { return g.openingKey(r.Context(), id) }
	st, err := openToken(keyOf, rt.ref, rt.name, time.Now())
	if err != nil {
		return st, nil, nil, err
	}
	store, err := g.sessionStore(st)
	return st, key, store, err
}

// uploadStatus handles GET on a session: where it stands.
func (g *Gateway) uploadStatus(w http.ResponseWriter, r *http.Request, rt route) error {
	st, key, store, err := g.session(r, rt)
	if err != nil {
		return err
	}
	size, err := store.UploadSize(r.Context(), st.ID)
	if err != nil {
		return g.storeError(err)
	}
	if size != st.Offset {
		// The store only appends at its end, so a token whose offset is not
		// the upload's size can never write or commit again: a later chunk
		// was accepted (the token is stale) or a crash left part of a chunk
		// behind. Either way the client has to start over.
		return errorf(CodeBlobUploadUnknown, "upload session is stale or was interrupted; start a new upload")
	}
	return g.writeSession(w, rt, key, st, http.StatusNoContent)
}

// patchUpload appends one chunk (with Content-Range) or a stream (without).
func (g *Gateway) patchUpload(w http.ResponseWriter, r *http.Request, rt route) error {
	st, key, store, err := g.session(r, rt)
	if err != nil {
		return err
	}
	if err := checkContentRange(r, st.Offset); err != nil {
		return err
	}
	if st, err = g.receive(r, store, st); err != nil {
		return err
	}
	return g.writeSession(w, rt, key, st, http.StatusAccepted)
}

// putUpload completes a session, with an optional last chunk in the body.
func (g *Gateway) putUpload(w http.ResponseWriter, r *http.Request, rt route) error {
	st, _, store, err := g.session(r, rt)
	if err != nil {
		return err
	}
	ds, ok := r.URL.Query()["digest"]
	if !ok {
		return errorf(CodeDigestInvalid, "the digest query parameter is required to complete an upload")
	}
	want, err := parseDigest(ds[0])
	if err != nil {
		return err
	}
	size, err := store.UploadSize(r.Context(), st.ID)
	if errors.Is(err, replication.ErrUploadNotFound) {
		return g.retryCompletedPut(w, r, rt, store, st, want)
	}
	if err != nil {
		return g.storeError(err)
	}
	if err := checkContentRange(r, st.Offset); err != nil {
		return err
	}
	if size != st.Offset {
		return errStaleOffset(st.Offset)
	}
	if r.ContentLength != 0 {
		if st, err = g.receive(r, store, st); err != nil {
			return err
		}
	}
	return g.complete(w, r, rt, store, st, want)
}

// retryCompletedPut answers a PUT whose session's bytes were already committed
// to the store. When the earlier PUT failed to commit the metadata (no
// leader), linking now finishes it; when it committed but answered 503 while
// waiting for the policy's min_regions copies, the retry waits again and
// answers 201 once they exist. Either way nothing is written.
func (g *Gateway) retryCompletedPut(w http.ResponseWriter, r *http.Request, rt route, store replication.Driver, st uploadState, want digest.Digest) error {
	unknown := errorf(CodeBlobUploadUnknown, "upload session is unknown, expired or finished")
	if rec, err := g.meta.LinkedBlob(r.Context(), rt.name, want.String()); err == nil {
		// Only the session's own completing request, repeated: same bytes
		// before and in the body, so the same size.
		if st.Offset+max(r.ContentLength, 0) != rec.Size || !slices.Contains(rec.Regions, st.Region) {
			return unknown
		}
		return g.finish(w, r, rt, want)
	}
	// Bytes the store still holds after the fence outlived every removal
	// up to it; the link is refused if a later one may have deleted them.
	fence, err := g.meta.WriteFence(r.Context())
	if err != nil {
		return err
	}
	size, err := store.Stat(r.Context(), want)
	if err != nil || size < st.Offset {
		return unknown
	}
	// The session's upload is gone: an earlier PUT of it committed the
	// bytes but not the link, or it was cancelled. Link only when the
	// session's own bytes (its hash state, then this request's body) are
	// the blob's, so a finished session cannot link a blob that someone
	// else pushed into this repository.
	if !sessionMade(r, st, want, size) {
		return unknown
	}
	if err := g.link(r.Context(), rt, st.Region, want, size, fence); err != nil {
		return err
	}
	return g.finish(w, r, rt, want)
}

// sessionMade reports whether the session's bytes, as its token's hash
// state describes them, followed by the request body, hash to want and
// make size bytes. Only sha256 sessions carry a hash state.
func sessionMade(r *http.Request, st uploadState, want digest.Digest, size int64) bool {
	if want.Algorithm() != digest.SHA256 || (r.ContentLength >= 0 && st.Offset+r.ContentLength != size) {
		return false
	}
	h := sha256.New()
	if st.Hash != nil {
		if err := h.(encoding.BinaryUnmarshaler).UnmarshalBinary(st.Hash); err != nil {
			return false
		}
	}
	n, err := io.Copy(h, io.LimitReader(r.Body, size-st.Offset+1))
	return err == nil && st.Offset+n == size && digest.NewDigest(digest.SHA256, h) == want
}

// finish answers 201 for a linked blob once the repository's policy has as
// many regions holding it as it asks for; 503 with Retry-After if that takes
// longer than the sync timeout. The blob stays committed either way, and the
// same PUT retried later answers 201 once the copies exist.
func (g *Gateway) finish(w http.ResponseWriter, r *http.Request, rt route, d digest.Digest) error {
	pol, err := g.meta.Policy(r.Context(), rt.name)
	if err != nil {
		return err
	}
	if pol.MinRegions > 1 {
		ctx, cancel := context.WithTimeout(r.Context(), g.cfg.SyncTimeout)
		defer cancel()
		rec, err := g.meta.WaitPlaced(ctx, d.String(), pol.MinRegions)
		if err != nil {
			if r.Context().Err() != nil {
				return err
			}
			e := errorf(CodeUnavailable, "blob %s is stored in %d of the %d regions this repository's policy requires before acknowledging; retry the same request",
				d, len(rec.GetRegions()), pol.MinRegions)
			e.Headers = map[string]string{"Retry-After": "5"}
			return e
		}
	}
	writeBlobCreated(w, rt, d)
	return nil
}

// cancelUpload handles DELETE on a session.
func (g *Gateway) cancelUpload(w http.ResponseWriter, r *http.Request, rt route) error {
	st, _, store, err := g.session(r, rt)
	if err != nil {
		return err
	}
	if err := store.CancelUpload(r.Context(), st.ID); err != nil {
		return g.storeError(err)
	}
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// checkContentRange verifies that a chunk starts where the session stands.
// OCI clients send "start-end"; "bytes start-end/total" is accepted too.
func checkContentRange(r *http.Request, offset int64) error {
	cr := r.Header.Get("Content-Range")
	if cr == "" {
		return nil
	}
	spec := strings.TrimPrefix(cr, "bytes ")
	spec, _, _ = strings.Cut(spec, "/")
	a, b, ok := strings.Cut(spec, "-")
	start, err1 := strconv.ParseInt(strings.TrimSpace(a), 10, 64)
	end, err2 := strconv.ParseInt(strings.TrimSpace(b), 10, 64)
	if !ok || err1 != nil || err2 != nil || start < 0 || end < start {
		return rangeError(offset, "malformed Content-Range %q", cr)
	}
	if start != offset {
		return rangeError(offset, "chunk starts at %d but the upload holds %d bytes", start, offset)
	}
	if r.ContentLength >= 0 && r.ContentLength != end-start+1 {
		return rangeError(offset, "Content-Range %q does not match Content-Length %d", cr, r.ContentLength)
	}
	return nil
}

func rangeError(offset int64, format string, args ...any) *Error {
	e := errorf(CodeRangeInvalid, format, args...)
	e.Headers = map[string]string{"Range": sessionRange(offset)}
	return e
}

// errStaleOffset answers a write or commit through a token whose offset is
// not the upload's size. The store refused it and changed nothing; the Range
// is the token's, the only progress this token can vouch for.
func errStaleOffset(offset int64) *Error {
	return rangeError(offset, "the upload does not end where this session token says; the token is stale")
}

// errTooLarge ends a body that passes the configured blob size limit.
var errTooLarge = errors.New("blob exceeds the size limit")

// receive streams the request body into the session's upload, hashing as it
// goes, and returns the advanced state.
func (g *Gateway) receive(r *http.Request, store replication.Driver, st uploadState) (uploadState, error) {
	h := sha256.New()
	if st.Hash != nil {
		if err := h.(encoding.BinaryUnmarshaler).UnmarshalBinary(st.Hash); err != nil {
			return st, errorf(CodeBlobUploadUnknown, "upload session state is unreadable")
		}
	}
	var body io.Reader = r.Body
	if g.cfg.MaxBlobSize > 0 {
		body = &limitReader{r: body, n: g.cfg.MaxBlobSize - st.Offset}
	}
	// The store takes the chunk whole or not at all, and only at its end:
	// on any error it holds what it held before, which this token still
	// describes, so the client can retry the chunk with the same token.
	hashed := newPipelinedHash(body, h)
	n, err := store.WriteUpload(r.Context(), st.ID, st.Offset, hashed)
	hashed.Wait()
	if err != nil {
		switch {
		case errors.Is(err, errTooLarge):
			return st, errorf(CodeTooLarge, "blobs are limited to %d bytes", g.cfg.MaxBlobSize)
		case errors.Is(err, replication.ErrUploadOffset):
			return st, errStaleOffset(st.Offset)
		case errors.Is(err, replication.ErrUploadNotFound), errors.Is(err, replication.ErrStorageFull):
			return st, g.storeError(err)
		case r.Context().Err() != nil:
			return st, errorf(CodeBlobUploadInvalid, "request ended: %v", r.Context().Err())
		default:
			var maxErr *http.MaxBytesError
			if errors.As(err, &maxErr) || errors.Is(err, io.ErrUnexpectedEOF) {
				return st, errorf(CodeBlobUploadInvalid, "request body ended before its declared length; the chunk was dropped")
			}
			return st, err
		}
	}
	st.Offset += n
	if st.Hash, err = h.(encoding.BinaryMarshaler).MarshalBinary(); err != nil {
		return st, err
	}
	return st, nil
}

// complete verifies the session's bytes against want, makes them durable as
// the blob, and commits the placement and link through Raft.
func (g *Gateway) complete(w http.ResponseWriter, r *http.Request, rt route, store replication.Driver, st uploadState, want digest.Digest) error {
	got, err := g.sessionDigest(r.Context(), store, st, want.Algorithm())
	if err != nil {
		return err
	}
	if got != want {
		store.CancelUpload(r.Context(), st.ID)
		return errorf(CodeDigestInvalid, "content has digest %s, not %s", got, want)
	}
	// Taken before the bytes become the blob: see Metadata.WriteFence.
	fence, err := g.meta.WriteFence(r.Context())
	if err != nil {
		return err
	}
	if err := store.CommitUpload(r.Context(), st.ID, st.Offset, want); err != nil {
		if errors.Is(err, replication.ErrUploadOffset) {
			// A chunk landed through this same token after we looked:
			// the upload holds bytes the verified digest does not cover.
			return errStaleOffset(st.Offset)
		}
		return g.storeError(err)
	}
	if err := g.link(r.Context(), rt, st.Region, want, st.Offset, fence); err != nil {
		return err
	}
	return g.finish(w, r, rt, want)
}

// link commits that region holds the blob and that rt.name links it; the
// bytes were written after log index fence (Metadata.WriteFence).
func (g *Gateway) link(ctx context.Context, rt route, region string, d digest.Digest, size int64, fence uint64) error {
	return g.meta.Commit(ctx, &pb.Command{Intent: &pb.Command_LinkBlob{LinkBlob: &pb.LinkBlob{
		Repository: rt.name, Digest: d.String(), Size: size, PlacedRegion: region, WrittenAfterIndex: fence}}})
}

// sessionDigest returns the digest of the session's bytes. sha256 comes from
// the streamed state; another algorithm costs one re-read of the upload.
func (g *Gateway) sessionDigest(ctx context.Context, store replication.Driver, st uploadState, alg digest.Algorithm) (digest.Digest, error) {
	var h hash.Hash
	switch alg {
	case digest.SHA256:
		h = sha256.New()
		if st.Hash != nil {
			if err := h.(encoding.BinaryUnmarshaler).UnmarshalBinary(st.Hash); err != nil {
				return "", errorf(CodeBlobUploadUnknown, "upload session state is unreadable")
			}
		}
		return digest.NewDigest(alg, h), nil
	case digest.SHA512:
		h = sha512.New()
	default:
		return "", errorf(CodeDigestInvalid, "unsupported digest algorithm %s", alg)
	}
	rc, err := store.OpenUpload(ctx, st.ID)
	if err != nil {
		return "", g.storeError(err)
	}
	defer rc.Close()
	if _, err := io.CopyN(h, rc, st.Offset); err != nil {
		return "", fmt.Errorf("re-read upload %s: %w", st.ID, err)
	}
	return digest.NewDigest(alg, h), nil
}

// writeSession answers with the session's next Location and progress.
func (g *Gateway) writeSession(w http.ResponseWriter, rt route, key *pb.UploadKey, st uploadState, status int) error {
	h := w.Header()
	h.Set("Location", "/v2/"+rt.name+"/blobs/uploads/"+sealToken(key, st))
	h.Set("Range", sessionRange(st.Offset))
	h.Set("Docker-Upload-UUID", st.ID)
	h.Set("Content-Length", "0")
	w.WriteHeader(status)
	return nil
}

// sessionRange is the Range header of a session holding offset bytes. The
// registry convention for an empty session is "0-0".
func sessionRange(offset int64) string {
	return "0-" + itoa(max(offset-1, 0))
}

func writeBlobCreated(w http.ResponseWriter, rt route, d digest.Digest) {
	h := w.Header()
	h.Set("Location", "/v2/"+rt.name+"/blobs/"+d.String())
	h.Set("Docker-Content-Digest", d.String())
	h.Set("Content-Length", "0")
	w.WriteHeader(http.StatusCreated)
}

// storeError maps blob-store failures to OCI errors. A full store is logged
// with its cause, which names server paths that clients must not see.
func (g *Gateway) storeError(err error) error {
	switch {
	case errors.Is(err, replication.ErrUploadNotFound):
		return errorf(CodeBlobUploadUnknown, "upload session is unknown, expired or finished")
	case errors.Is(err, replication.ErrUploadOffset):
		return errorf(CodeRangeInvalid, "chunk does not continue the upload")
	case errors.Is(err, replication.ErrStorageFull):
		g.logger.Error("blob store is out of space", "err", err)
		return errorf(CodeStorageFull, "the blob store is out of space")
	case errors.Is(err, replication.ErrBlobNotFound):
		return errorf(CodeBlobUnknown, "blob not found")
	case errors.Is(err, replication.ErrInvalidDigest):
		return errorf(CodeDigestInvalid, "%v", err)
	}
	return err
}

// limitReader fails with errTooLarge once more than n bytes are read.
type limitReader struct {
	r io.Reader
	n int64
}

func (l *limitReader) Read(p []byte) (int, error) {
	if l.n <= 0 {
		var one [1]byte
		k, err := l.r.Read(one[:])
		if k > 0 {
			return 0, errTooLarge
		}
		return 0, err
	}
	if int64(len(p)) > l.n {
		p = p[:l.n]
	}
	k, err := l.r.Read(p)
	l.n -= int64(k)
	return k, err
}
