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
	key, err := g.uploadKey(r.Context())
	if err != nil {
		return err
	}
	var want digest.Digest
	if ds, ok := q["digest"]; ok {
		if want, err = parseDigest(ds[0]); err != nil {
			return err
		}
	}
	id, err := g.store.StartUpload(r.Context())
	if err != nil {
		return g.storeError(err)
	}
	st := uploadState{Repo: rt.name, Region: g.cfg.Region, ID: id, Expires: time.Now().Add(g.cfg.UploadTTL).Unix()}
	if want == "" {
		if g.cfg.ChunkMinLength > 0 {
			w.Header().Set("OCI-Chunk-Min-Length", itoa(g.cfg.ChunkMinLength))
		}
		return g.writeSession(w, rt, key, st, http.StatusAccepted)
	}
	// Monolithic: the body is the whole blob.
	if st, err = g.receive(r, st); err == nil {
		err = g.complete(w, r, rt, st, want)
	}
	if err != nil {
		g.store.CancelUpload(context.WithoutCancel(r.Context()), id)
	}
	return err
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
	err = g.meta.Propose(r.Context(), &pb.LogEntry{Command: &pb.LogEntry_LinkBlob{
		LinkBlob: &pb.LinkBlob{Repository: rt.name, Digest: d.String(), MountFrom: from}}})
	if errors.Is(err, pb.ErrBlobUnknown) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	writeBlobCreated(w, rt, d)
	return true, nil
}

// session verifies the token in the path and checks the upload still exists.
func (g *Gateway) session(r *http.Request, rt route) (uploadState, []byte, error) {
	key, err := g.uploadKey(r.Context())
	if err != nil {
		return uploadState{}, nil, err
	}
	st, err := parseToken(key, rt.ref, rt.name, time.Now())
	return st, key, err
}

// uploadStatus handles GET on a session: where it stands.
func (g *Gateway) uploadStatus(w http.ResponseWriter, r *http.Request, rt route) error {
	st, key, err := g.session(r, rt)
	if err != nil {
		return err
	}
	size, err := g.store.UploadSize(r.Context(), st.ID)
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
	st, key, err := g.session(r, rt)
	if err != nil {
		return err
	}
	if err := checkContentRange(r, st.Offset); err != nil {
		return err
	}
	if st, err = g.receive(r, st); err != nil {
		return err
	}
	return g.writeSession(w, rt, key, st, http.StatusAccepted)
}

// putUpload completes a session, with an optional last chunk in the body.
func (g *Gateway) putUpload(w http.ResponseWriter, r *http.Request, rt route) error {
	st, _, err := g.session(r, rt)
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
	size, err := g.store.UploadSize(r.Context(), st.ID)
	if errors.Is(err, replication.ErrUploadNotFound) {
		return g.retryCompletedPut(w, r, rt, st, want)
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
		if st, err = g.receive(r, st); err != nil {
			return err
		}
	}
	return g.complete(w, r, rt, st, want)
}

// retryCompletedPut answers a PUT whose session's bytes were already committed
// to the store: when the earlier PUT failed to commit the metadata (no
// leader), linking now finishes it. A session that fully completed stays
// finished.
func (g *Gateway) retryCompletedPut(w http.ResponseWriter, r *http.Request, rt route, st uploadState, want digest.Digest) error {
	unknown := errorf(CodeBlobUploadUnknown, "upload session is unknown, expired or finished")
	if _, err := g.meta.LinkedBlob(r.Context(), rt.name, want.String()); err == nil {
		return unknown
	}
	size, err := g.store.Stat(r.Context(), want)
	if err != nil || size < st.Offset {
		return unknown
	}
	if err := g.link(r.Context(), rt, want, size); err != nil {
		return err
	}
	writeBlobCreated(w, rt, want)
	return nil
}

// cancelUpload handles DELETE on a session.
func (g *Gateway) cancelUpload(w http.ResponseWriter, r *http.Request, rt route) error {
	st, _, err := g.session(r, rt)
	if err != nil {
		return err
	}
	if err := g.store.CancelUpload(r.Context(), st.ID); err != nil {
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
func (g *Gateway) receive(r *http.Request, st uploadState) (uploadState, error) {
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
	n, err := g.store.WriteUpload(r.Context(), st.ID, st.Offset, hashed)
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
func (g *Gateway) complete(w http.ResponseWriter, r *http.Request, rt route, st uploadState, want digest.Digest) error {
	got, err := g.sessionDigest(r.Context(), st, want.Algorithm())
	if err != nil {
		return err
	}
	if got != want {
		g.store.CancelUpload(r.Context(), st.ID)
		return errorf(CodeDigestInvalid, "content has digest %s, not %s", got, want)
	}
	if err := g.store.CommitUpload(r.Context(), st.ID, st.Offset, want); err != nil {
		if errors.Is(err, replication.ErrUploadOffset) {
			// A chunk landed through this same token after we looked:
			// the upload holds bytes the verified digest does not cover.
			return errStaleOffset(st.Offset)
		}
		return g.storeError(err)
	}
	if err := g.link(r.Context(), rt, want, st.Offset); err != nil {
		return err
	}
	writeBlobCreated(w, rt, want)
	return nil
}

// link commits that this region holds the blob and that rt.name links it.
func (g *Gateway) link(ctx context.Context, rt route, d digest.Digest, size int64) error {
	return g.meta.Propose(ctx, &pb.LogEntry{Command: &pb.LogEntry_LinkBlob{LinkBlob: &pb.LinkBlob{
		Repository: rt.name, Digest: d.String(), Size: size, PlacedRegion: g.cfg.Region}}})
}

// sessionDigest returns the digest of the session's bytes. sha256 comes from
// the streamed state; another algorithm costs one re-read of the upload.
func (g *Gateway) sessionDigest(ctx context.Context, st uploadState, alg digest.Algorithm) (digest.Digest, error) {
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
	rc, err := g.store.OpenUpload(ctx, st.ID)
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
func (g *Gateway) writeSession(w http.ResponseWriter, rt route, key []byte, st uploadState, status int) error {
	h := w.Header()
	h.Set("Location", "/v2/"+rt.name+"/blobs/uploads/"+signToken(key, st))
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
