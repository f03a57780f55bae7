package gateway

import (
	"context"
	"encoding/base64"
	"fmt"
	"net/http"

	"google.golang.org/grpc/metadata"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// AccessControl is what a standalone gateway needs of access control: the
// Authorizer of its OCI API, the token endpoint, and a loop that keeps its
// copy of the access state current from the nodes (gateway/auth provides
// it).
type AccessControl interface {
	Authorizer
	TokenHandler() http.Handler
	// Follow keeps the state current with fetch until ctx ends.
	Follow(ctx context.Context, fetch func(ctx context.Context, known uint64) (*pb.AccessState, error))
	Ready() bool
	// AdminOnly serves h to cluster admins only.
	AdminOnly(h http.Handler) http.Handler
}

// AccessState fetches the cluster's access state from the nearest node
// that answers; nil without error when the gateway already holds version
// known. user and pass authenticate the call on a cluster without TLS (a
// cluster admin's credentials: the state holds password hashes and token
// signing keys); with TLS the gateway's certificate does.
func (u *Upstream) AccessState(ctx context.Context, known uint64, user, pass string) (*pb.AccessState, error) {
	if user != "" {
		basic := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Basic "+basic)
	}
	var last error = noNodes()
	for _, n := range u.Nodes() {
		conn, err := u.dial(n.Addr)
		if err != nil {
			last = err
			continue
		}
		resp, err := pb.NewGatewayClient(conn).GetAccessState(ctx, &pb.GetAccessStateRequest{KnownVersion: known})
		if err != nil {
			last = fmt.Errorf("node %s: %w", n.ID, pb.FromStatus(err))
			continue
		}
		if resp.Unchanged {
			return nil, nil
		}
		return resp.State, nil
	}
	return nil, last
}
