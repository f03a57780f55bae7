package gateway

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
	"github.com/meridian-registry/meridian/replication"
)

// patch sends one chunk with its Content-Range and returns the reply.
func (h *harness) patch(t *testing.T, loc string, offset int64, chunk []byte) reply {
	t.Helper()
	return h.do(t, "PATCH", loc, bytes.NewReader(chunk),
		"Content-Type", "application/octet-stream",
		"Content-Range", fmt.Sprintf("%d-%d", offset, offset+int64(len(chunk))-1))
}

// wantSession checks a session reply: status, Range and a Location for the
// next request, which it returns.
func (r reply) wantSession(t *testing.T, status int, rng string) string {
	t.Helper()
	r.wantStatus(t, status)
	if got := r.header.Get("Range"); got != rng {
		t.Errorf("Range = %q, want %q", got, rng)
	}
	loc := r.header.Get("Location")
	if loc == "" {
		t.Fatal("no Location for the session")
	}
	return loc
}

// wantBlob checks that repo serves exactly content under its digest.
func (h *harness) wantBlob(t *testing.T, repo string, content []byte) {
	t.Helper()
	d := digest.FromBytes(content)
	r := h.do(t, "GET", "/v2/"+repo+"/blobs/"+d.String(), nil)
	r.wantStatus(t, http.StatusOK)
	if !bytes.Equal(r.body, content) {
		t.Errorf("blob %s: got %d bytes, want %d", d, len(r.body), len(content))
	}
}

// wantNoBlob checks that repo does not serve d.
func (h *harness) wantNoBlob(t *testing.T, repo string, d digest.Digest) {
	t.Helper()
	h.do(t, "HEAD", "/v2/"+repo+"/blobs/"+d.String(), nil).wantStatus(t, http.StatusNotFound)
}

func TestChunkedUpload(t *testing.T) {
	a, b, c := randomBytes(1000), randomBytes(24), randomBytes(7)
	whole := append(append(append([]byte{}, a...), b...), c...)
	tests := []struct {
		name      string
		alg       digest.Algorithm
		streamed  bool   // PATCH without Content-Range or Content-Length
		rangeForm string // format of Content-Range, "%d-%d" or "bytes %d-%d/*"
	}{
		{"sha256", digest.SHA256, false, "%d-%d"},
		{"sha512", digest.SHA512, false, "%d-%d"},
		{"streamed sha256", digest.SHA256, true, ""},
		{"streamed sha512", digest.SHA512, true, ""},
		{"http content-range", digest.SHA256, false, "bytes %d-%d/*"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			h := newHarness(t)
			loc := h.startUpload(t, "team/app")
			loc = h.do(t, "GET", loc, nil).wantSession(t, http.StatusNoContent, "0-0")
			offset := 0
			for _, chunk := range [][]byte{a, b} {
				var r reply
				if tt.streamed {
					r = h.do(t, "PATCH", loc, chunked(chunk))
				} else {
					r = h.do(t, "PATCH", loc, bytes.NewReader(chunk),
						"Content-Range", fmt.Sprintf(tt.rangeForm, offset, offset+len(chunk)-1))
				}
				offset += len(chunk)
				loc = r.wantSession(t, http.StatusAccepted, fmt.Sprintf("0-%d", offset-1))
			}
			loc = h.do(t, "GET", loc, nil).wantSession(t, http.StatusNoContent, fmt.Sprintf("0-%d", offset-1))
			d := tt.alg.FromBytes(whole)
			r := h.do(t, "PUT", loc+"?digest="+d.String(), bytes.NewReader(c))
			r.wantStatus(t, http.StatusCreated)
			if got := r.header.Get("Location"); got != "/v2/team/app/blobs/"+d.String() {
				t.Errorf("Location = %q", got)
			}
			if got := r.header.Get("Docker-Content-Digest"); got != d.String() {
				t.Errorf("Docker-Content-Digest = %q, want %s", got, d)
			}
			g := h.do(t, "GET", r.header.Get("Location"), nil)
			g.wantStatus(t, http.StatusOK)
			if !bytes.Equal(g.body, whole) {
				t.Errorf("blob holds %d bytes, want the %d uploaded", len(g.body), len(whole))
			}
			if n := h.leftoverUploads(t); n != 0 {
				t.Errorf("%d uploads left after completion", n)
			}
		})
	}
}

// A client that declares more bytes than it sends gets a 400-class error,
// nothing is committed, and a session can be retried from where its token
// says it stands.
func TestShortBody(t *testing.T) {
	full := randomBytes(100)
	d := digest.FromBytes(full)

	t.Run("patch then retry", func(t *testing.T) {
		h := newHarness(t)
		loc := h.startUpload(t, "app")
		h.raw(t, "PATCH", loc, len(full), full[:50], "Content-Range", "0-99").
			wantError(t, http.StatusBadRequest, "BLOB_UPLOAD_INVALID")
		h.do(t, "GET", loc, nil).wantSession(t, http.StatusNoContent, "0-0")
		next := h.patch(t, loc, 0, full).wantSession(t, http.StatusAccepted, "0-99")
		h.do(t, "PUT", next+"?digest="+d.String(), nil).wantStatus(t, http.StatusCreated)
		h.wantBlob(t, "app", full)
	})
	t.Run("streamed patch then retry", func(t *testing.T) {
		h := newHarness(t)
		loc := h.startUpload(t, "app")
		loc = h.patch(t, loc, 0, full[:10]).wantSession(t, http.StatusAccepted, "0-9")
		h.raw(t, "PATCH", loc, 90, full[10:40]).wantError(t, http.StatusBadRequest, "BLOB_UPLOAD_INVALID")
		h.do(t, "GET", loc, nil).wantSession(t, http.StatusNoContent, "0-9")
		next := h.patch(t, loc, 10, full[10:]).wantSession(t, http.StatusAccepted, "0-99")
		h.do(t, "PUT", next+"?digest="+d.String(), nil).wantStatus(t, http.StatusCreated)
		h.wantBlob(t, "app", full)
	})
	t.Run("monolithic post", func(t *testing.T) {
		h := newHarness(t)
		h.raw(t, "POST", "/v2/app/blobs/uploads/?digest="+d.String(), len(full), full[:60]).
			wantError(t, http.StatusBadRequest, "BLOB_UPLOAD_INVALID")
		h.wantNoBlob(t, "app", d)
		if n := h.leftoverUploads(t); n != 0 {
			t.Errorf("%d uploads left behind", n)
		}
	})
	t.Run("final put then retry", func(t *testing.T) {
		h := newHarness(t)
		loc := h.startUpload(t, "app")
		loc = h.patch(t, loc, 0, full[:30]).wantSession(t, http.StatusAccepted, "0-29")
		h.raw(t, "PUT", loc+"?digest="+d.String(), 70, full[30:50]).
			wantError(t, http.StatusBadRequest, "BLOB_UPLOAD_INVALID")
		h.wantNoBlob(t, "app", d)
		h.do(t, "PUT", loc+"?digest="+d.String(), bytes.NewReader(full[30:])).wantStatus(t, http.StatusCreated)
		h.wantBlob(t, "app", full)
	})
	t.Run("manifest", func(t *testing.T) {
		h := newHarness(t)
		body := h.newImage(t, "app").bytes(t)
		h.raw(t, "PUT", "/v2/app/manifests/v1", len(body), body[:len(body)/2], "Content-Type", mediaTypeOCIManifest).
			wantError(t, http.StatusBadRequest, "MANIFEST_INVALID")
		h.do(t, "GET", "/v2/app/manifests/v1", nil).wantError(t, http.StatusNotFound, "MANIFEST_UNKNOWN")
		h.do(t, "GET", "/v2/app/manifests/"+digest.FromBytes(body).String(), nil).wantError(t, http.StatusNotFound, "MANIFEST_UNKNOWN")
	})
}

func TestOutOfOrderChunk(t *testing.T) {
	first, second := randomBytes(10), randomBytes(10)
	whole := append(append([]byte{}, first...), second...)
	d := digest.FromBytes(whole)
	tests := []struct {
		name   string
		method string
		cr     string
		body   []byte
	}{
		{"resend written range", "PATCH", "0-9", first},
		{"overlap", "PATCH", "5-14", whole[5:15]},
		{"gap", "PATCH", "20-29", second},
		{"one past", "PATCH", "11-20", second},
		{"length disagrees", "PATCH", "10-19", second[:5]},
		{"malformed", "PATCH", "ten-nineteen", second},
		{"open end", "PATCH", "10-", second},
		{"reversed", "PATCH", "19-10", second},
		{"negative", "PATCH", "-10-19", second},
		{"put with stale range and right digest", "PUT", "0-9", first},
	}
	h := newHarness(t)
	loc := h.startUpload(t, "app")
	loc = h.patch(t, loc, 0, first).wantSession(t, http.StatusAccepted, "0-9")
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := loc
			if tt.method == "PUT" {
				path += "?digest=" + d.String()
			}
			r := h.do(t, tt.method, path, bytes.NewReader(tt.body), "Content-Range", tt.cr)
			r.wantError(t, http.StatusRequestedRangeNotSatisfiable, "RANGE_INVALID")
			if got := r.header.Get("Range"); got != "0-9" {
				t.Errorf("Range = %q, want 0-9 (where the session stands)", got)
			}
			h.do(t, "GET", loc, nil).wantSession(t, http.StatusNoContent, "0-9")
		})
	}
	loc = h.patch(t, loc, 10, second).wantSession(t, http.StatusAccepted, "0-19")
	h.do(t, "PUT", loc+"?digest="+d.String(), nil).wantStatus(t, http.StatusCreated)
	h.wantBlob(t, "app", whole)
}

func TestWrongDigest(t *testing.T) {
	content, other := randomBytes(64), randomBytes(64)
	d, wrong := digest.FromBytes(content), digest.FromBytes(other)
	wrong512 := digest.SHA512.FromBytes(other)

	t.Run("session", func(t *testing.T) {
		for _, bad := range []digest.Digest{wrong, wrong512} {
			h := newHarness(t)
			loc := h.startUpload(t, "app")
			loc = h.patch(t, loc, 0, content).wantSession(t, http.StatusAccepted, "0-63")
			h.do(t, "PUT", loc+"?digest="+bad.String(), nil).wantError(t, http.StatusBadRequest, "DIGEST_INVALID")
			h.wantNoBlob(t, "app", d)
			h.wantNoBlob(t, "app", bad)
			// The spec lets the registry drop a failed session; Meridian does.
			h.do(t, "GET", loc, nil).wantError(t, http.StatusNotFound, "BLOB_UPLOAD_UNKNOWN")
			if n := h.leftoverUploads(t); n != 0 {
				t.Errorf("%d uploads left behind", n)
			}
		}
	})
	t.Run("monolithic", func(t *testing.T) {
		h := newHarness(t)
		h.do(t, "POST", "/v2/app/blobs/uploads/?digest="+wrong.String(), bytes.NewReader(content)).
			wantError(t, http.StatusBadRequest, "DIGEST_INVALID")
		h.wantNoBlob(t, "app", d)
		h.wantNoBlob(t, "app", wrong)
		if n := h.leftoverUploads(t); n != 0 {
			t.Errorf("%d uploads left behind", n)
		}
	})
	t.Run("malformed keeps the session", func(t *testing.T) {
		h := newHarness(t)
		loc := h.startUpload(t, "app")
		loc = h.patch(t, loc, 0, content).wantSession(t, http.StatusAccepted, "0-63")
		for _, q := range []string{"", "?digest=", "?digest=sha256:baddigeststring", "?digest=md5:" + strings.Repeat("a", 32),
			"?digest=" + strings.ToUpper(d.Encoded())} {
			h.do(t, "PUT", loc+q, nil).wantError(t, http.StatusBadRequest, "DIGEST_INVALID")
			h.do(t, "GET", loc, nil).wantSession(t, http.StatusNoContent, "0-63")
		}
		h.do(t, "PUT", loc+"?digest="+d.String(), nil).wantStatus(t, http.StatusCreated)
		h.wantBlob(t, "app", content)
	})
}

// Tokens that are forged, expired, signed with another key or issued for
// another repository all read as unknown sessions and touch nothing.
func TestUploadTokensRefused(t *testing.T) {
	h := newHarness(t)
	content := randomBytes(20)
	start := h.do(t, "POST", "/v2/app/blobs/uploads/", nil)
	id := start.header.Get("Docker-Upload-UUID")
	loc := start.wantSession(t, http.StatusAccepted, "0-0")
	loc = h.patch(t, loc, 0, content[:10]).wantSession(t, http.StatusAccepted, "0-9")
	otherLoc := h.startUpload(t, "other")

	prefix := "/v2/app/blobs/uploads/"
	token := strings.TrimPrefix(loc, prefix)
	live := uploadState{Repo: "app", Region: "local", ID: id, Offset: 10, Expires: time.Now().Add(time.Hour).Unix()}
	expired := live
	expired.Expires = time.Now().Add(-time.Second).Unix()
	// Change one character to another of the URL-safe alphabet (flipping a
	// bit could yield a character the path parser refuses first), at the
	// end (the authentication tag) and in the middle (the ciphertext).
	altered := func(i int) string {
		b := []byte(token)
		if b[i] == 'A' {
			b[i] = 'B'
		} else {
			b[i] = 'A'
		}
		return string(b)
	}
	tests := []struct{ name, path string }{
		{"forged tag", prefix + altered(len(token)-2)},
		{"altered ciphertext", prefix + altered(len(token)/2)},
		{"wrong key", prefix + sealToken(&pb.UploadKey{Id: 0, Key: randomBytes(32)}, live)},
		{"expired", prefix + sealToken(&pb.UploadKey{Id: 0, Key: h.meta.key}, expired)},
		{"other repository's token", prefix + strings.TrimPrefix(otherLoc, "/v2/other/blobs/uploads/")},
		{"this token in another repository", "/v2/other/blobs/uploads/" + token},
		{"this token in a child repository", "/v2/app/x/blobs/uploads/" + token},
		{"garbage", prefix + "garbage"},
		{"garbage with a dot", prefix + "a.b"},
		{"overlong", prefix + strings.Repeat("A", 5000) + token},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, req := range []struct {
				method, query string
				body          []byte
			}{
				{"GET", "", nil},
				{"PATCH", "", content[10:]},
				{"PUT", "?digest=" + digest.FromBytes(content).String(), content[10:]},
				{"DELETE", "", nil},
			} {
				r := h.do(t, req.method, tt.path+req.query, bytes.NewReader(req.body), "Content-Range", "10-19")
				r.wantError(t, http.StatusNotFound, "BLOB_UPLOAD_UNKNOWN")
				if strings.Contains(string(r.body), id) {
					t.Errorf("%s: the error names the upload id", req.method)
				}
			}
		})
	}
	// Neither session moved.
	h.do(t, "GET", otherLoc, nil).wantSession(t, http.StatusNoContent, "0-0")
	loc = h.do(t, "GET", loc, nil).wantSession(t, http.StatusNoContent, "0-9")
	h.do(t, "PUT", loc+"?digest="+digest.FromBytes(content).String(), bytes.NewReader(content[10:])).wantStatus(t, http.StatusCreated)
	h.wantBlob(t, "app", content)
}

func TestSessionReuse(t *testing.T) {
	content := randomBytes(32)
	d := digest.FromBytes(content)
	ops := []struct {
		method, query string
		body          []byte
	}{
		{"GET", "", nil},
		{"PATCH", "", randomBytes(8)},
		{"PUT", "?digest=" + d.String(), nil},
		{"PUT", "?digest=" + digest.FromBytes(append(content, 1)).String(), []byte{1}},
		{"DELETE", "", nil},
	}
	t.Run("after completion", func(t *testing.T) {
		h := newHarness(t)
		first := h.startUpload(t, "app")
		last := h.patch(t, first, 0, content).wantSession(t, http.StatusAccepted, "0-31")
		h.do(t, "PUT", last+"?digest="+d.String(), nil).wantStatus(t, http.StatusCreated)
		// Repeating the completing PUT is idempotent (its answer may have
		// been lost, or been a 503 while copies were made); nothing else
		// works on a finished session.
		h.do(t, "PUT", last+"?digest="+d.String(), nil).wantStatus(t, http.StatusCreated)
		for _, loc := range []string{first, last} {
			for _, op := range ops {
				if loc == last && op.method == "PUT" && op.body == nil {
					continue
				}
				h.do(t, op.method, loc+op.query, bytes.NewReader(op.body)).wantError(t, http.StatusNotFound, "BLOB_UPLOAD_UNKNOWN")
			}
		}
		h.wantBlob(t, "app", content)
	})
	t.Run("after cancel", func(t *testing.T) {
		h := newHarness(t)
		small := h.pushBlob(t, "elsewhere", randomBytes(8))
		loc := h.startUpload(t, "app")
		loc = h.patch(t, loc, 0, content).wantSession(t, http.StatusAccepted, "0-31")
		r := h.do(t, "DELETE", loc, nil)
		r.wantStatus(t, http.StatusNoContent)
		// Nor can the dead session claim a blob that some other push stored.
		for _, op := range append(ops, struct {
			method, query string
			body          []byte
		}{"PUT", "?digest=" + small.String(), nil}) {
			h.do(t, op.method, loc+op.query, bytes.NewReader(op.body)).wantError(t, http.StatusNotFound, "BLOB_UPLOAD_UNKNOWN")
		}
		h.wantNoBlob(t, "app", d)
		h.wantNoBlob(t, "app", small)
		if n := h.leftoverUploads(t); n != 0 {
			t.Errorf("%d uploads left after cancel", n)
		}
	})
}

// A PUT whose bytes were committed but whose link could not be (no leader)
// answers 503; the same PUT retried later completes, and only once.
func TestPutRetriedAfterNoLeader(t *testing.T) {
	h := newHarness(t)
	content := randomBytes(40)
	d := digest.FromBytes(content)
	loc := h.startUpload(t, "app")
	loc = h.patch(t, loc, 0, content).wantSession(t, http.StatusAccepted, "0-39")
	h.meta.setFail(fmt.Errorf("%w: %v", pb.ErrNotLeader, "election in progress"))
	r := h.do(t, "PUT", loc+"?digest="+d.String(), nil)
	r.wantError(t, http.StatusServiceUnavailable, "UNAVAILABLE")
	if r.header.Get("Location") != "" || r.header.Get("Docker-Content-Digest") != "" {
		t.Errorf("503 carries success headers: %v", r.header)
	}
	h.wantNoBlob(t, "app", d)
	h.meta.setFail(nil)
	h.do(t, "PUT", loc+"?digest="+d.String(), nil).wantStatus(t, http.StatusCreated)
	h.wantBlob(t, "app", content)
	// Again: idempotent, and still one link.
	h.do(t, "PUT", loc+"?digest="+d.String(), nil).wantStatus(t, http.StatusCreated)
	h.wantBlob(t, "app", content)
}

func TestBlobSizeLimit(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.MaxBlobSize = 16 })
	t.Run("monolithic", func(t *testing.T) {
		big := randomBytes(17)
		h.do(t, "POST", "/v2/app/blobs/uploads/?digest="+digest.FromBytes(big).String(), bytes.NewReader(big)).
			wantError(t, http.StatusRequestEntityTooLarge, "SIZE_INVALID")
		h.wantNoBlob(t, "app", digest.FromBytes(big))
		if n := h.leftoverUploads(t); n != 0 {
			t.Errorf("%d uploads left behind", n)
		}
		h.pushBlob(t, "app", big[:16])
	})
	t.Run("chunks", func(t *testing.T) {
		content := randomBytes(16)
		loc := h.startUpload(t, "app")
		loc = h.patch(t, loc, 0, content[:10]).wantSession(t, http.StatusAccepted, "0-9")
		h.patch(t, loc, 10, randomBytes(10)).wantError(t, http.StatusRequestEntityTooLarge, "SIZE_INVALID")
		h.do(t, "PATCH", loc, chunked(randomBytes(7))).wantError(t, http.StatusRequestEntityTooLarge, "SIZE_INVALID")
		h.do(t, "GET", loc, nil).wantSession(t, http.StatusNoContent, "0-9")
		h.do(t, "PUT", loc+"?digest="+digest.FromBytes(content).String(), bytes.NewReader(content[10:])).
			wantStatus(t, http.StatusCreated)
		h.wantBlob(t, "app", content)
	})
}

func TestMount(t *testing.T) {
	h := newHarness(t)
	content := randomBytes(50)
	d := h.pushBlob(t, "src", content)
	missing := digest.FromString("never pushed")
	tests := []struct {
		name, query string
		status      int
	}{
		{"from a repository that holds it", "mount=" + d.String() + "&from=src", http.StatusCreated},
		{"anonymous", "mount=" + d.String(), http.StatusCreated},
		{"missing blob", "mount=" + missing.String() + "&from=src", http.StatusAccepted},
		{"from a repository without it", "mount=" + d.String() + "&from=elsewhere", http.StatusAccepted},
		{"invalid from", "mount=" + d.String() + "&from=../src", http.StatusAccepted},
		{"invalid digest", "mount=sha256:baddigeststring&from=src", http.StatusAccepted},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			repo := fmt.Sprintf("dst%d", i)
			r := h.do(t, "POST", "/v2/"+repo+"/blobs/uploads/?"+tt.query, nil)
			r.wantStatus(t, tt.status)
			if tt.status == http.StatusCreated {
				if got := r.header.Get("Location"); got != "/v2/"+repo+"/blobs/"+d.String() {
					t.Errorf("Location = %q", got)
				}
				h.wantBlob(t, repo, content)
				return
			}
			if !strings.HasPrefix(r.header.Get("Location"), "/v2/"+repo+"/blobs/uploads/") {
				t.Errorf("Location = %q, want a new session", r.header.Get("Location"))
			}
			h.wantNoBlob(t, repo, d)
		})
	}
}

// An earlier token of a session must not rewrite bytes that a later token's
// hash state already covers: the later token would then commit the new bytes
// under the old digest and, since a commit keeps an existing blob of the same
// digest, every later push of the genuine content would be served them.
func TestRewrittenSessionCannotPoisonADigest(t *testing.T) {
	genuine, forged := bytes.Repeat([]byte("G"), 64), bytes.Repeat([]byte("F"), 64)
	d := digest.FromBytes(genuine)
	tests := []struct {
		name    string
		rewrite func(t *testing.T, h *harness, stale string) reply
	}{
		{"patch", func(t *testing.T, h *harness, stale string) reply {
			return h.patch(t, stale, 0, forged)
		}},
		{"streamed patch", func(t *testing.T, h *harness, stale string) reply {
			return h.do(t, "PATCH", stale, chunked(forged))
		}},
		{"put with a body", func(t *testing.T, h *harness, stale string) reply {
			return h.do(t, "PUT", stale+"?digest="+digest.FromBytes(forged).String(), bytes.NewReader(forged))
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newHarness(t)
			first := h.startUpload(t, "attacker")
			later := h.patch(t, first, 0, genuine).wantSession(t, http.StatusAccepted, "0-63")
			r := tt.rewrite(t, h, first)
			r.wantError(t, http.StatusRequestedRangeNotSatisfiable, "RANGE_INVALID")
			if got := r.header.Get("Range"); got != "0-0" {
				t.Errorf("Range = %q, want 0-0 (what the stale token covers)", got)
			}
			// The stale token is dead; the later one still stands where it did.
			h.do(t, "GET", first, nil).wantError(t, http.StatusNotFound, "BLOB_UPLOAD_UNKNOWN")
			later = h.do(t, "GET", later, nil).wantSession(t, http.StatusNoContent, "0-63")
			h.do(t, "PUT", later+"?digest="+d.String(), nil).wantStatus(t, http.StatusCreated)
			h.wantBlob(t, "attacker", genuine)
			h.wantNoBlob(t, "attacker", digest.FromBytes(forged))
			h.pushBlob(t, "victim", genuine)
			h.wantBlob(t, "victim", genuine)
		})
	}
}

// A session whose upload holds bytes its token does not cover (a crash cut a
// write short) can neither continue nor commit, and says so.
func TestInterruptedSessionIsDead(t *testing.T) {
	h := newHarness(t)
	content := randomBytes(40)
	start := h.do(t, "POST", "/v2/app/blobs/uploads/", nil)
	loc := start.wantSession(t, http.StatusAccepted, "0-0")
	loc = h.patch(t, loc, 0, content[:20]).wantSession(t, http.StatusAccepted, "0-19")
	// What a crash mid-write leaves behind: bytes no token has hashed.
	id := start.header.Get("Docker-Upload-UUID")
	if _, err := h.store.WriteUpload(t.Context(), id, 20, bytes.NewReader(content[20:30])); err != nil {
		t.Fatal(err)
	}
	h.do(t, "GET", loc, nil).wantError(t, http.StatusNotFound, "BLOB_UPLOAD_UNKNOWN")
	for _, r := range []reply{
		h.patch(t, loc, 20, content[20:]),
		h.do(t, "PATCH", loc, chunked(content[20:])),
		h.do(t, "PUT", loc+"?digest="+digest.FromBytes(content).String(), bytes.NewReader(content[20:])),
		h.do(t, "PUT", loc+"?digest="+digest.FromBytes(content[:20]).String(), nil),
		h.do(t, "PUT", loc+"?digest="+digest.SHA512.FromBytes(content[:20]).String(), nil),
	} {
		r.wantError(t, http.StatusRequestedRangeNotSatisfiable, "RANGE_INVALID")
		if got := r.header.Get("Range"); got != "0-19" {
			t.Errorf("Range = %q, want 0-19", got)
		}
	}
	h.wantNoBlob(t, "app", digest.FromBytes(content))
	h.wantNoBlob(t, "app", digest.FromBytes(content[:20]))
	if size, err := h.store.UploadSize(t.Context(), id); err != nil || size != 30 {
		t.Errorf("upload holds %d bytes (%v), want the 30 left by the interrupted write", size, err)
	}
}

// A cancelled session links nothing: a PUT naming a blob another
// repository holds is refused as an unknown session, with or without a
// body, and the blob stays out of the caller's repository.
func TestFinishedSessionLinksNothing(t *testing.T) {
	h := newHarness(t)
	secret := randomBytes(64)
	d := h.pushBlob(t, "victim", secret)

	loc := h.startUpload(t, "thief")
	loc = h.patch(t, loc, 0, []byte("abc")).wantSession(t, http.StatusAccepted, "0-2")
	h.do(t, "DELETE", loc, nil).wantStatus(t, http.StatusNoContent)
	for _, body := range [][]byte{nil, []byte("abc"), randomBytes(61)} {
		h.do(t, "PUT", loc+"?digest="+d.String(), bytes.NewReader(body)).
			wantError(t, http.StatusNotFound, "BLOB_UPLOAD_UNKNOWN")
	}
	h.do(t, "GET", loc, nil).wantError(t, http.StatusNotFound, "BLOB_UPLOAD_UNKNOWN")
	h.do(t, "PATCH", loc, bytes.NewReader([]byte("more"))).wantError(t, http.StatusNotFound, "BLOB_UPLOAD_UNKNOWN")
	h.wantNoBlob(t, "thief", d)

	// An empty session, cancelled at once, is no different.
	empty := h.startUpload(t, "thief")
	h.do(t, "DELETE", empty, nil).wantStatus(t, http.StatusNoContent)
	h.do(t, "PUT", empty+"?digest="+d.String(), nil).wantError(t, http.StatusNotFound, "BLOB_UPLOAD_UNKNOWN")
	h.wantNoBlob(t, "thief", d)

	// A completed session's repeated PUT still answers 201 (and links
	// nothing new).
	content := randomBytes(40)
	loc = h.startUpload(t, "app")
	loc = h.patch(t, loc, 0, content[:30]).wantSession(t, http.StatusAccepted, "0-29")
	put := loc + "?digest=" + digest.FromBytes(content).String()
	h.do(t, "PUT", put, bytes.NewReader(content[30:])).wantStatus(t, http.StatusCreated)
	h.do(t, "PUT", put, bytes.NewReader(content[30:])).wantStatus(t, http.StatusCreated)
	h.wantBlob(t, "app", content)
}

// An upload's link carries a fence taken before its bytes became the blob,
// so garbage collection can refuse it when a removal may have deleted them
// (LinkBlob.written_after_index); a PUT retried after the bytes were
// committed takes a new one.
func TestUploadLinkCarriesFence(t *testing.T) {
	h := newHarness(t)
	content := randomBytes(40)
	d := digest.FromBytes(content)
	h.meta.onFence = func() {
		if _, err := h.store.Stat(context.Background(), d); !errors.Is(err, replication.ErrBlobNotFound) {
			t.Errorf("fence taken when the store holds the blob already (%v)", err)
		}
	}
	loc := h.startUpload(t, "app")
	loc = h.patch(t, loc, 0, content).wantSession(t, http.StatusAccepted, "0-39")
	h.meta.setFail(fmt.Errorf("%w: %v", pb.ErrNotLeader, "election in progress"))
	h.do(t, "PUT", loc+"?digest="+d.String(), nil).wantError(t, http.StatusServiceUnavailable, "UNAVAILABLE")
	h.meta.setFail(nil)
	h.meta.onFence = nil
	h.do(t, "PUT", loc+"?digest="+d.String(), nil).wantStatus(t, http.StatusCreated)
	h.wantBlob(t, "app", content)
	h.meta.mu.Lock()
	defer h.meta.mu.Unlock()
	if !slices.Equal(h.meta.linkFences, []uint64{2}) || h.meta.fence != 2 {
		t.Fatalf("links carried fences %v after %d fences; want [2]: the retry's own", h.meta.linkFences, h.meta.fence)
	}
}
