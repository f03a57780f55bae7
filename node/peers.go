package node

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// peers keeps one gRPC connection per node address.
type peers struct {
	dial  func(ctx context.Context, addr string) (net.Conn, error)
	mu    sync.Mutex
	conns map[string]*grpc.ClientConn
}

func newPeers(dial func(ctx context.Context, addr string) (net.Conn, error)) *peers {
	return &peers{dial: dial, conns: map[string]*grpc.ClientConn{}}
}

// client returns a Cluster client for addr, dialing lazily.
func (p *peers) client(addr string) (pb.ClusterClient, error) {
	c, err := p.conn(addr)
	if err != nil {
		return nil, err
	}
	return pb.NewClusterClient(c), nil
}

// conn returns the pooled connection to addr, dialing lazily.
func (p *peers) conn(addr string) (*grpc.ClientConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conns == nil {
		return nil, errors.New("node: peer connections closed")
	}
	if c, ok := p.conns[addr]; ok {
		return c, nil
	}
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithKeepaliveParams(pb.ClientKeepalive),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20), grpc.MaxCallSendMsgSize(64<<20)),
		grpc.WithUnaryInterceptor(markNotSent),
	}
	if p.dial != nil {
		opts = append(opts, grpc.WithContextDialer(p.dial))
	}
	c, err := grpc.NewClient(addr, opts...)
	if err != nil {
		return nil, err
	}
	p.conns[addr] = c
	return c, nil
}

// markNotSent marks a call that failed before any connection carried it
// (the peer is down or unreachable; gRPC fills in the peer only once a
// stream exists): the peer did nothing, so even a write may be sent again,
// for instance to the leader elected after this one died.
func markNotSent(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	var p peer.Peer
	err := invoker(ctx, method, req, reply, cc, append(opts, grpc.Peer(&p))...)
	if err != nil && p.Addr == nil {
		return fmt.Errorf("%w: %w", errNotSent, err)
	}
	return err
}

func (p *peers) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

// Between nodes, business outcomes travel in Result messages; gRPC status
// codes carry availability. These two tables are the only translation.
var codeToGRPC = map[pb.Code]codes.Code{
	pb.Code_CODE_UNAVAILABLE: codes.Unavailable,
	pb.Code_CODE_NOT_LEADER:  codes.FailedPrecondition,
}

// grpcError turns a failure that is not a business result into a status.
func grpcError(err error) error {
	if c, ok := codeToGRPC[pb.CodeOf(err)]; ok {
		return status.Error(c, err.Error())
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return status.Error(codes.DeadlineExceeded, err.Error())
	}
	return status.Error(codes.Internal, err.Error())
}

// fromGRPC turns a failed call into a domain error: transport trouble and
// timeouts mean the cluster is unavailable from here.
func fromGRPC(err error) error {
	if err == nil {
		return nil
	}
	s, _ := status.FromError(err)
	switch s.Code() {
	case codes.FailedPrecondition:
		return fmt.Errorf("%w: %s", pb.ErrNotLeader, s.Message())
	case codes.Internal, codes.Unknown:
		return fmt.Errorf("remote: %s", s.Message())
	default:
		if errors.Is(err, errNotSent) {
			return fmt.Errorf("%w: %w: %s", pb.ErrUnavailable, errNotSent, s.Message())
		}
		return fmt.Errorf("%w: %s", pb.ErrUnavailable, s.Message())
	}
}
