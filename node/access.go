package node

import (
	"google.golang.org/grpc"

	"github.com/meridian-registry/meridian/node/pki"
	"github.com/meridian-registry/meridian/node/transport"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

var (
	nodesOnly       = []string{pki.RoleNode}
	nodesGateways   = []string{pki.RoleNode, pki.RoleGateway}
	nodesAdmins     = []string{pki.RoleNode, pki.RoleAdmin}
	everyMemberRole = []string{pki.RoleNode, pki.RoleGateway, pki.RoleAdmin}
	// adminsOrUsers: admin certificates, nodes forwarding for them, and
	// callers without a certificate that bring an admin user's
	// credentials (checked by adminInterceptor).
	adminsOrUsers   = []string{pki.RoleNode, pki.RoleAdmin, transport.Credentialed}
	adminCertOrUser = []string{pki.RoleAdmin, transport.Credentialed}
)

// service is the Access key that covers every method of sd.
func service(sd grpc.ServiceDesc) string { return "/" + sd.ServiceName + "/" }

// memberAccess says which certificate roles may call which of the node's
// gRPC methods (with cluster TLS on). Each service admits the callers of
// one role; a method admitting others names them, and why, below its
// service. A method missing here is refused to everyone.
var memberAccess = transport.Access{
	// Forwarded writes and read indexes pass between nodes only.
	service(pb.Member_ServiceDesc): nodesOnly,

	// What gateways need: reads, repository writes (which intents:
	// mayCommit), the upload key, the access state, pings. Nodes may call
	// it too; they ping each other.
	service(pb.Gateway_ServiceDesc): nodesGateways,
	// Admins too: it is the state they manage.
	pb.Gateway_GetAccessState_FullMethodName: everyMemberRole,

	// Operator commands: admin certificates, admin users' credentials, and
	// nodes, which forward them to the leader and gather every member's
	// status. Closed to gateways.
	service(pb.Admin_ServiceDesc): adminsOrUsers,
	// Reads open without credentials in plaintext (not in adminMethods):
	// with TLS they need a certificate, as nothing would check credentials.
	pb.Admin_Status_FullMethodName:        nodesAdmins,
	pb.Admin_ClusterStatus_FullMethodName: nodesAdmins,
	pb.Admin_ListPolicies_FullMethodName:  nodesAdmins,
	// No node forwards these (gossip carries a keyring change, the node
	// asked scrubs itself or writes the backup): a node certificate has no
	// business with them.
	pb.Admin_GossipKeyring_FullMethodName: adminCertOrUser,
	pb.Admin_Scrub_FullMethodName:         adminCertOrUser,
	pb.Admin_Backup_FullMethodName:        adminCertOrUser,

	// Deleting stored blobs and purging uploads is for nodes alone (their
	// replicator and purger).
	pb.BlobStore_Stat_FullMethodName:         nodesGateways,
	pb.BlobStore_Open_FullMethodName:         nodesGateways,
	pb.BlobStore_StartUpload_FullMethodName:  nodesGateways,
	pb.BlobStore_WriteUpload_FullMethodName:  nodesGateways,
	pb.BlobStore_UploadSize_FullMethodName:   nodesGateways,
	pb.BlobStore_OpenUpload_FullMethodName:   nodesGateways,
	pb.BlobStore_CommitUpload_FullMethodName: nodesGateways,
	pb.BlobStore_CancelUpload_FullMethodName: nodesGateways,
	pb.BlobStore_Delete_FullMethodName:       nodesOnly,
	pb.BlobStore_PurgeUploads_FullMethodName: nodesOnly,
}
