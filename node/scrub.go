package node

import (
	"context"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
	"github.com/meridian-registry/meridian/replication"
)

// runScrubber re-hashes this node's share of its region's blobs, one pass
// per replication.scrub_interval at scrub_rate, until the node stops.
func (n *Node) runScrubber() {
	defer n.wg.Done()
	interval := n.cfg.Replication.ScrubInterval
	if interval <= 0 {
		return
	}
	select {
	case <-n.stop:
		return
	case <-time.After(min(scrubDelay, interval)):
	}
	ctx, cancel := context.WithCancel(context.Background())
	go func() { <-n.stop; cancel() }()
	n.scrubber.Run(ctx, n.cfg.Region, int64(n.cfg.Replication.ScrubRate), interval)
}

// Scrub runs a pass over every placed copy in the asked regions (all when
// none), through this node's stores, at full speed.
func (s adminServer) Scrub(ctx context.Context, req *pb.ScrubRequest) (*pb.ScrubResponse, error) {
	for _, r := range req.Regions {
		if err := s.n.checkRegion(r); err != nil {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
	}
	if s.n.scrubber == nil {
		return nil, status.Error(codes.Unavailable, "the node is starting")
	}
	if err := s.n.catchUp(ctx); err != nil {
		return nil, pb.ToStatus(err)
	}
	rep, err := s.n.scrubber.Pass(ctx, req.Regions, 0, false)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "scrub stopped after %d copies: %v", rep.Checked, err)
	}
	return scrubResponse(rep), nil
}

func scrubResponse(rep replication.ScrubReport) *pb.ScrubResponse {
	r := &pb.ScrubResponse{Checked: rep.Checked, Bytes: rep.Bytes, Unreadable: rep.Errors,
		StartedUnixNano: rep.Started.UnixNano(), TookNanos: int64(rep.Took)}
	for _, m := range rep.Mismatches {
		r.Mismatches = append(r.Mismatches, &pb.ScrubMismatch{Digest: m.Digest, Region: m.Region, Repaired: m.Repaired, Detail: m.Detail})
	}
	return r
}
