package gateway

import (
	"context"
	"net/http"
	"strconv"
	"testing"

	"github.com/opencontainers/go-digest"
)

func TestBlobRange(t *testing.T) {
	h := newHarness(t)
	content := []byte("0123456789")
	d := h.pushBlob(t, "app", content)
	tests := []struct {
		rng          string
		status       int
		body         string
		contentRange string
	}{
		{"", 200, "0123456789", ""},
		{"bytes=0-3", 206, "0123", "bytes 0-3/10"},
		{"bytes=5-", 206, "56789", "bytes 5-9/10"},
		{"bytes=9-9", 206, "9", "bytes 9-9/10"},
		{"bytes=8-20", 206, "89", "bytes 8-9/10"},
		{"bytes=-3", 206, "789", "bytes 7-9/10"},
		{"bytes=-10", 206, "0123456789", "bytes 0-9/10"},
		{"bytes=-20", 206, "0123456789", "bytes 0-9/10"},
		{"bytes=10-", 416, "", "bytes */10"},
		{"bytes=10-20", 416, "", "bytes */10"},
		{"bytes=-0", 416, "", "bytes */10"},
		{"bytes=4-2", 416, "", "bytes */10"},
		// Forms the registry may ignore: the whole blob.
		{"bytes=0-1,3-4", 200, "0123456789", ""},
		{"items=0-1", 200, "0123456789", ""},
		{"bytes=a-b", 200, "0123456789", ""},
		{"bytes=-", 200, "0123456789", ""},
		{"bytes=0-99999999999999999999", 200, "0123456789", ""},
	}
	for _, tt := range tests {
		t.Run(tt.rng, func(t *testing.T) {
			for _, method := range []string{"GET", "HEAD"} {
				r := h.do(t, method, "/v2/app/blobs/"+d.String(), nil, "Range", tt.rng)
				if tt.status == 416 {
					if method == "GET" {
						r.wantError(t, 416, "RANGE_INVALID")
					}
					r.wantStatus(t, 416)
					if got := r.header.Get("Content-Range"); got != tt.contentRange {
						t.Errorf("%s: Content-Range = %q, want %q", method, got, tt.contentRange)
					}
					continue
				}
				r.wantStatus(t, tt.status)
				if got := r.header.Get("Content-Range"); got != tt.contentRange {
					t.Errorf("%s: Content-Range = %q, want %q", method, got, tt.contentRange)
				}
				if got := r.header.Get("Content-Length"); got != strconv.Itoa(len(tt.body)) {
					t.Errorf("%s: Content-Length = %q, want %d", method, got, len(tt.body))
				}
				if got := r.header.Get("Docker-Content-Digest"); got != d.String() {
					t.Errorf("%s: Docker-Content-Digest = %q", method, got)
				}
				want := tt.body
				if method == "HEAD" {
					want = ""
				}
				if string(r.body) != want {
					t.Errorf("%s: body = %q, want %q", method, r.body, want)
				}
			}
		})
	}
}

func TestEmptyBlob(t *testing.T) {
	h := newHarness(t)
	d := h.pushBlob(t, "app", nil)
	tests := []struct {
		rng    string
		status int
	}{
		{"", 200},
		{"bytes=-5", 200}, // the whole of nothing: there is no range to name
		{"bytes=0-", 416},
		{"bytes=0-0", 416},
	}
	for _, tt := range tests {
		t.Run(tt.rng, func(t *testing.T) {
			r := h.do(t, "GET", "/v2/app/blobs/"+d.String(), nil, "Range", tt.rng)
			r.wantStatus(t, tt.status)
			if tt.status == 416 {
				if got := r.header.Get("Content-Range"); got != "bytes */0" {
					t.Errorf("Content-Range = %q, want bytes */0", got)
				}
				return
			}
			if got := r.header.Get("Content-Length"); got != "0" || len(r.body) != 0 {
				t.Errorf("Content-Length = %q with %d body bytes, want an explicit 0", got, len(r.body))
			}
			if got := r.header.Get("Content-Range"); got != "" {
				t.Errorf("Content-Range = %q on a whole response", got)
			}
		})
	}
}

// Large blobs keep an explicit Content-Length (clients check it) rather than
// falling back to chunked encoding.
func TestBlobContentLength(t *testing.T) {
	h := newHarness(t)
	content := randomBytes(100 << 10)
	d := h.pushBlob(t, "app", content)
	for _, method := range []string{"GET", "HEAD"} {
		r := h.do(t, method, "/v2/app/blobs/"+d.String(), nil)
		r.wantStatus(t, http.StatusOK)
		if got := r.header.Get("Content-Length"); got != strconv.Itoa(len(content)) {
			t.Errorf("%s: Content-Length = %q, want %d", method, got, len(content))
		}
	}
}

func TestBlobsAreScopedToRepositories(t *testing.T) {
	h := newHarness(t)
	content := randomBytes(30)
	d := h.pushBlob(t, "a", content)
	h.do(t, "GET", "/v2/b/blobs/"+d.String(), nil).wantError(t, http.StatusNotFound, "BLOB_UNKNOWN")
	h.do(t, "GET", "/v2/a/b/blobs/"+d.String(), nil).wantError(t, http.StatusNotFound, "BLOB_UNKNOWN")
	h.pushBlob(t, "b", content)
	h.wantBlob(t, "b", content)

	h.do(t, "DELETE", "/v2/a/blobs/"+d.String(), nil).wantStatus(t, http.StatusAccepted)
	h.wantNoBlob(t, "a", d)
	h.wantBlob(t, "b", content)
	h.do(t, "DELETE", "/v2/a/blobs/"+d.String(), nil).wantError(t, http.StatusNotFound, "BLOB_UNKNOWN")
	h.do(t, "DELETE", "/v2/a/blobs/sha256:baddigeststring", nil).wantError(t, http.StatusBadRequest, "DIGEST_INVALID")
	h.do(t, "GET", "/v2/a/blobs/sha256:baddigeststring", nil).wantError(t, http.StatusBadRequest, "DIGEST_INVALID")
	h.do(t, "HEAD", "/v2/a/blobs/"+digest.FromString("none").String(), nil).wantStatus(t, http.StatusNotFound)
}

// A blob linked in the metadata but missing from the region's store is a
// server fault: a 500 with a well-formed envelope, not a response whose
// Content-Length still announces the blob.
func TestBlobMissingFromStore(t *testing.T) {
	h := newHarness(t)
	content := randomBytes(1000)
	d := h.pushBlob(t, "app", content)
	if err := h.store.Delete(context.Background(), d); err != nil {
		t.Fatal(err)
	}
	r := h.do(t, "GET", "/v2/app/blobs/"+d.String(), nil)
	r.wantError(t, http.StatusInternalServerError, "INTERNAL")
	for _, hdr := range []string{"Docker-Content-Digest", "Content-Range"} {
		if v := r.header.Get(hdr); v != "" {
			t.Errorf("%s = %q on the error", hdr, v)
		}
	}
	if got := r.header.Get("Content-Length"); got != strconv.Itoa(len(r.body)) {
		t.Errorf("Content-Length = %q for a %d-byte error body", got, len(r.body))
	}
}
