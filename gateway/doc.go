// Package gateway serves the OCI Distribution API (v1.1) over HTTP.
//
// The gateway holds no state of its own: metadata reads and writes go to a
// Metadata implementation (a node's state store and Raft proposals, in
// process or over gRPC), blob bytes go to a region's replication.Driver, and
// the state of an upload session travels in a signed token inside the
// session's Location URL, so any gateway can continue any upload.
//
// Routing parses paths from the right end (…/manifests/<ref>,
// …/blobs/uploads/<token>, …/blobs/<digest>, …/tags/list,
// …/referrers/<digest>) because repository names have any number of
// components and may themselves contain "blobs" or "manifests". Handlers
// return errors; one writer turns them into the spec's error envelope.
package gateway
