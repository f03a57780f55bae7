package gateway

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/meridian-registry/meridian/replication"
)

// rangeStore is a driver that can open a stretch of a blob, and records
// the stretches asked for.
type rangeStore struct {
	replication.Driver
	mu      sync.Mutex
	opened  [][2]int64 // offset, length
	plainly int        // Opens without a length
}

func (s *rangeStore) Open(ctx context.Context, d digest.Digest, off int64) (io.ReadCloser, error) {
	s.mu.Lock()
	s.plainly++
	s.mu.Unlock()
	return s.Driver.Open(ctx, d, off)
}

func (s *rangeStore) OpenRange(ctx context.Context, d digest.Digest, off, n int64) (io.ReadCloser, error) {
	s.mu.Lock()
	s.opened = append(s.opened, [2]int64{off, n})
	s.mu.Unlock()
	rc, err := s.Driver.Open(ctx, d, off)
	if err != nil {
		return nil, err
	}
	return struct {
		io.Reader
		io.Closer
	}{io.LimitReader(rc, n), rc}, nil
}

func (s *rangeStore) take() ([][2]int64, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	o, p := s.opened, s.plainly
	s.opened, s.plainly = nil, 0
	return o, p
}

// A store that can open a stretch of a blob is asked for exactly the
// bytes a GET wants: the whole blob, or the Range.
func TestBlobGetOpensTheRange(t *testing.T) {
	store := &rangeStore{Driver: newFS(t)}
	h := twoRegions(t, store, newFS(t))
	content := randomBytes(1 << 20)
	d := h.pushBlob(t, "app", content)
	store.take()

	h.wantBlob(t, "app", content)
	if opened, plain := store.take(); len(opened) != 1 || opened[0] != [2]int64{0, 1 << 20} || plain != 0 {
		t.Fatalf("GET of the whole blob opened %v (and %d plain Opens); want [0 %d] once", opened, plain, 1<<20)
	}
	r := h.do(t, "GET", "/v2/app/blobs/"+d.String(), nil, "Range", "bytes=1000-1999")
	r.wantStatus(t, http.StatusPartialContent)
	if !bytes.Equal(r.body, content[1000:2000]) {
		t.Fatalf("range: %d bytes, not the blob's", len(r.body))
	}
	if opened, plain := store.take(); len(opened) != 1 || opened[0] != [2]int64{1000, 1000} || plain != 0 {
		t.Fatalf("GET of bytes 1000-1999 opened %v (and %d plain Opens); want [1000 1000] once", opened, plain)
	}
}
