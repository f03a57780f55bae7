package transport

import (
	"context"
	"slices"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/meridian-registry/meridian/node/pki"
)

// Credentialed is the role of a caller without a certificate, for the
// methods that accept an admin user's credentials instead (the node checks
// them; Access lists the methods that admit this role).
const Credentialed = "credentials"

// Access says which roles may call which gRPC method. Keys are full method
// names ("/meridian.v1.Admin/Status") or a service prefix ending in "/"
// ("/meridian.v1.Admin/"); the full name wins. A method the table does
// not name is refused: new RPCs are closed until someone decides who may
// call them.
type Access map[string][]string

// Roles returns the roles allowed to call method, and whether the table
// names it at all (by its full name or its service's prefix).
func (a Access) Roles(method string) ([]string, bool) {
	if r, ok := a[method]; ok {
		return r, true
	}
	if i := strings.LastIndex(method, "/"); i > 0 {
		if r, ok := a[method[:i+1]]; ok {
			return r, true
		}
	}
	return nil, false
}

// Caller returns the identity of the client of a gRPC call, from its
// verified certificate; false in plaintext.
func Caller(ctx context.Context) (pki.Identity, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok || p.AuthInfo == nil {
		return pki.Identity{}, false
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return pki.Identity{}, false
	}
	id, err := pki.PeerIdentity(info.State)
	if err != nil {
		return pki.Identity{}, false
	}
	return id, true
}

// authorize checks the caller of method against the table. In plaintext
// (no Trust) every call passes: such a cluster listens on loopback only,
// or its operator chose --insecure-cluster.
func (t *Trust) authorize(ctx context.Context, a Access, method string) error {
	if !t.Secure() {
		return nil
	}
	id, ok := Caller(ctx)
	allowed, named := a.Roles(method)
	if !ok {
		// No certificate: only methods that take credentials, which the
		// server's own interceptor then requires.
		if named && slices.Contains(allowed, Credentialed) {
			return nil
		}
		return status.Error(codes.Unauthenticated, "no verified client certificate")
	}
	if !named {
		return status.Errorf(codes.PermissionDenied, "%s: no role may call this method", method)
	}
	if !slices.Contains(allowed, id.Role) {
		return status.Errorf(codes.PermissionDenied, "%s: role %s (%s) may not call this method; allowed: %s",
			method, id.Role, id.ID, strings.Join(allowed, ", "))
	}
	return nil
}

// ServerOptions are the gRPC server options that enforce the trust: the
// transport credentials and interceptors that check every call against a.
func (t *Trust) ServerOptions(a Access) []grpc.ServerOption {
	return []grpc.ServerOption{
		t.ServerCredentials(),
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
			if err := t.authorize(ctx, a, info.FullMethod); err != nil {
				return nil, err
			}
			return handler(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
			if err := t.authorize(ss.Context(), a, info.FullMethod); err != nil {
				return err
			}
			return handler(srv, ss)
		}),
	}
}
