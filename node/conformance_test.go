package node_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/meridian-registry/meridian/node"
)

// TestOCIConformance runs the official OCI distribution-spec conformance
// suite against a real node. `make test` installs the pinned suite and
// points MERIDIAN_CONFORMANCE at it.
//
// The suite exits 0 on configuration errors and on skips, so the verdict is
// read from its summary and results.yaml: zero failures, zero errors and
// zero skips (a skip means the registry answered "unsupported").
func TestOCIConformance(t *testing.T) {
	bin := os.Getenv("MERIDIAN_CONFORMANCE")
	if bin == "" {
		t.Skip("MERIDIAN_CONFORMANCE is not set; `make test` installs the suite and sets it")
	}
	n := startConformanceNode(t)
	results := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin)
	cmd.Dir = results // the suite reads ./oci-conformance.yaml if present
	cmd.Env = append(os.Environ(),
		"OCI_REGISTRY="+n.HTTPAddr(),
		"OCI_TLS=disabled",
		"OCI_REPO1=conformance/repo1",
		"OCI_REPO2=conformance/repo2",
		"OCI_RESULTS_DIR="+results,
		"OCI_API_BLOBS_UPLOAD_CANCEL=true",
		"OCI_API_MANIFESTS_TAG_PARAM=true",
	)
	out, err := cmd.CombinedOutput()
	report := filepath.Join(results, "report.html")
	if err != nil {
		t.Errorf("conformance suite exited with %v (report: %s)", err, report)
	}
	summary := string(out)
	if i := strings.Index(summary, "OCI Conformance Result:"); i >= 0 {
		summary = summary[i:]
	}
	t.Logf("\n%s", summary)

	yaml, rerr := os.ReadFile(filepath.Join(results, "results.yaml"))
	if rerr != nil {
		t.Fatalf("no results.yaml (configuration error?): %v\n%s", rerr, out)
	}
	if !strings.Contains(string(out), "OCI Conformance Result: Pass") {
		t.Errorf("overall result is not Pass")
	}
	for _, status := range []string{"Skip", "FAIL", "Error"} {
		re := regexp.MustCompile(`(?m)^\s+` + status + `\.+:\s+(\d+)$`)
		m := re.FindStringSubmatch(string(out))
		if m == nil {
			t.Errorf("summary has no %s count", status)
		} else if m[1] != "0" {
			t.Errorf("%s: %s checks", status, m[1])
		}
	}
	bad := regexp.MustCompile(`(?m)^.*: (Skip|FAIL|Error)$`).FindAllString(string(yaml), -1)
	for _, line := range bad {
		t.Errorf("results.yaml: %s", strings.TrimSpace(line))
	}
	if t.Failed() {
		t.Logf("full output:\n%s", out)
	}
}

// startConformanceNode runs a single node on loopback ports in a temporary directory.
func startConformanceNode(t *testing.T) *node.Node {
	t.Helper()
	cfg := node.DefaultConfig()
	cfg.NodeID = "conformance"
	cfg.DataDir = t.TempDir()
	cfg.HTTPAddr = "127.0.0.1:0"
	cfg.RaftAddr = "127.0.0.1:0"
	cfg.GRPCAddr = "127.0.0.1:0"
	cfg.GossipAddr = "127.0.0.1:0"
	cfg.LogLevel = "warn"
	n, err := node.New(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := n.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close(context.Background()) })
	if err := n.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	return n
}
