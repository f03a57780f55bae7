package transport

import (
	"context"
	"errors"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// MaxMessageSize bounds one gRPC message either way: manifests ride in one
// message, blob bytes stream in chunks far below it.
const MaxMessageSize = 64 << 20

// ErrPoolClosed: the pool was closed.
var ErrPoolClosed = errors.New("transport: connection pool closed")

// Pool holds one gRPC connection per member address, dialed lazily with
// the process's credentials, the cluster keepalive, message limits and a
// reconnect backoff capped at 5 s (a restarted node is back in rotation
// within seconds). Nodes and gateways both use it.
type Pool struct {
	opts []grpc.DialOption

	mu    sync.Mutex
	conns map[string]*grpc.ClientConn // nil once closed
}

// NewPool returns a pool dialing with t's credentials. netDial, when set,
// opens the TCP connections (tests put proxies in between); extra options
// come last (interceptors, say).
func (t *Trust) NewPool(netDial func(ctx context.Context, addr string) (net.Conn, error), extra ...grpc.DialOption) *Pool {
	bo := backoff.DefaultConfig
	bo.MaxDelay = 5 * time.Second
	opts := []grpc.DialOption{
		t.DialCredentials(),
		grpc.WithKeepaliveParams(pb.ClientKeepalive),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxMessageSize), grpc.MaxCallSendMsgSize(MaxMessageSize)),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: bo, MinConnectTimeout: 5 * time.Second}),
	}
	if netDial != nil {
		opts = append(opts, grpc.WithContextDialer(netDial))
	}
	return &Pool{opts: append(opts, extra...), conns: map[string]*grpc.ClientConn{}}
}

// Conn returns the connection to addr, creating it on first use.
func (p *Pool) Conn(addr string) (*grpc.ClientConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conns == nil {
		return nil, ErrPoolClosed
	}
	if c, ok := p.conns[addr]; ok {
		return c, nil
	}
	c, err := grpc.NewClient(addr, p.opts...)
	if err != nil {
		return nil, err
	}
	p.conns[addr] = c
	return c, nil
}

// Close closes every connection; later Conn calls fail. Idempotent.
func (p *Pool) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	var errs []error
	for _, c := range p.conns {
		errs = append(errs, c.Close())
	}
	p.conns = nil
	return errors.Join(errs...)
}

// MemberServerOptions are a member gRPC server's options: ServerOptions
// (credentials, role checks) plus the cluster's message limits and
// keepalive enforcement.
func (t *Trust) MemberServerOptions(a Access) []grpc.ServerOption {
	return append(t.ServerOptions(a),
		grpc.MaxRecvMsgSize(MaxMessageSize), grpc.MaxSendMsgSize(MaxMessageSize),
		grpc.KeepaliveEnforcementPolicy(pb.KeepaliveEnforcement))
}
