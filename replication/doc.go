// Package replication stores blob bytes in each region and copies them
// between regions.
//
// A blob is an immutable, content-addressed byte stream (an image layer or
// config) named by its digest. Each region keeps its blobs in one object store
// reached through a [Driver]: a directory ([Filesystem]), an S3-compatible
// bucket ([S3]), or, for a directory that only another region's nodes see,
// a node of that region over gRPC ([Remote], served by [BlobStoreServer]).
// [OpenStore] opens a store from its URL (file:///… or s3://…), and
// [OpenRegions] every region's store for a node or a standalone gateway.
// Every driver must pass the conformance suite in the drivertest package.
//
// Drivers are byte storage only. The gateway streams a push into an upload
// (WriteUpload) while hashing it, verifies the digest itself, and then asks
// the driver to commit the upload under that digest (CommitUpload); a driver
// never hashes, never verifies, and never holds a whole blob in memory.
//
// On top of the drivers: [Regions] is the set of stores a process reaches,
// ordered by distance (its own region first, then by observed latency; a
// failing store sorts last), which the gateway uses to pick where an upload
// lands and which copy a read comes from. The [Replicator] of each node
// copies every blob its region should hold but does not (the Wanted list the
// state machine keeps from placements and policies) from the nearest region
// that has it, verifies the digest, and commits the placement through Raft;
// [Owner] spreads that work over a region's nodes by rendezvous hashing.
package replication
