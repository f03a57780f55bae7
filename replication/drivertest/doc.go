// Package drivertest is the conformance suite that every replication.Driver
// must pass. A driver's own test calls Run with a constructor:
//
//	func TestConformance(t *testing.T) {
//		drivertest.Run(t, func(t *testing.T) replication.Driver {
//			d, err := replication.NewFilesystem(t.TempDir())
//			if err != nil {
//				t.Fatal(err)
//			}
//			return d
//		})
//	}
//
// Each subtest calls newDriver with its own *testing.T and expects an empty
// store that no other subtest uses (PurgeUploads, for one, sees every upload
// of the store).
package drivertest
