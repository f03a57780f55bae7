package replication

// StorageError exposes the backend-to-domain error translation to the
// external tests, which must live in package replication_test to import
// drivertest.
var StorageError = storageError
