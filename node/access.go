package node

import (
	"github.com/meridian-registry/meridian/node/pki"
	"github.com/meridian-registry/meridian/node/transport"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

var (
	nodesOnly       = []string{pki.RoleNode}
	nodesGateways   = []string{pki.RoleNode, pki.RoleGateway}
	nodesAdmins     = []string{pki.RoleNode, pki.RoleAdmin}
	adminsOnly      = []string{pki.RoleAdmin}
	everyMemberRole = []string{pki.RoleNode, pki.RoleGateway, pki.RoleAdmin}
	// adminsOrUsers: admin certificates, nodes forwarding for them, and
	// callers without a certificate that bring an admin user's
	// credentials (checked by adminInterceptor).
	adminsOrUsers   = []string{pki.RoleNode, pki.RoleAdmin, transport.Credentialed}
	adminCertOrUser = []string{pki.RoleAdmin, transport.Credentialed}
)

// memberAccess says which certificate roles may call which of the node's
// gRPC methods (with cluster TLS on). Nodes may call what they forward to
// the leader on behalf of a caller whose role the first node checked.
// Admin operations are closed to gateways; deleting stored blobs and
// purging uploads is for nodes alone (their replicator and purger). A
// method missing here is refused to everyone.
var memberAccess = transport.Access{
	pb.Cluster_Commit_FullMethodName:             nodesGateways, // which intents: mayCommit
	pb.Cluster_ReadIndex_FullMethodName:          nodesGateways,
	pb.Cluster_Status_FullMethodName:             everyMemberRole,
	pb.Cluster_ClusterStatus_FullMethodName:      nodesAdmins,
	pb.Cluster_TransferLeadership_FullMethodName: adminsOrUsers,
	pb.Cluster_RemoveServer_FullMethodName:       adminsOrUsers,
	pb.Cluster_GossipKeyring_FullMethodName:      adminCertOrUser,
	pb.Cluster_Scrub_FullMethodName:              adminCertOrUser,
	pb.Cluster_ListPolicies_FullMethodName:       nodesAdmins,
	pb.Cluster_SetPolicy_FullMethodName:          adminsOrUsers,
	pb.Cluster_DeletePolicy_FullMethodName:       adminsOrUsers,
	pb.Cluster_GetManifest_FullMethodName:        nodesGateways,
	pb.Cluster_GetTag_FullMethodName:             nodesGateways,
	pb.Cluster_ListTags_FullMethodName:           nodesGateways,
	pb.Cluster_ListRepositories_FullMethodName:   nodesGateways,
	pb.Cluster_ListReferrers_FullMethodName:      nodesGateways,
	pb.Cluster_GetLinkedBlob_FullMethodName:      nodesGateways,
	pb.Cluster_GetUploadKey_FullMethodName:       nodesGateways,
	pb.Cluster_GetPolicy_FullMethodName:          nodesGateways,
	pb.Cluster_WaitBlobPlaced_FullMethodName:     nodesGateways,
	pb.Cluster_Ping_FullMethodName:               everyMemberRole,
	pb.Cluster_ManageAccess_FullMethodName:       adminsOrUsers,
	pb.Cluster_ListAccess_FullMethodName:         adminsOrUsers,
	pb.Cluster_ReadAudit_FullMethodName:          adminsOrUsers,
	pb.Cluster_GetAccessState_FullMethodName:     everyMemberRole,

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
