package node

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/meridian-registry/meridian/consensus"
	"github.com/meridian-registry/meridian/node/membership"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"
)

// Version is reported in status; cmd sets it from the build.
var Version = "dev"

// status describes this node.
func (n *Node) status() *pb.NodeStatus {
	st := n.consensus.Stats()
	leader, _ := n.consensus.Leader()
	s := &pb.NodeStatus{
		Id: n.cfg.NodeID, ClusterId: n.cfg.ClusterID, Region: n.cfg.Region, Zone: n.cfg.Zone,
		RaftState: strings.ToLower(st.State), Suffrage: "none", LeaderId: leader, Term: st.Term,
		CommitIndex: st.CommitIndex, AppliedIndex: st.AppliedIndex, LastLogIndex: st.LastLogIndex,
		RaftAddr: n.consensus.Addr(), GrpcAddr: n.GRPCAddr(), HttpAddr: n.advertisedHTTP(),
		Version: Version, UptimeSeconds: int64(time.Since(n.started).Seconds()),
		LogVersion: consensus.LogVersion,
	}
	if servers, err := n.consensus.Servers(); err == nil {
		s.Suffrage = suffrageOf(servers, n.cfg.NodeID)
	}
	if sum, index, err := n.consensus.Store().Digest(); err == nil {
		s.StateDigest, s.StateDigestIndex = sum, index
	}
	if last := n.scrubber.Last(); !last.Started.IsZero() {
		s.LastScrub = scrubResponse(last)
	}
	return s
}

func suffrageOf(servers []consensus.Server, id string) string {
	for _, s := range servers {
		if s.ID == id {
			if s.Voter {
				return "voter"
			}
			return "nonvoter"
		}
	}
	return "none"
}

// clusterStatus asks every known member for its status, in parallel.
func (n *Node) clusterStatus(ctx context.Context) *pb.ClusterStatusResponse {
	leader, _ := n.consensus.Leader()
	resp := &pb.ClusterStatusResponse{ClusterId: n.cfg.ClusterID, LeaderId: leader, AnsweredBy: n.cfg.NodeID}
	servers, _ := n.consensus.Servers()

	members := map[string]membership.Member{}
	for _, m := range n.membership.Members() {
		members[m.ID] = m
	}
	ids := map[string]bool{}
	for _, s := range servers {
		ids[s.ID] = true
	}
	for id := range members {
		ids[id] = true
	}
	out := make([]*pb.MemberStatus, 0, len(ids))
	var wg sync.WaitGroup
	var mu sync.Mutex
	for _, id := range sortedKeys(ids) {
		ms := &pb.MemberStatus{Id: id, Suffrage: suffrageOf(servers, id), Health: "unknown", Role: string(membership.RoleServer)}
		m, gossiped := members[id]
		if gossiped {
			ms.Region, ms.Zone, ms.Role, ms.Health = m.Region, m.Zone, string(m.Role), m.State.String()
		}
		out = append(out, ms)
		if id == n.cfg.NodeID {
			ms.Status = n.status()
			continue
		}
		if gossiped && m.Role == membership.RoleGateway && m.State == membership.StateAlive && m.HTTPAddr != "" {
			wg.Add(1)
			go func() {
				defer wg.Done()
				gs, err := gatewayStatus(ctx, m.HTTPAddr)
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					ms.Error = err.Error()
				}
				ms.Gateway = gs
			}()
			continue
		}
		if !gossiped || m.Role != membership.RoleServer || m.State != membership.StateAlive {
			ms.Error = "not reachable through gossip"
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			defer cancel()
			err := n.callPeer(cctx, id, func(ctx context.Context, cc grpc.ClientConnInterface) error {
				st, err := pb.NewAdminClient(cc).Status(ctx, &pb.StatusRequest{})
				if err == nil {
					mu.Lock()
					ms.Status = st
					mu.Unlock()
				}
				return fromGRPC(err)
			})
			if err != nil {
				mu.Lock()
				ms.Error = err.Error()
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	for _, ms := range out {
		if ms.Id == leader && ms.Status != nil {
			resp.LeaderCommitIndex = ms.Status.CommitIndex
		}
	}
	resp.Members = out
	resp.Regions = n.regionLags(ctx)
	return resp
}

// gatewayStatus asks a standalone gateway which nodes it routes to.
func gatewayStatus(ctx context.Context, httpAddr string) (*pb.GatewayStatus, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+httpAddr+"/status", nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("gateway status: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("gateway status: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("gateway status: HTTP %d", resp.StatusCode)
	}
	gs := &pb.GatewayStatus{}
	if err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(body, gs); err != nil {
		return nil, fmt.Errorf("gateway status: %w", err)
	}
	return gs, nil
}
