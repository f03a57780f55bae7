package node

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/peer"

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

// fromGRPC is pb.FromStatus that keeps the mark of a call no connection
// carried (errNotSent), which makes resending it safe.
func fromGRPC(err error) error {
	d := pb.FromStatus(err)
	if errors.Is(err, errNotSent) && errors.Is(d, pb.ErrUnavailable) {
		return fmt.Errorf("%w: %w", d, errNotSent)
	}
	return d
}
