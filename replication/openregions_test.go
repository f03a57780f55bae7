package replication_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc"

	"github.com/meridian-registry/meridian/replication"
)

// TestOpenRegions: a node opens its own directory (creating it) and reaches
// other regions' directories through their nodes; a standalone gateway
// reaches every directory through nodes; S3 opens directly, and a store down
// at start is kept with a warning rather than failing the start.
func TestOpenRegions(t *testing.T) {
	ctx := t.Context()
	// A port nothing listens on: the S3 check fails as unreachable.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	downAddr := ln.Addr().String()
	ln.Close()

	base := t.TempDir()
	stores := []replication.StoreConfig{
		{Region: "eu", URL: "file://" + filepath.Join(base, "eu", "blobs")},
		{Region: "us", URL: "file://" + filepath.Join(base, "us")},
		{Region: "ap", URL: "s3://AK:SK@" + downAddr + "/blobs?secure=false"},
	}
	var remoteAsked []string
	remote := func(region string) func(context.Context) (grpc.ClientConnInterface, error) {
		remoteAsked = append(remoteAsked, region)
		return func(context.Context) (grpc.ClientConnInterface, error) {
			return nil, errors.New("no nodes in this test")
		}
	}
	var logs bytes.Buffer
	logger := slog.New(slog.NewTextHandler(&logs, nil))

	check := func(r *replication.Regions, region string, want string) {
		t.Helper()
		d, ok := r.Driver(region)
		if !ok {
			t.Fatalf("region %s missing", region)
		}
		var got string
		switch d.(type) {
		case *replication.Filesystem:
			got = "filesystem"
		case *replication.Remote:
			got = "remote"
		case *replication.S3:
			got = "s3"
		}
		if got != want {
			t.Errorf("region %s: driver %T, want %s", region, d, want)
		}
	}

	t.Run("node", func(t *testing.T) {
		remoteAsked = nil
		logs.Reset()
		r, err := replication.OpenRegions(ctx, replication.OpenRegionsConfig{
			Local: "eu", Stores: stores, OwnDirectory: true, Remote: remote, Logger: logger,
		})
		if err != nil {
			t.Fatal(err)
		}
		if r.Local() != "eu" {
			t.Errorf("Local() = %q", r.Local())
		}
		check(r, "eu", "filesystem")
		check(r, "us", "remote")
		check(r, "ap", "s3")
		if fi, err := os.Stat(filepath.Join(base, "eu", "blobs")); err != nil || fi.Mode().Perm() != 0o700 {
			t.Errorf("own directory: %v, %v; want it created 0700", fi, err)
		}
		if _, err := os.Stat(filepath.Join(base, "us")); !os.IsNotExist(err) {
			t.Errorf("another region's directory was touched: %v", err)
		}
		if strings.Join(remoteAsked, ",") != "us" {
			t.Errorf("remote asked for %v, want [us]", remoteAsked)
		}
		if !strings.Contains(logs.String(), "unreachable") || !strings.Contains(logs.String(), "region=ap") {
			t.Errorf("no warning for the unreachable store: %q", logs.String())
		}
	})

	t.Run("gateway", func(t *testing.T) {
		remoteAsked = nil
		r, err := replication.OpenRegions(ctx, replication.OpenRegionsConfig{
			Local: "us", Stores: stores, Remote: remote, Logger: logger,
		})
		if err != nil {
			t.Fatal(err)
		}
		check(r, "eu", "remote")
		check(r, "us", "remote")
		check(r, "ap", "s3")
		if strings.Join(remoteAsked, ",") != "eu,us" {
			t.Errorf("remote asked for %v, want [eu us]", remoteAsked)
		}
	})

	t.Run("errors", func(t *testing.T) {
		// A bad store is an error naming the region, not a warning.
		_, err := replication.OpenRegions(ctx, replication.OpenRegionsConfig{
			Local: "eu", Stores: []replication.StoreConfig{{Region: "sa", URL: "s3://" + downAddr + "/blobs?secure=false"}},
			Remote: remote, Logger: logger,
		})
		if err == nil || !strings.Contains(err.Error(), "region sa store") {
			t.Errorf("store without credentials: %v, want an error naming the region", err)
		}
		// The own directory that cannot be created.
		file := filepath.Join(base, "file")
		if err := os.WriteFile(file, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		_, err = replication.OpenRegions(ctx, replication.OpenRegionsConfig{
			Local: "eu", Stores: []replication.StoreConfig{{Region: "eu", URL: "file://" + filepath.Join(file, "blobs")}},
			OwnDirectory: true, Remote: remote, Logger: logger,
		})
		if err == nil || !strings.Contains(err.Error(), "region eu store") {
			t.Errorf("own directory under a file: %v, want an error naming the region", err)
		}
	})
}
