package node

import (
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc"

	"github.com/meridian-registry/meridian/node/transport"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// servedServices are the gRPC services a node registers.
var servedServices = []grpc.ServiceDesc{pb.Member_ServiceDesc, pb.Gateway_ServiceDesc, pb.Admin_ServiceDesc, pb.BlobStore_ServiceDesc}

// servedMethods are the full names of every method a node serves.
func servedMethods() []string {
	var methods []string
	for _, sd := range servedServices {
		for _, m := range sd.Methods {
			methods = append(methods, "/"+sd.ServiceName+"/"+m.MethodName)
		}
		for _, s := range sd.Streams {
			methods = append(methods, "/"+sd.ServiceName+"/"+s.StreamName)
		}
	}
	return methods
}

// Every RPC the node serves has a deliberate entry in memberAccess, by
// name or through its service (a missing one is refused to all, which
// would break the cluster the day a method is added), and the table names
// nothing else.
func TestMemberAccessCoversEveryMethod(t *testing.T) {
	served := servedMethods()
	for _, m := range served {
		if roles, ok := memberAccess.Roles(m); !ok || len(roles) == 0 {
			t.Errorf("%s: no roles in memberAccess", m)
		}
	}
	for key := range memberAccess {
		if !slices.ContainsFunc(served, func(m string) bool { return m == key || strings.HasSuffix(key, "/") && strings.HasPrefix(m, key) }) {
			t.Errorf("memberAccess names %s, which the node does not serve", key)
		}
	}
}

// A method open to callers without a certificate must be one whose
// credentials the node checks (adminInterceptor); otherwise it would be
// open to anyone who reaches the port.
func TestCredentialedMethodsAreChecked(t *testing.T) {
	for _, m := range servedMethods() {
		roles, _ := memberAccess.Roles(m)
		if slices.Contains(roles, transport.Credentialed) && !adminMethods[m] {
			t.Errorf("%s admits callers without a certificate but is not in adminMethods", m)
		}
	}
}
