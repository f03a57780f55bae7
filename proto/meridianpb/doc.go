// Package meridianpb holds the messages every Meridian component shares: the
// Raft log entry, the records kept in the state store, and the error codes
// that travel unchanged from the state machine to the HTTP edge. It also
// holds the gRPC services a node serves, one per caller role: Member
// (member.proto, node to node), Gateway (gateway.proto, gateways' reads and
// writes), Admin (admin.proto, operator commands), whose messages are in
// cluster.proto, access.proto, lifecycle.proto and backup.proto, and
// BlobStore (blobstore.proto, a region's blob store).
//
// meridian.pb.go is generated from meridian.proto by `make proto`; errors.go
// is written by hand.
package meridianpb
