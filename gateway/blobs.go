package gateway

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"

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
	body, err := g.store.Open(r.Context(), d, start)
	if err != nil {
		if errors.Is(err, replication.ErrBlobNotFound) {
			// Linked in the metadata but missing from this region's store.
			return fmt.Errorf("blob %s is linked but missing from region %s: %w", d, g.cfg.Region, err)
		}
		return err
	}
	defer body.Close()
	w.WriteHeader(status)
	// io.Copy onto the response lets net/http sendfile from an *os.File.
	if _, err := io.Copy(w, io.LimitReader(body, end-start)); err != nil {
		g.logger.Debug("blob stream ended early", "digest", d, "err", err)
	}
	return nil
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
	err = g.meta.Propose(r.Context(), &pb.LogEntry{Command: &pb.LogEntry_UnlinkBlob{
		UnlinkBlob: &pb.UnlinkBlob{Repository: rt.name, Digest: d.String()}}})
	if err != nil {
		return err
	}
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(http.StatusAccepted)
	return nil
}
