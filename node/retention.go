package node

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/grpc"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// retentionBatch bounds the items of one ApplyRetention entry.
const retentionBatch = 256

// runRetention applies the retention rules on the leader: it plans from
// the leader's state and, unless dry, commits the plan in batches under
// actor (the admin who asked, or the system for a scheduled run), so the
// audit log names who deleted what. The state machine re-checks every
// item, so a push or pull racing the run keeps its manifest.
func (n *Node) runRetention(ctx context.Context, dry bool, actor *pb.Actor) (*pb.RunRetentionResponse, error) {
	if !n.consensus.IsLeader() {
		return nil, fmt.Errorf("%w: retention runs on the leader", pb.ErrNotLeader)
	}
	began := time.Now()
	plan, err := n.consensus.Store().PlanRetention(ctx, began.UnixNano())
	if err != nil {
		return nil, err
	}
	resp := &pb.RunRetentionResponse{DryRun: dry, Tags: plan.Tags, Manifests: plan.Manifests}
	if dry || len(plan.Tags)+len(plan.Manifests) == 0 {
		return resp, nil
	}
	resp.RunId = newRunID(began)
	entry := func() *pb.ApplyRetention {
		return &pb.ApplyRetention{RunId: resp.RunId, PushedBeforeUnixNano: plan.PushedBeforeUnixNano}
	}
	var batches []*pb.ApplyRetention
	for _, ts := range inBatches(plan.Tags, retentionBatch) {
		c := entry()
		c.Tags = ts
		batches = append(batches, c)
	}
	for _, ms := range inBatches(plan.Manifests, retentionBatch) {
		c := entry()
		c.Manifests = ms
		batches = append(batches, c)
	}
	for _, b := range batches {
		if err := n.consensus.Propose(ctx, &pb.LogEntry{Actor: actor, Command: &pb.LogEntry_ApplyRetention{ApplyRetention: b}}); err != nil {
			return nil, err
		}
	}
	run, err := n.consensus.Store().RetentionRun(ctx)
	if err != nil {
		return nil, err
	}
	if run.GetRunId() == resp.RunId {
		resp.Run = run
	}
	n.logger.Info("retention", "run", resp.RunId, "planned_tags", len(plan.Tags), "planned_manifests", len(plan.Manifests),
		"tags_deleted", resp.Run.GetTagsDeleted(), "manifests_deleted", resp.Run.GetManifestsDeleted())
	return resp, nil
}

// RunRetention applies the retention rules now, on the leader (followers
// forward it, dry runs too, since the leader's state holds every
// acknowledged write).
func (s adminServer) RunRetention(ctx context.Context, req *pb.RunRetentionRequest) (*pb.RunRetentionResponse, error) {
	var resp *pb.RunRetentionResponse
	err := s.n.onLeader(ctx, func(ctx context.Context, cc grpc.ClientConnInterface) error {
		r, err := pb.NewAdminClient(cc).RunRetention(forwardContext(ctx), req)
		if err != nil {
			return fromGRPC(err)
		}
		resp = r
		return nil
	}, func(ctx context.Context) (err error) {
		resp, err = s.n.runRetention(ctx, req.DryRun, pb.ActorFrom(ctx))
		return err
	})
	if r, gerr := answer(adminError(err)); gerr != nil {
		return nil, gerr
	} else if r != nil {
		return &pb.RunRetentionResponse{Result: r}, nil
	}
	return resp, nil
}
