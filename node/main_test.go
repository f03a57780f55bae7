package node_test

import (
	"net/http"
	"os"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/meridian-registry/meridian/node/clustertest/admin"
)

// TestMain makes the shared HTTP clients log in: every node and gateway
// these tests start authenticates, with the harness's admin as the first
// user. Tests of authentication itself use clients of their own.
func TestMain(m *testing.M) {
	http.DefaultTransport = admin.Transport(http.DefaultTransport)
	remote.DefaultTransport = admin.Transport(remote.DefaultTransport)
	os.Exit(m.Run())
}
