// Package s3test runs a real S3 server for tests: versitygw (the Versity S3
// Gateway, Apache-2.0) serving a temporary directory, started as a child
// process on a loopback port. There is no mock: drivers are tested against
// the same wire protocol, signatures, multipart and conditional-write rules
// that they meet in production.
//
// The binary is found through $MERIDIAN_VERSITYGW, then
// <module root>/bin/tools/versitygw (where `make test` installs it), then
// $PATH. Without it the calling test is skipped, unless MERIDIAN_REQUIRE_S3=1,
// which turns the skip into a failure (CI sets it so that S3 coverage cannot
// silently disappear). MERIDIAN_S3_SERVER=minio runs MinIO instead
// ($MERIDIAN_MINIO, bin/tools/minio, $PATH; `make test-minio` installs it
// and runs the S3 and geo-replication tests against it).
//
// FaultProxy sits between a client and a server and fails, stalls or cuts
// requests on demand, to test what a driver does when its store is down.
package s3test
