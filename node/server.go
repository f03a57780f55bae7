package node

import (
	"context"
	"errors"
	"fmt"
	"time"

	"google.golang.org/grpc"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// The node's gRPC services, one per caller role (access.go says who may
// call which): memberServer for other nodes, gatewayServer for gateways,
// adminServer for operator commands.
type (
	memberServer struct {
		pb.UnimplementedMemberServer
		n *Node
	}
	gatewayServer struct {
		pb.UnimplementedGatewayServer
		n *Node
	}
	adminServer struct {
		pb.UnimplementedAdminServer
		n *Node
	}
)

// answer splits err into a business Result or a gRPC status.
func answer(err error) (*pb.Result, error) {
	if r, ok := pb.ResultOf(err); ok {
		return r, nil
	}
	return nil, pb.ToStatus(err)
}

// Forward commits a write another node validated and passed on. One hop
// only: a forwarded write that finds no leader here goes back. The leader
// validates what it commits itself.
func (s memberServer) Forward(ctx context.Context, req *pb.CommitRequest) (*pb.CommitResponse, error) {
	actor := s.n.callerActor(ctx, req.Actor)
	ctx = pb.WithActor(ctx, actor)
	var index uint64
	err := s.n.validateCommand(ctx, req.Command)
	if err == nil {
		err = s.n.mayWrite(ctx, req.Command)
	}
	if err == nil {
		index, err = s.n.consensus.Commit(ctx, req.Command, actor)
	}
	r, gerr := answer(err)
	if gerr != nil {
		return nil, gerr
	}
	return &pb.CommitResponse{Result: r, Index: index}, nil
}

func (s memberServer) ReadIndex(ctx context.Context, _ *pb.ReadIndexRequest) (*pb.ReadIndexResponse, error) {
	i, err := s.n.consensus.ReadIndex(ctx)
	if err != nil {
		return nil, pb.ToStatus(err)
	}
	return &pb.ReadIndexResponse{Index: i}, nil
}

// Commit validates a write intent and commits it, through the leader.
// Gateways may send the repository intents only; placements, policies and
// regions come from nodes.
func (s gatewayServer) Commit(ctx context.Context, req *pb.CommitRequest) (*pb.CommitResponse, error) {
	if err := s.n.mayCommit(ctx, req.Command); err != nil {
		return nil, err
	}
	ctx = pb.WithActor(ctx, s.n.callerActor(ctx, req.Actor))
	index, err := s.n.commitIndexed(ctx, req.Command)
	r, gerr := answer(err)
	if gerr != nil {
		return nil, gerr
	}
	return &pb.CommitResponse{Result: r, Index: index}, nil
}

func (s adminServer) Status(context.Context, *pb.StatusRequest) (*pb.NodeStatus, error) {
	return s.n.status(), nil
}

func (s adminServer) ClusterStatus(ctx context.Context, _ *pb.ClusterStatusRequest) (*pb.ClusterStatusResponse, error) {
	return s.n.clusterStatus(ctx), nil
}

func (s adminServer) TransferLeadership(ctx context.Context, req *pb.TransferLeadershipRequest) (*pb.TransferLeadershipResponse, error) {
	before, _ := s.n.consensus.Leader()
	err := s.n.onLeader(ctx, func(ctx context.Context, cc grpc.ClientConnInterface) error {
		resp, err := pb.NewAdminClient(cc).TransferLeadership(ctx, req)
		if err != nil {
			return fromGRPC(err)
		}
		return resp.Result.Err()
	}, func(ctx context.Context) error {
		return s.n.consensus.TransferLeadership(ctx, req.Id)
	})
	r, gerr := answer(adminError(err))
	if gerr != nil {
		return nil, gerr
	}
	resp := &pb.TransferLeadershipResponse{Result: r}
	if err == nil {
		resp.NewLeaderId = s.n.leaderOtherThan(ctx, before)
	}
	return resp, nil
}

// leaderOtherThan waits briefly (bounded by ctx) until this node knows a
// leader other than old and returns it, or whatever it knows then. Right
// after a transfer the old leader has stepped down but learns its successor
// only from the successor's first heartbeat.
func (n *Node) leaderOtherThan(ctx context.Context, old string) string {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		leader, _ := n.consensus.Leader()
		if leader != "" && leader != old {
			return leader
		}
		select {
		case <-ctx.Done():
			return leader
		case <-t.C:
		}
	}
}

func (s adminServer) RemoveServer(ctx context.Context, req *pb.RemoveServerRequest) (*pb.RemoveServerResponse, error) {
	err := s.n.onLeader(ctx, func(ctx context.Context, cc grpc.ClientConnInterface) error {
		resp, err := pb.NewAdminClient(cc).RemoveServer(ctx, req)
		if err != nil {
			return fromGRPC(err)
		}
		return resp.Result.Err()
	}, func(ctx context.Context) error {
		return s.n.consensus.RemoveServer(ctx, req.Id)
	})
	r, gerr := answer(adminError(err))
	if gerr != nil {
		return nil, gerr
	}
	return &pb.RemoveServerResponse{Result: r}, nil
}

// adminError makes refusals of operator commands business results with a
// readable detail, so the CLI can print them.
func adminError(err error) error {
	if err == nil || pb.CodeOf(err) != pb.Code_CODE_UNSPECIFIED {
		return err
	}
	return &pb.Error{Code: pb.Code_CODE_INVALID_ARGUMENT, Detail: err.Error()}
}

func consistency(c pb.Consistency) bool { return c == pb.Consistency_CONSISTENCY_STRONG }

// readAnswer is answer for a gateway's read. A replica that cannot show
// the gateway its own writes answers with a gRPC Unavailable status, not a
// business result, so that the gateway asks its next node instead of
// passing a 503 on.
func readAnswer(err error) (*pb.Result, error) {
	if errors.Is(err, errBehindOwnWrites) {
		return nil, pb.ToStatus(err)
	}
	return answer(err)
}

// gatewayRead is the Metadata a gateway's read is served from: the
// requested consistency, after the replica has applied minIndex.
func (s gatewayServer) gatewayRead(c pb.Consistency, minIndex uint64) clusterMetadata {
	m := s.n.metadata(consistency(c))
	m.minIndex = minIndex
	return m
}

func (s gatewayServer) GetManifest(ctx context.Context, req *pb.GetManifestRequest) (*pb.GetManifestResponse, error) {
	md := s.gatewayRead(req.Consistency, req.MinIndex)
	dgst, err := req.Digest, error(nil)
	byTag := req.Tag != "" && dgst == ""
	if byTag {
		dgst, err = md.Tag(ctx, req.Repository, req.Tag)
	}
	var m *pb.ManifestRecord
	if err == nil {
		m, err = md.Manifest(ctx, req.Repository, dgst)
	}
	r, gerr := readAnswer(err)
	if gerr != nil {
		return nil, gerr
	}
	return &pb.GetManifestResponse{Result: r, Manifest: m, TagResolved: byTag}, nil
}

func (s gatewayServer) GetTag(ctx context.Context, req *pb.GetTagRequest) (*pb.GetTagResponse, error) {
	d, err := s.gatewayRead(req.Consistency, req.MinIndex).Tag(ctx, req.Repository, req.Tag)
	r, gerr := readAnswer(err)
	if gerr != nil {
		return nil, gerr
	}
	return &pb.GetTagResponse{Result: r, Digest: d}, nil
}

func (s gatewayServer) ListTags(ctx context.Context, req *pb.ListRequest) (*pb.ListResponse, error) {
	items, err := s.gatewayRead(req.Consistency, req.MinIndex).Tags(ctx, req.Repository, req.After, int(req.Limit))
	r, gerr := readAnswer(err)
	if gerr != nil {
		return nil, gerr
	}
	return &pb.ListResponse{Result: r, Items: items}, nil
}

func (s gatewayServer) ListRepositories(ctx context.Context, req *pb.ListRequest) (*pb.ListResponse, error) {
	items, err := s.gatewayRead(req.Consistency, req.MinIndex).Repositories(ctx, req.After, int(req.Limit))
	r, gerr := readAnswer(err)
	if gerr != nil {
		return nil, gerr
	}
	return &pb.ListResponse{Result: r, Items: items}, nil
}

func (s gatewayServer) ListReferrers(ctx context.Context, req *pb.ListReferrersRequest) (*pb.ListReferrersResponse, error) {
	refs, err := s.gatewayRead(req.Consistency, req.MinIndex).Referrers(ctx, req.Repository, req.Subject)
	r, gerr := readAnswer(err)
	if gerr != nil {
		return nil, gerr
	}
	return &pb.ListReferrersResponse{Result: r, Referrers: refs}, nil
}

func (s gatewayServer) GetLinkedBlob(ctx context.Context, req *pb.GetLinkedBlobRequest) (*pb.GetLinkedBlobResponse, error) {
	b, err := s.gatewayRead(req.Consistency, req.MinIndex).LinkedBlob(ctx, req.Repository, req.Digest)
	r, gerr := readAnswer(err)
	if gerr != nil {
		return nil, gerr
	}
	return &pb.GetLinkedBlobResponse{Result: r, Blob: b}, nil
}

func (s gatewayServer) GetUploadKey(ctx context.Context, _ *pb.GetUploadKeyRequest) (*pb.GetUploadKeyResponse, error) {
	keys, err := s.n.metadata(false).UploadKeys(ctx)
	if err != nil {
		return nil, pb.ToStatus(err)
	}
	if len(keys) == 0 {
		return nil, pb.ToStatus(fmt.Errorf("%w: upload key not installed yet", pb.ErrUnavailable))
	}
	return &pb.GetUploadKeyResponse{Key: keys[len(keys)-1].Key, Keys: keys}, nil
}
