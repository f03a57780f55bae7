package gateway

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"syscall"
	"testing"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
	"github.com/meridian-registry/meridian/replication"
)

// envelopeBody is the OCI error envelope as a client decodes it.
type envelopeBody struct {
	Errors []struct {
		Code    string `json:"code"`
		Message string `json:"message"`
		Detail  any    `json:"detail"`
	} `json:"errors"`
}

// decodeEnvelope decodes an error body strictly: exactly the envelope's fields.
func decodeEnvelope(t *testing.T, body []byte) envelopeBody {
	t.Helper()
	var env envelopeBody
	dec := json.NewDecoder(strings.NewReader(string(body)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&env); err != nil {
		t.Fatalf("error body %q is not an OCI error envelope: %v", body, err)
	}
	if len(env.Errors) != 1 {
		t.Fatalf("envelope holds %d errors, want 1: %s", len(env.Errors), body)
	}
	return env
}

func TestWriteErrorEnvelope(t *testing.T) {
	tests := []struct {
		err    error
		status int
		code   string
		detail string
	}{
		{errorf(CodeBlobUnknown, "blob %s not found", "sha256:x"), 404, "BLOB_UNKNOWN", "blob sha256:x not found"},
		{errorf(CodeBlobUploadUnknown, "gone"), 404, "BLOB_UPLOAD_UNKNOWN", "gone"},
		{errorf(CodeBlobUploadInvalid, "short"), 400, "BLOB_UPLOAD_INVALID", "short"},
		{errorf(CodeDigestInvalid, "bad"), 400, "DIGEST_INVALID", "bad"},
		{errorf(CodeManifestInvalid, "bad"), 400, "MANIFEST_INVALID", "bad"},
		{errorf(CodeManifestUnknown, "nope"), 404, "MANIFEST_UNKNOWN", "nope"},
		{errorf(CodeNameInvalid, "bad"), 400, "NAME_INVALID", "bad"},
		{errorf(CodeNameUnknown, "nope"), 404, "NAME_UNKNOWN", "nope"},
		{errorf(CodeUnsupported, "no"), 405, "UNSUPPORTED", "no"},
		{errorf(CodeDenied, "no"), 403, "DENIED", "no"},
		{errorf(CodeUnauthorized, "who"), 401, "UNAUTHORIZED", "who"},
		{errorf(CodePaginationInvalid, "n"), 400, "PAGINATION_NUMBER_INVALID", "n"},
		{errorf(CodeTooLarge, "big"), 413, "SIZE_INVALID", "big"},
		{errorf(CodeRangeInvalid, "r"), 416, "RANGE_INVALID", "r"},
		{errorf(CodePreconditionFailed, "moved"), 412, "PRECONDITION_FAILED", "moved"},
		{errorf(CodeStorageFull, "full"), 507, "STORAGE_FULL", "full"},
		{&Error{Code: CodeManifestUnknown}, 404, "MANIFEST_UNKNOWN", ""},
		{fmt.Errorf("handler: %w", errorf(CodeDigestInvalid, "wrapped")), 400, "DIGEST_INVALID", "wrapped"},
	}
	for _, tt := range tests {
		t.Run(tt.code+"/"+tt.detail, func(t *testing.T) {
			w := httptest.NewRecorder()
			writeError(w, httptest.NewRequest(http.MethodGet, "/v2/a/tags/list", nil), tt.err)
			if w.Code != tt.status {
				t.Errorf("status = %d, want %d", w.Code, tt.status)
			}
			if ct := w.Header().Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type = %q, want application/json", ct)
			}
			if w.Header().Get("Retry-After") != "" {
				t.Errorf("Retry-After set on a %d", w.Code)
			}
			e := decodeEnvelope(t, w.Body.Bytes()).Errors[0]
			if e.Code != tt.code || e.Message == "" {
				t.Errorf("entry = %+v, want code %s with a message", e, tt.code)
			}
			if tt.detail == "" && e.Detail != nil {
				t.Errorf("detail = %v, want it omitted", e.Detail)
			}
			if tt.detail != "" && e.Detail != tt.detail {
				t.Errorf("detail = %v, want %q", e.Detail, tt.detail)
			}
		})
	}
}

func TestWriteErrorHead(t *testing.T) {
	w := httptest.NewRecorder()
	writeError(w, httptest.NewRequest(http.MethodHead, "/v2/a/manifests/latest", nil), errorf(CodeManifestUnknown, "nope"))
	if w.Code != http.StatusNotFound {
		t.Errorf("status = %d, want 404", w.Code)
	}
	if w.Body.Len() != 0 {
		t.Errorf("HEAD error has a body: %q", w.Body.String())
	}
}

func TestWriteErrorUnavailableHasRetryAfter(t *testing.T) {
	for _, err := range []error{
		errorf(CodeUnavailable, "no leader"),
		pb.ErrNotLeader,
		fmt.Errorf("%w: leadership lost", pb.ErrUnavailable),
	} {
		t.Run(err.Error(), func(t *testing.T) {
			w := httptest.NewRecorder()
			writeError(w, httptest.NewRequest(http.MethodPut, "/v2/a/manifests/latest", nil), err)
			if w.Code != http.StatusServiceUnavailable {
				t.Fatalf("status = %d, want 503", w.Code)
			}
			if w.Header().Get("Retry-After") == "" {
				t.Error("503 without Retry-After")
			}
			if c := decodeEnvelope(t, w.Body.Bytes()).Errors[0].Code; c != "UNAVAILABLE" {
				t.Errorf("code = %s, want UNAVAILABLE", c)
			}
		})
	}
}

// A handler may set success headers before it fails; the error response must
// not carry them.
func TestWriteErrorDropsSuccessHeaders(t *testing.T) {
	w := httptest.NewRecorder()
	w.Header().Set("Location", "/v2/a/blobs/"+sha256Sample)
	w.Header().Set("Docker-Content-Digest", sha256Sample)
	w.Header().Set("Content-Length", "123456")
	w.Header().Set("Content-Type", "application/octet-stream")
	e := errorf(CodeRangeInvalid, "out of order")
	e.Headers = map[string]string{"Range": "0-9"}
	writeError(w, httptest.NewRequest(http.MethodPatch, "/v2/a/blobs/uploads/x", nil), e)
	for _, h := range []string{"Location", "Docker-Content-Digest", "Content-Length"} {
		if v := w.Header().Get(h); v != "" {
			t.Errorf("%s = %q on an error response", h, v)
		}
	}
	if got := w.Header().Get("Range"); got != "0-9" {
		t.Errorf("Range = %q, want the error's own 0-9", got)
	}
	if ct := w.Header().Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q, want application/json", ct)
	}
}

func TestMetadataErrorsMapToOCI(t *testing.T) {
	tests := []struct {
		err    error
		status int
		code   string
	}{
		{pb.ErrBlobUnknown, 404, "BLOB_UNKNOWN"},
		{pb.ErrManifestUnknown, 404, "MANIFEST_UNKNOWN"},
		{pb.ErrManifestBlobUnknown, 400, "MANIFEST_BLOB_UNKNOWN"},
		{pb.ErrNameUnknown, 404, "NAME_UNKNOWN"},
		{pb.ErrTagUnknown, 404, "MANIFEST_UNKNOWN"},
		{pb.ErrPreconditionFailed, 412, "PRECONDITION_FAILED"},
		{pb.ErrInvalidArgument, 400, "MANIFEST_INVALID"},
		{pb.ErrUnavailable, 503, "UNAVAILABLE"},
		{pb.ErrNotLeader, 503, "UNAVAILABLE"},
		// As the state machine and consensus.Node.Propose return them.
		{pb.Errorf(pb.Code_CODE_MANIFEST_BLOB_UNKNOWN, "blob %s is not in %s", sha256Sample, "a"), 400, "MANIFEST_BLOB_UNKNOWN"},
		{pb.Errorf(pb.Code_CODE_PRECONDITION_FAILED, "tag latest already exists"), 412, "PRECONDITION_FAILED"},
		{fmt.Errorf("%w: %v", pb.ErrNotLeader, "node is not the leader"), 503, "UNAVAILABLE"},
		{fmt.Errorf("propose: %w", pb.Errorf(pb.Code_CODE_TAG_UNKNOWN, "tag x")), 404, "MANIFEST_UNKNOWN"},
	}
	for _, tt := range tests {
		t.Run(tt.err.Error(), func(t *testing.T) {
			w := httptest.NewRecorder()
			writeError(w, httptest.NewRequest(http.MethodGet, "/v2/a/manifests/x", nil), tt.err)
			if w.Code != tt.status {
				t.Errorf("status = %d, want %d", w.Code, tt.status)
			}
			e := decodeEnvelope(t, w.Body.Bytes()).Errors[0]
			if e.Code != tt.code {
				t.Errorf("code = %s, want %s", e.Code, tt.code)
			}
			var pe *pb.Error
			if errors.As(tt.err, &pe) && pe.Detail != "" && e.Detail != pe.Detail {
				t.Errorf("detail = %v, want the metadata layer's %q", e.Detail, pe.Detail)
			}
		})
	}
}

func TestUnknownErrorsDoNotLeak(t *testing.T) {
	secret := "open /var/lib/meridian/state/000123.sst: input/output error"
	for _, err := range []error{
		errors.New(secret),
		fmt.Errorf("blob is linked but missing: %w", fmt.Errorf("%w: %s", replication.ErrBlobNotFound, secret)),
		&pb.Error{Code: pb.Code_CODE_UNSPECIFIED, Detail: secret},
		&pb.Error{Code: pb.Code(99), Detail: secret},
	} {
		t.Run(fmt.Sprintf("%T", err), func(t *testing.T) {
			w := httptest.NewRecorder()
			writeError(w, httptest.NewRequest(http.MethodGet, "/v2/a/blobs/x", nil), err)
			if w.Code != http.StatusInternalServerError {
				t.Errorf("status = %d, want 500", w.Code)
			}
			e := decodeEnvelope(t, w.Body.Bytes()).Errors[0]
			if e.Code != "INTERNAL" || e.Detail != nil {
				t.Errorf("entry = %+v, want INTERNAL with no detail", e)
			}
			if strings.Contains(w.Body.String(), "meridian/state") || strings.Contains(w.Body.String(), "input/output") {
				t.Errorf("body leaks the internal error: %s", w.Body.String())
			}
		})
	}
}

func TestStoreErrorsMapToOCI(t *testing.T) {
	g := &Gateway{logger: slog.New(slog.DiscardHandler)}
	tests := []struct {
		err    error
		status int
		code   string
	}{
		{fmt.Errorf("%w: abc", replication.ErrUploadNotFound), 404, "BLOB_UPLOAD_UNKNOWN"},
		{fmt.Errorf("%w: write at 9", replication.ErrUploadOffset), 416, "RANGE_INVALID"},
		{fmt.Errorf("%w: no space", replication.ErrStorageFull), 507, "STORAGE_FULL"},
		{fmt.Errorf("%w: x", replication.ErrBlobNotFound), 404, "BLOB_UNKNOWN"},
		{fmt.Errorf("%w: x", replication.ErrInvalidDigest), 400, "DIGEST_INVALID"},
		{errors.New("disk on fire"), 500, "INTERNAL"},
	}
	for _, tt := range tests {
		t.Run(tt.code, func(t *testing.T) {
			e := asError(g.storeError(tt.err))
			if e.Code.Status != tt.status || e.Code.Value != tt.code {
				t.Errorf("storeError(%v) = %s %d, want %s %d", tt.err, e.Code.Value, e.Code.Status, tt.code, tt.status)
			}
		})
	}
}

// A full store's error names the file that could not be written; the client
// is told only that the store is full, and the operator finds the cause in
// the log.
func TestStorageFullHidesPaths(t *testing.T) {
	var log bytes.Buffer
	g := &Gateway{logger: slog.New(slog.NewTextHandler(&log, nil))}
	const path = "/srv/meridian/blobs/uploads/0123456789abcdef0123456789abcdef"
	err := fmt.Errorf("%w: replication: write upload: %w", replication.ErrStorageFull,
		&os.PathError{Op: "write", Path: path, Err: syscall.ENOSPC})
	w := httptest.NewRecorder()
	writeError(w, httptest.NewRequest(http.MethodPatch, "/v2/app/blobs/uploads/x", nil), g.storeError(err))
	if w.Code != http.StatusInsufficientStorage {
		t.Fatalf("status = %d, want 507", w.Code)
	}
	e := decodeEnvelope(t, w.Body.Bytes()).Errors[0]
	if e.Code != "STORAGE_FULL" || e.Detail != "the blob store is out of space" {
		t.Errorf("entry = %+v, want STORAGE_FULL saying the blob store is out of space", e)
	}
	if strings.Contains(w.Body.String(), "/srv/") || strings.Contains(w.Body.String(), "uploads") {
		t.Errorf("body leaks a server path: %s", w.Body.String())
	}
	if !strings.Contains(log.String(), path) || !strings.Contains(log.String(), "no space left on device") {
		t.Errorf("log lacks the cause: %q", log.String())
	}
}
