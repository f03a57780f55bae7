package gateway

import (
	"context"
	"errors"
	"fmt"
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

// getBlob serves GET and HEAD of a blob linked into the repository, with
// single byte ranges.
func (g *Gateway) getBlob(w http.ResponseWriter, r *http.Request, rt route) error {
	d, err := parseDigest(rt.ref)
	if err != nil {
		return err
	}
	rec, err := g.meta.LinkedBlob(r.Context(), rt.name, d.String())
	if err != nil {
		return err
	}
	size := rec.Size
	start, end, partial, err := parseRange(r.Header.Get("Range"), size)
	if err != nil {
		return err
	}
	h := w.Header()
	h.Set("Docker-Content-Digest", d.String())
	h.Set("ETag", `"`+d.String()+`"`)
	h.Set("Accept-Ranges", "bytes")
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Content-Length", itoa(end-start))
	status := http.StatusOK
	if partial {
		status = http.StatusPartialContent
		h.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start, end-1, size))
	}
	if r.Method == http.MethodHead {
		w.WriteHeader(status)
		return nil
	}
	return g.streamBlob(w, r, rec, d, start, end, status)
}

// streamBlob sends the blob's bytes from the nearest region whose placement
// lists it, falling back to the next while stores fail to open it. A store
// (or the node in front of it) that fails mid-stream is replaced the same
// way, resuming from the byte the response reached; only when no source is
// left is the response cut short (the client sees a short body and retries).
func (g *Gateway) streamBlob(w http.ResponseWriter, r *http.Request, rec *pb.BlobRecord, d digest.Digest, start, end int64, status int) error {
	regions := g.stores.Nearest(rec.Regions)
	// Each region twice: a region reached through its nodes may answer
	// through another node the second time.
	sources := append(slices.Clone(regions), regions...)
	var lastErr error
	sent := int64(0)
	headers := false
	for _, region := range sources {
		store, _ := g.stores.Driver(region)
		if g.cfg.RedirectReads && !headers {
			if p, ok := store.(replication.Presigner); ok {
				u, err := p.PresignGet(r.Context(), d, g.cfg.PresignTTL)
				if err == nil {
					g.metrics.blobReads.WithLabelValues(region, "redirect").Inc()
					w.Header().Del("Content-Length")
					http.Redirect(w, r, u.String(), http.StatusTemporaryRedirect)
					return nil
				}
				g.logger.Warn("cannot presign a blob URL; streaming instead", "region", region, "digest", d, "err", err)
			}
		}
		began := time.Now()
		body, err := openStretch(r.Context(), store, d, start+sent, end-start-sent)
		g.stores.Observe(region, time.Since(began), err)
		if err != nil {
			if r.Context().Err() != nil {
				return r.Context().Err()
			}
			g.logger.Warn("blob store failed a read; trying the next source", "region", region, "digest", d, "offset", start+sent, "err", err)
			lastErr = err
			continue
		}
		if !headers {
			w.WriteHeader(status)
			headers = true
			g.metrics.blobReads.WithLabelValues(region, "stream").Inc()
		}
		n, err := sendBody(w, body, end-start-sent)
		body.Close()
		sent += n
		g.metrics.blobReadBytes.WithLabelValues(region).Add(float64(n))
		if err == nil && sent < end-start {
			err = io.ErrUnexpectedEOF // the source ended early
		}
		if err == nil {
			return nil
		}
		if r.Context().Err() != nil {
			return nil // the client went away
		}
		g.logger.Warn("blob stream broke; resuming from the next source", "region", region, "digest", d, "offset", start+sent, "err", err)
		g.stores.Observe(region, 0, err)
		lastErr = err
	}
	if headers {
		g.logger.Error("no source could finish a blob stream", "digest", d, "sent", sent, "err", lastErr)
		return nil
	}
	if lastErr == nil {
		lastErr = fmt.Errorf("placed in %v, none of which this gateway reaches", rec.Regions)
	}
	if errors.Is(lastErr, replication.ErrBlobNotFound) {
		// Placed, yet gone from the store: a server fault, not a retry.
		return fmt.Errorf("blob %s is placed in %v but missing from the store: %w", d, rec.Regions, lastErr)
	}
	g.logger.Error("no region could serve a blob", "digest", d, "regions", rec.Regions, "err", lastErr)
	return errorf(CodeUnavailable, "no region holding blob %s can serve it right now", d)
}

// openStretch opens the n bytes of d from offset: with OpenRange where the
// store has it, so that it reads nothing past them.
func openStretch(ctx context.Context, store replication.Driver, d digest.Digest, offset, n int64) (io.ReadCloser, error) {
	if ro, ok := store.(replication.RangeOpener); ok {
		return ro.OpenRange(ctx, d, offset, n)
	}
	return store.Open(ctx, d, offset)
}

// sendBody copies n bytes of body to w. io.Copy onto the response lets
// net/http sendfile from an *os.File, and a reader following a blob cache
// fill sendfiles each stretch of its file as it arrives.
func sendBody(w io.Writer, body io.Reader, n int64) (int64, error) {
	if f, ok := body.(*cacheFollower); ok {
		return f.copyN(w, n)
	}
	return io.Copy(w, io.LimitReader(body, n))
}

// parseRange interprets a Range header against a blob of size bytes and
// returns the half-open interval [start, end) to send. Only single ranges are
// served; anything unparsable is ignored as the HTTP spec allows.
func parseRange(header string, size int64) (start, end int64, partial bool, err error) {
	spec, ok := strings.CutPrefix(header, "bytes=")
	if header == "" || !ok || strings.Contains(spec, ",") {
		return 0, size, false, nil
	}
	first, last, ok := strings.Cut(strings.TrimSpace(spec), "-")
	if !ok {
		return 0, size, false, nil
	}
	unsatisfiable := &Error{Code: CodeRangeInvalid, Detail: fmt.Sprintf("range %q is outside the blob's %d bytes", header, size),
		Headers: map[string]string{"Content-Range": fmt.Sprintf("bytes */%d", size)}}
	if first == "" { // suffix range: the last N bytes
		n, perr := strconv.ParseInt(last, 10, 64)
		if perr != nil || n < 0 {
			return 0, size, false, nil
		}
		if n == 0 {
			return 0, 0, false, unsatisfiable
		}
		if size == 0 {
			// The whole of an empty blob: no Content-Range can describe it.
			return 0, 0, false, nil
		}
		return max(size-n, 0), size, true, nil
	}
	s, perr := strconv.ParseInt(first, 10, 64)
	if perr != nil || s < 0 {
		return 0, size, false, nil
	}
	e := size - 1
	if last != "" {
		if e, perr = strconv.ParseInt(last, 10, 64); perr != nil {
			return 0, size, false, nil
		}
		if e < s {
			return 0, 0, false, unsatisfiable
		}
	}
	if s >= size {
		return 0, 0, false, unsatisfiable
	}
	return s, min(e, size-1) + 1, true, nil
}

// deleteBlob unlinks a blob from the repository. The bytes stay for other
// repositories until garbage collection.
func (g *Gateway) deleteBlob(w http.ResponseWriter, r *http.Request, rt route) error {
	d, err := parseDigest(rt.ref)
	if err != nil {
		return err
	}
	err = g.meta.Commit(r.Context(), &pb.Command{Intent: &pb.Command_UnlinkBlob{
		UnlinkBlob: &pb.UnlinkBlob{Repository: rt.name, Digest: d.String()}}})
	if err != nil {
		return err
	}
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(http.StatusAccepted)
	return nil
}
