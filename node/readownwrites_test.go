package node_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meridian-registry/meridian/node/clustertest"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// A client that pushes through a follower and lists the repository's tags
// through the same follower right away sees what it pushed. The leader
// answers a write once a quorum has it; the follower learns that it is
// committed only with the leader's next append, so without the follower
// waiting for its own acknowledged writes the list is often stale.
func TestFollowerReadsItsOwnWrites(t *testing.T) {
	c, ctx, _, follower := threeNodes(t)
	client := c.Client()
	const repo = "ryw/app"
	blobs := pushBlobs(t, ctx, c, follower, repo)
	start := time.Now()
	defer func() { t.Logf("30 pushes and lists in %v", time.Since(start)) }()
	for k := range 30 {
		tag := fmt.Sprintf("t%d", k)
		if _, status, err := putManifest(ctx, client, c.URL(follower), repo, tag, manifestBody(blobs, k)); err != nil || status != http.StatusCreated {
			t.Fatalf("PUT %s:%s through follower %d: status %d, %v", repo, tag, follower, status, err)
		}
		tags, err := listTags(ctx, client, c.URL(follower), repo)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Contains(tags, tag) {
			t.Fatalf("push %d: the follower that acknowledged %s:%s lists %v without it", k, repo, tag, tags)
		}
	}
}

// A gateway's read carries min_index, the newest write a node acknowledged
// to it. A replica that has not applied that index must not answer from
// its stale state: it waits, and answers Unavailable (so the gateway asks
// another node) if it cannot catch up in time. The follower here is cut
// off while the tag moves through the leader, so its replica is stale for
// certain; the same read without min_index shows the stale value.
func TestGatewayReadWaitsForMinIndex(t *testing.T) {
	c, ctx, leader, follower := threeNodes(t)
	client := c.Client()
	const repo = "ryw/gw"
	blobs := pushBlobs(t, ctx, c, leader, repo)
	bodyA, bodyB := manifestBody(blobs, 1), manifestBody(blobs, 2)
	for tag, body := range map[string][]byte{"moving": bodyA, "b": bodyB} {
		if _, status, err := putManifest(ctx, client, c.URL(leader), repo, tag, body); err != nil || status != http.StatusCreated {
			t.Fatalf("PUT %s:%s: status %d, %v", repo, tag, status, err)
		}
	}
	if err := c.WaitConverged(ctx); err != nil {
		t.Fatal(err)
	}

	c.Cut(follower)
	resp, err := pb.NewGatewayClient(adminConn(t, c, leader)).Commit(ctx, &pb.CommitRequest{Command: &pb.Command{
		Intent: &pb.Command_PutManifest{PutManifest: &pb.PutManifest{
			Repository: repo, Digest: digestOf(bodyB), MediaType: "application/vnd.oci.image.manifest.v1+json",
			Content: bodyB, Tags: []string{"moving"}}}}})
	if err != nil || resp.GetResult().Err() != nil {
		t.Fatalf("move the tag through the leader: %v, %v", err, resp.GetResult().Err())
	}
	if resp.Index == 0 {
		t.Fatal("the leader's Commit answer carries no log index")
	}
	gw := pb.NewGatewayClient(adminConn(t, c, follower))
	// getTag returns the digest, the business result's error, and the
	// call's own gRPC error.
	getTag := func(ctx context.Context, minIndex uint64) (string, error, error) {
		r, err := gw.GetTag(ctx, &pb.GetTagRequest{Repository: repo, Tag: "moving", MinIndex: minIndex})
		if err != nil {
			return "", nil, err
		}
		return r.Digest, r.GetResult().Err(), nil
	}
	if d, res, err := getTag(ctx, 0); err != nil || res != nil || d != digestOf(bodyA) {
		t.Fatalf("setup: the cut follower answered %q, %v, %v without min_index; want its stale %s", d, res, err, digestOf(bodyA))
	}
	// It can neither apply the index nor catch up with the leader: a gRPC
	// Unavailable, which makes a gateway ask its next node.
	short, cancel := context.WithTimeout(ctx, 20*time.Second)
	asked := time.Now()
	d, res, err := getTag(short, resp.Index)
	took := time.Since(asked)
	cancel()
	if err == nil {
		t.Fatalf("the cut follower answered %q (result %v) to a read at min_index %d it has not applied; want a gRPC Unavailable", d, res, resp.Index)
	}
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("the cut follower's answer at min_index %d after %v: %v; want a gRPC Unavailable", resp.Index, took, err)
	}
	c.Heal(follower)
	if d, res, err := getTag(ctx, resp.Index); err != nil || res != nil || d != digestOf(bodyB) {
		t.Fatalf("after the heal, the follower answered %q, %v, %v at min_index %d; want %s", d, res, err, resp.Index, digestOf(bodyB))
	}
	// A min_index this cluster's log never reached (a gateway that served
	// the cluster before it was restored from a backup) is not waited for
	// forever: after a short wait the node catches up with the leader,
	// which covers every write acknowledged in this cluster.
	start := time.Now()
	if d, res, err := getTag(ctx, resp.Index+1_000_000); err != nil || res != nil || d != digestOf(bodyB) {
		t.Fatalf("at a min_index beyond the log, the follower answered %q, %v, %v; want %s", d, res, err, digestOf(bodyB))
	}
	t.Logf("a read at a min_index beyond the log answered after %v", time.Since(start).Round(time.Millisecond))
}

// threeNodes starts a three-node cluster and returns it with a context
// for the test, its leader and a follower.
func threeNodes(t *testing.T) (c *clustertest.Cluster, ctx context.Context, leader, follower int) {
	t.Helper()
	c = clustertest.New(t, 3)
	ctx = within(t, 2*time.Minute)
	leader, err := c.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return c, ctx, leader, (leader + 1) % 3
}

// listTags is GET /v2/<repo>/tags/list.
func listTags(ctx context.Context, client *http.Client, base, repo string) ([]string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/v2/"+repo+"/tags/list", nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s/tags/list: status %d", repo, resp.StatusCode)
	}
	var list struct {
		Tags []string `json:"tags"`
	}
	return list.Tags, json.NewDecoder(resp.Body).Decode(&list)
}
