package node

import (
	"context"
	"errors"
	"fmt"
	"net"

	"google.golang.org/grpc"
	"google.golang.org/grpc/peer"

	"github.com/meridian-registry/meridian/node/transport"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// peers keeps one gRPC connection per node address: the process's pool
// (credentials, keepalive, backoff) with calls that never left marked.
type peers struct {
	pool *transport.Pool
}

func newPeers(trust *transport.Trust, dial func(ctx context.Context, addr string) (net.Conn, error)) *peers {
	return &peers{pool: trust.NewPool(dial, grpc.WithUnaryInterceptor(markNotSent))}
}

// conn returns the pooled connection to addr, dialing lazily.
func (p *peers) conn(addr string) (*grpc.ClientConn, error) { return p.pool.Conn(addr) }

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

func (p *peers) close() { p.pool.Close() }

// fromGRPC is pb.FromStatus that keeps the mark of a call no connection
// carried (errNotSent), which makes resending it safe.
func fromGRPC(err error) error {
	d := pb.FromStatus(err)
	if errors.Is(err, errNotSent) && errors.Is(d, pb.ErrUnavailable) {
		return fmt.Errorf("%w: %w", d, errNotSent)
	}
	return d
}
