package gateway

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// ErrorCode is an error code of the OCI Distribution spec (or one of
// Meridian's own, for conditions the spec does not name) with its HTTP status.
type ErrorCode struct {
	Value   string
	Message string
	Status  int
}

// The error codes the gateway answers with, each registered once with its
// HTTP status.
var (
	CodeBlobUnknown         = ErrorCode{"BLOB_UNKNOWN", "blob unknown to registry", http.StatusNotFound}
	CodeBlobUploadInvalid   = ErrorCode{"BLOB_UPLOAD_INVALID", "blob upload invalid", http.StatusBadRequest}
	CodeBlobUploadUnknown   = ErrorCode{"BLOB_UPLOAD_UNKNOWN", "blob upload unknown to registry", http.StatusNotFound}
	CodeDigestInvalid       = ErrorCode{"DIGEST_INVALID", "provided digest did not match uploaded content", http.StatusBadRequest}
	CodeManifestBlobUnknown = ErrorCode{"MANIFEST_BLOB_UNKNOWN", "manifest references a manifest or blob unknown to registry", http.StatusBadRequest}
	CodeManifestInvalid     = ErrorCode{"MANIFEST_INVALID", "manifest invalid", http.StatusBadRequest}
	CodeManifestUnknown     = ErrorCode{"MANIFEST_UNKNOWN", "manifest unknown to registry", http.StatusNotFound}
	CodeNameInvalid         = ErrorCode{"NAME_INVALID", "invalid repository name", http.StatusBadRequest}
	CodeNameUnknown         = ErrorCode{"NAME_UNKNOWN", "repository name not known to registry", http.StatusNotFound}
	CodeSizeInvalid         = ErrorCode{"SIZE_INVALID", "provided length did not match content length", http.StatusBadRequest}
	CodeUnauthorized        = ErrorCode{"UNAUTHORIZED", "authentication required", http.StatusUnauthorized}
	CodeDenied              = ErrorCode{"DENIED", "requested access to the resource is denied", http.StatusForbidden}
	CodeUnsupported         = ErrorCode{"UNSUPPORTED", "the operation is unsupported", http.StatusMethodNotAllowed}
	CodeTooManyRequests     = ErrorCode{"TOOMANYREQUESTS", "too many requests", http.StatusTooManyRequests}
	CodePaginationInvalid   = ErrorCode{"PAGINATION_NUMBER_INVALID", "invalid number of results requested", http.StatusBadRequest}

	// Meridian's own codes.
	CodeRangeInvalid       = ErrorCode{"RANGE_INVALID", "requested range not satisfiable", http.StatusRequestedRangeNotSatisfiable}
	CodeTooLarge           = ErrorCode{"SIZE_INVALID", "content exceeds the configured size limit", http.StatusRequestEntityTooLarge}
	CodePreconditionFailed = ErrorCode{"PRECONDITION_FAILED", "the tag does not match the request's precondition", http.StatusPreconditionFailed}
	CodeUnavailable        = ErrorCode{"UNAVAILABLE", "the registry cannot commit or confirm this right now; retry", http.StatusServiceUnavailable}
	CodeStorageFull        = ErrorCode{"STORAGE_FULL", "the blob store is out of space", http.StatusInsufficientStorage}
	CodeInternal           = ErrorCode{"INTERNAL", "internal server error", http.StatusInternalServerError}
)

// Error is one entry of the OCI error envelope.
type Error struct {
	Code   ErrorCode
	Detail string
	// Headers are set on the response, e.g. Content-Range on a 416.
	Headers map[string]string
}

func (e *Error) Error() string {
	if e.Detail == "" {
		return e.Code.Value
	}
	return e.Code.Value + ": " + e.Detail
}

// errorf returns an *Error with a formatted detail.
func errorf(code ErrorCode, format string, args ...any) *Error {
	return &Error{Code: code, Detail: fmt.Sprintf(format, args...)}
}

// metadataCodes maps the business errors of the metadata layer to OCI codes.
var metadataCodes = map[pb.Code]ErrorCode{
	pb.Code_CODE_BLOB_UNKNOWN:          CodeBlobUnknown,
	pb.Code_CODE_MANIFEST_UNKNOWN:      CodeManifestUnknown,
	pb.Code_CODE_MANIFEST_BLOB_UNKNOWN: CodeManifestBlobUnknown,
	pb.Code_CODE_NAME_UNKNOWN:          CodeNameUnknown,
	pb.Code_CODE_TAG_UNKNOWN:           CodeManifestUnknown,
	pb.Code_CODE_PRECONDITION_FAILED:   CodePreconditionFailed,
	pb.Code_CODE_INVALID_ARGUMENT:      CodeManifestInvalid,
	pb.Code_CODE_UNAVAILABLE:           CodeUnavailable,
	pb.Code_CODE_NOT_LEADER:            CodeUnavailable,
	pb.Code_CODE_DENIED:                CodeDenied,
}

// asError turns any error into the envelope entry that describes it.
func asError(err error) *Error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	var me *pb.Error
	if errors.As(err, &me) {
		if code, ok := metadataCodes[me.Code]; ok {
			return &Error{Code: code, Detail: me.Detail}
		}
	}
	return &Error{Code: CodeInternal}
}

type envelope struct {
	Errors []envelopeEntry `json:"errors"`
}

type envelopeEntry struct {
	Code    string `json:"code"`
	Message string `json:"message"`
	Detail  any    `json:"detail,omitempty"`
}

// writeError emits the error envelope for err.
func writeError(w http.ResponseWriter, r *http.Request, err error) {
	e := asError(err)
	// Handlers may have set success headers before failing; a stale
	// Content-Length would also cut the envelope short or hang the client.
	for _, k := range []string{"Location", "Docker-Content-Digest", "Content-Length", "Content-Range", "ETag"} {
		w.Header().Del(k)
	}
	for k, v := range e.Headers {
		w.Header().Set(k, v)
	}
	if e.Code.Status == http.StatusServiceUnavailable {
		w.Header().Set("Retry-After", "1")
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(e.Code.Status)
	if r.Method == http.MethodHead {
		return
	}
	entry := envelopeEntry{Code: e.Code.Value, Message: e.Code.Message}
	if e.Detail != "" {
		entry.Detail = e.Detail
	}
	json.NewEncoder(w).Encode(envelope{Errors: []envelopeEntry{entry}})
}
