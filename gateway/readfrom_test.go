package gateway

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/meridian-registry/meridian/replication"
	"github.com/meridian-registry/meridian/replication/s3test"
)

// chunkWriterTo is a source that writes itself in chunks through WriteTo
// and records where it stands, like the S3 store's part reader.
type chunkWriterTo struct {
	data   []byte
	pos    int
	chunk  int
	writes int // WriteTo's Write calls
}

func (c *chunkWriterTo) Read(p []byte) (int, error) {
	if c.pos == len(c.data) {
		return 0, io.EOF
	}
	n := copy(p, c.data[c.pos:])
	c.pos += n
	return n, nil
}

func (c *chunkWriterTo) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for c.pos < len(c.data) {
		end := min(c.pos+c.chunk, len(c.data))
		c.writes++
		n, err := w.Write(c.data[c.pos:end])
		c.pos += n
		total += int64(n)
		if err != nil {
			return total, err
		}
	}
	return total, nil
}

// TestStatusWriterReadFrom sends a limited part of sources of each kind
// through statusWriter as streamBlob does: a file (sendfile), a source with
// WriteTo cut mid-chunk, and a plain reader. The body is exactly the
// limited bytes, the source stands right after them, and the WriterTo
// source was written in its own chunks.
func TestStatusWriterReadFrom(t *testing.T) {
	data := make([]byte, 3<<20+123)
	rand.NewChaCha8([32]byte{5}).Read(data)
	path := filepath.Join(t.TempDir(), "blob")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	const limit = 2<<20 + 77 // inside the third 1 MiB chunk
	var src io.Reader
	afters := make(chan []byte, 1) // what the source yields after the response
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sw := &statusWriter{ResponseWriter: w}
		w.Header().Set("Content-Length", strconv.Itoa(limit))
		n, err := io.Copy(sw, io.LimitReader(src, limit))
		if err != nil || n != limit {
			t.Errorf("copied %d bytes, %v; want %d", n, err, limit)
		}
		if sw.status() != http.StatusOK {
			t.Errorf("status %d recorded, want 200", sw.status())
		}
		after, _ := io.ReadAll(io.LimitReader(src, 10))
		afters <- after
	})
	srv := httptest.NewServer(h)
	defer srv.Close()
	file, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	chunked := &chunkWriterTo{data: data, chunk: 1 << 20}
	for _, tt := range []struct {
		name string
		src  io.Reader
	}{
		{"file", file},
		{"writer-to", chunked},
		{"plain", struct{ io.Reader }{bytes.NewReader(data)}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			src = tt.src
			resp, err := srv.Client().Get(srv.URL)
			if err != nil {
				t.Fatal(err)
			}
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil || !bytes.Equal(body, data[:limit]) {
				t.Fatalf("body of %d bytes (%v), want the first %d of the source", len(body), err, limit)
			}
			if after := <-afters; !bytes.Equal(after, data[limit:limit+10]) {
				t.Errorf("the source stands elsewhere than right after the %d bytes sent", limit)
			}
		})
	}
	if chunked.writes != 3 {
		t.Errorf("the WriterTo source made %d writes for 3 chunks", chunked.writes)
	}
}

// TestBlobRangeS3 reads ranges of a blob of several read parts from an
// S3 store through the gateway: the bytes of every range are the blob's.
func TestBlobRangeS3(t *testing.T) {
	srv := s3test.Start(t)
	srv.CreateBucket(t, "ranges")
	store, err := replication.NewS3(t.Context(), replication.S3Config{
		Endpoint: srv.Endpoint(), Bucket: "ranges", AccessKey: srv.AccessKey(), SecretKey: srv.SecretKey(),
		PathStyle: true, PartSize: replication.S3MinPartSize, ReadPartSize: 256 << 10,
	})
	if err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig()
	cfg.Logger = slog.New(slog.DiscardHandler)
	stores := replication.NewRegions("local")
	stores.Add("local", store)
	gw, err := New(cfg, newFakeMetadata(t), stores)
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(gw.Handler())
	t.Cleanup(hs.Close)
	h := &harness{gw: gw, srv: hs}

	content := make([]byte, 6<<20+4321)
	rand.NewChaCha8([32]byte{6}).Read(content)
	d := h.pushBlob(t, "app", content)
	size := len(content)
	const part = 256 << 10
	for _, rg := range [][2]int{
		{0, size - 1}, {1, size - 1}, {0, 99}, {part - 1, part}, {part, 3*part + 5},
		{5, 5*part - 1}, {size - part - 3, size - 1}, {size - 1, size - 1}, {3, size - 2},
	} {
		t.Run(fmt.Sprintf("%d-%d", rg[0], rg[1]), func(t *testing.T) {
			r := h.do(t, "GET", "/v2/app/blobs/"+d.String(), nil, "Range", fmt.Sprintf("bytes=%d-%d", rg[0], rg[1]))
			want := content[rg[0] : rg[1]+1]
			r.wantStatus(t, http.StatusPartialContent)
			if !bytes.Equal(r.body, want) {
				t.Errorf("got %d bytes, not the blob's %d of the range", len(r.body), len(want))
			}
		})
	}
	r := h.do(t, "GET", "/v2/app/blobs/"+d.String(), nil)
	r.wantStatus(t, http.StatusOK)
	if !bytes.Equal(r.body, content) {
		t.Errorf("GET gave %d bytes, not the blob's %d", len(r.body), size)
	}
	// The handler closes the body (and the buffers return) just after the
	// client has the last byte.
	deadline := time.Now().Add(5 * time.Second)
	for store.ReadBuffersInUse() != 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if n := store.ReadBuffersInUse(); n != 0 {
		t.Errorf("%d read buffers still taken 5 s after the responses", n)
	}
}
