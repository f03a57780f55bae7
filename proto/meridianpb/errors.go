package meridianpb

import (
	"errors"
	"fmt"
)

// Error is a business failure with a Code: a tag that moved, a blob that is
// not linked, a leader that cannot be reached. The state machine returns these
// as values and the gateway turns them into OCI errors.
type Error struct {
	Code   Code
	Detail string
}

// Sentinel errors, one per Code. Compare with errors.Is; it matches on Code,
// so an error created by Errorf matches its sentinel.
var (
	ErrBlobUnknown         = &Error{Code: Code_CODE_BLOB_UNKNOWN}
	ErrManifestUnknown     = &Error{Code: Code_CODE_MANIFEST_UNKNOWN}
	ErrManifestBlobUnknown = &Error{Code: Code_CODE_MANIFEST_BLOB_UNKNOWN}
	ErrNameUnknown         = &Error{Code: Code_CODE_NAME_UNKNOWN}
	ErrTagUnknown          = &Error{Code: Code_CODE_TAG_UNKNOWN}
	ErrPreconditionFailed  = &Error{Code: Code_CODE_PRECONDITION_FAILED}
	ErrInvalidArgument     = &Error{Code: Code_CODE_INVALID_ARGUMENT}
	ErrUnavailable         = &Error{Code: Code_CODE_UNAVAILABLE}
	ErrNotLeader           = &Error{Code: Code_CODE_NOT_LEADER}
	ErrPolicyUnknown       = &Error{Code: Code_CODE_POLICY_UNKNOWN}
	ErrDenied              = &Error{Code: Code_CODE_DENIED}
)

// Errorf returns an *Error with code and a formatted detail.
func Errorf(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Detail: fmt.Sprintf(format, args...)}
}

func (e *Error) Error() string {
	if e.Detail == "" {
		return e.Code.String()
	}
	return e.Code.String() + ": " + e.Detail
}

// Is reports whether target is an *Error with the same code.
func (e *Error) Is(target error) bool {
	var t *Error
	return errors.As(target, &t) && t.Code == e.Code
}

// CodeOf returns the Code carried by err, or CODE_UNSPECIFIED.
func CodeOf(err error) Code {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return Code_CODE_UNSPECIFIED
}

// ResultOf describes err as a Result for a response message. It reports
// false when err is not a business error (the caller then answers with a
// gRPC status instead).
func ResultOf(err error) (*Result, bool) {
	if err == nil {
		return nil, true
	}
	var e *Error
	if !errors.As(err, &e) {
		return nil, false
	}
	return &Result{Code: e.Code, Detail: e.Detail}, true
}

// Err returns the business error a Result carries, or nil for success.
func (r *Result) Err() error {
	if r == nil || r.Code == Code_CODE_UNSPECIFIED {
		return nil
	}
	return &Error{Code: r.Code, Detail: r.Detail}
}
