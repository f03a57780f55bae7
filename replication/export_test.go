package replication

import "github.com/opencontainers/go-digest"

// StorageError exposes the backend-to-domain error translation to the
// external tests, which must live in package replication_test to import
// drivertest.
var StorageError = storageError

// BlobFile is where a filesystem store keeps a blob, so tests can damage it.
func (f *Filesystem) BlobFile(dgst digest.Digest) string {
	_, file := f.blobPath(dgst)
	return file
}
