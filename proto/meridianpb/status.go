package meridianpb

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Between members, business outcomes travel in Result messages; gRPC status
// codes carry availability only. ToStatus and FromStatus are the one
// translation, used by nodes and gateways alike.
var codeToGRPC = map[Code]codes.Code{
	Code_CODE_UNAVAILABLE: codes.Unavailable,
	Code_CODE_NOT_LEADER:  codes.FailedPrecondition,
}

// ToStatus turns a failure that is not a business result into a status.
func ToStatus(err error) error {
	if c, ok := codeToGRPC[CodeOf(err)]; ok {
		return status.Error(c, err.Error())
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return status.Error(codes.DeadlineExceeded, err.Error())
	}
	return status.Error(codes.Internal, err.Error())
}

// FromStatus turns a failed call into a domain error: FailedPrecondition is
// NOT_LEADER (nothing was done), Internal and Unknown a remote bug, and
// everything else (transport trouble, timeouts) means the cluster is
// unavailable from here.
func FromStatus(err error) error {
	if err == nil {
		return nil
	}
	s, _ := status.FromError(err)
	switch s.Code() {
	case codes.FailedPrecondition:
		return fmt.Errorf("%w: %s", ErrNotLeader, s.Message())
	case codes.Internal, codes.Unknown:
		return fmt.Errorf("remote: %s", s.Message())
	}
	return fmt.Errorf("%w: %s", ErrUnavailable, s.Message())
}
