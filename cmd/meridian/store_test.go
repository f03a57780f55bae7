package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meridian-registry/meridian/replication"
	"github.com/meridian-registry/meridian/replication/s3test"
)

// store init reads the regions from the same config file as the nodes,
// with the credentials from MERIDIAN_REGION_* variables, creates the
// buckets that are missing, and leaves the rest alone; afterwards a node's
// store check accepts every region.
func TestStoreInit(t *testing.T) {
	srv := s3test.Start(t)
	srv.CreateBucket(t, "already-there")
	conf := filepath.Join(t.TempDir(), "meridian.yaml")
	yaml := "regions:\n" +
		"  - name: us-east\n    store: s3://" + srv.Endpoint() + "/new-bucket?secure=false\n" +
		"  - name: eu-west\n    store: s3://" + srv.Endpoint() + "/already-there?secure=false\n"
	if err := os.WriteFile(conf, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, region := range []string{"US_EAST", "EU_WEST"} {
		t.Setenv("MERIDIAN_REGION_"+region+"_ACCESS_KEY", srv.AccessKey())
		t.Setenv("MERIDIAN_REGION_"+region+"_SECRET_KEY", srv.SecretKey())
	}
	for run := 1; run <= 2; run++ {
		if err := storeCmd([]string{"init", "--config", conf, "--timeout", "20s"}); err != nil {
			t.Fatalf("run %d: %v", run, err)
		}
	}
	for _, bucket := range []string{"new-bucket", "already-there"} {
		sc := replication.StoreConfig{Region: "r", URL: "s3://" + srv.Endpoint() + "/" + bucket + "?secure=false",
			AccessKey: srv.AccessKey(), SecretKey: srv.SecretKey()}
		if _, err := replication.OpenStore(t.Context(), sc); err != nil {
			t.Errorf("bucket %s after store init: %v", bucket, err)
		}
	}

	t.Setenv("MERIDIAN_REGION_US_EAST_SECRET_KEY", "not-the-secret-7f3a")
	err := storeCmd([]string{"init", "--config", conf, "--timeout", "2s"})
	if err == nil || !strings.Contains(err.Error(), `region "us-east"`) {
		t.Fatalf("store init with a wrong secret: %v, want an error naming the region", err)
	}
	if strings.Contains(err.Error(), "not-the-secret-7f3a") {
		t.Fatalf("the error shows the secret: %v", err)
	}
}
