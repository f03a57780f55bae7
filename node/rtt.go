package node

import (
	"context"
	"time"

	"github.com/meridian-registry/meridian/node/membership"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// pingInterval is how often a node pings every other server over gRPC, so
// that its Vivaldi coordinate (which gateways read from its ping answers)
// reflects the network.
const pingInterval = 2 * time.Second

// pingPeers keeps this node's coordinate current until the node stops.
func (n *Node) pingPeers() {
	defer n.wg.Done()
	t := time.NewTicker(pingInterval)
	defer t.Stop()
	for {
		select {
		case <-n.stop:
			return
		case <-t.C:
		}
		for _, m := range n.membership.Members() {
			if m.ID == n.cfg.NodeID || m.Role != membership.RoleServer || m.State != membership.StateAlive || m.GRPCAddr == "" {
				continue
			}
			cc, err := n.peers.conn(m.GRPCAddr)
			if err != nil {
				continue
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			start := time.Now()
			resp, err := pb.NewGatewayClient(cc).Ping(ctx, &pb.PingRequest{FromId: n.cfg.NodeID, Coordinate: pb.CoordinateToProto(n.rtt.Coordinate())})
			took := time.Since(start)
			cancel()
			if err != nil {
				n.rtt.Failed(m.ID)
				continue
			}
			n.rtt.Observe(m.ID, pb.CoordinateFromProto(resp.Coordinate), took)
		}
	}
}

func (s gatewayServer) Ping(context.Context, *pb.PingRequest) (*pb.PingResponse, error) {
	n := s.n
	applied, _, err := n.consensus.Store().AppliedIndex()
	if err != nil {
		return nil, pb.ToStatus(err)
	}
	return &pb.PingResponse{NodeId: n.cfg.NodeID, Region: n.cfg.Region, Zone: n.cfg.Zone,
		Coordinate: pb.CoordinateToProto(n.rtt.Coordinate()), AppliedIndex: applied}, nil
}

func (s gatewayServer) GetPolicy(ctx context.Context, req *pb.GetPolicyRequest) (*pb.GetPolicyResponse, error) {
	p, err := s.n.metadata(false).Policy(ctx, req.Repository)
	r, gerr := answer(err)
	if gerr != nil {
		return nil, gerr
	}
	return &pb.GetPolicyResponse{Result: r, Regions: p.Regions, MinRegions: int32(p.MinRegions)}, nil
}

func (s gatewayServer) WaitBlobPlaced(ctx context.Context, req *pb.WaitBlobPlacedRequest) (*pb.WaitBlobPlacedResponse, error) {
	// Answer a little before the caller's deadline, so it gets the record
	// rather than a bare timeout.
	wait := ctx
	if dl, ok := ctx.Deadline(); ok {
		var cancel context.CancelFunc
		wait, cancel = context.WithDeadline(ctx, dl.Add(-min(time.Until(dl)/10, 200*time.Millisecond)))
		defer cancel()
	}
	rec, err := s.n.metadata(false).WaitPlaced(wait, req.Digest, int(req.Regions))
	if err != nil && ctx.Err() == nil && wait.Err() != nil {
		return &pb.WaitBlobPlacedResponse{Result: &pb.Result{Code: pb.Code_CODE_UNAVAILABLE,
			Detail: "the blob is not yet in enough regions"}, Blob: rec}, nil
	}
	r, gerr := answer(err)
	if gerr != nil {
		return nil, gerr
	}
	return &pb.WaitBlobPlacedResponse{Result: r, Blob: rec}, nil
}
