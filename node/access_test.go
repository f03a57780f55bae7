package node

import (
	"slices"
	"testing"

	"google.golang.org/grpc"

	"github.com/meridian-registry/meridian/node/transport"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// Every RPC the node serves has a deliberate entry in memberAccess (a
// missing one is refused to all, which would break the cluster the day a
// method is added), and the table names nothing else.
func TestMemberAccessCoversEveryMethod(t *testing.T) {
	served := map[string]bool{}
	for _, sd := range []grpc.ServiceDesc{pb.Cluster_ServiceDesc, pb.BlobStore_ServiceDesc} {
		for _, m := range sd.Methods {
			served["/"+sd.ServiceName+"/"+m.MethodName] = true
		}
		for _, s := range sd.Streams {
			served["/"+sd.ServiceName+"/"+s.StreamName] = true
		}
	}
	for m := range served {
		if roles, ok := memberAccess[m]; !ok || len(roles) == 0 {
			t.Errorf("%s: no roles in memberAccess", m)
		}
	}
	for m := range memberAccess {
		if !served[m] {
			t.Errorf("memberAccess names %s, which the node does not serve", m)
		}
	}
}

// A method open to callers without a certificate must be one whose
// credentials the node checks (adminInterceptor); otherwise it would be
// open to anyone who reaches the port.
func TestCredentialedMethodsAreChecked(t *testing.T) {
	for m, roles := range memberAccess {
		if slices.Contains(roles, transport.Credentialed) && !adminMethods[m] {
			t.Errorf("%s admits callers without a certificate but is not in adminMethods", m)
		}
	}
}
