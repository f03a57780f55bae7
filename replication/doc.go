// Package replication stores blob bytes and, later, copies them between
// regions.
//
// A blob is an immutable, content-addressed byte stream (an image layer or
// config) named by its digest. Each region keeps its blobs in one object store
// reached through a [Driver]: a local or shared directory ([Filesystem]) or,
// in later drivers, an S3-compatible bucket or a remote node over gRPC. Every
// driver must pass the conformance suite in the drivertest package.
//
// Drivers are byte storage only. The gateway streams a push into an upload
// (WriteUpload) while hashing it, verifies the digest itself, and then asks
// the driver to commit the upload under that digest (CommitUpload); a driver
// never hashes, never verifies, and never holds a whole blob in memory.
//
// The geo-replication layer will be built on these drivers in this package
// too: placement tracking (which regions hold each blob), the replicator that
// copies blobs missing in its region from the nearest region that has them,
// and the waits that let a push be acknowledged only once N regions hold it.
package replication
