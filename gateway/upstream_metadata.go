package gateway

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// upstreamMetadata is Metadata over the nodes' Gateway gRPC service:
//
//   - reads go to the nearest healthy node; a transport failure (node
//     unreachable, connection broken, attempt timed out) takes the node out
//     of rotation and the read goes to the next node, within the request's
//     context. A business Result is the answer, never retried;
//   - writes go to the nearest healthy node, which forwards them to the
//     leader. One is sent again to another node only when that cannot apply
//     it twice: no connection carried it, or the entry is idempotent (see
//     idempotent). Otherwise a failure after sending is a 503;
//   - business Results become *pb.Error values, as in process.
type upstreamMetadata struct{ u *Upstream }

var _ Metadata = upstreamMetadata{}

// Metadata returns the cluster's Metadata as reached through this Upstream.
func (u *Upstream) Metadata() Metadata { return upstreamMetadata{u} }

// writeRetryWindow bounds waiting for a leader when the request carries no
// deadline (the node asked has already waited its apply timeout).
const writeRetryWindow = 10 * time.Second

// errNoNodes means gossip lists no live server node. It is wrapped with
// pb.ErrUnavailable where returned; test for it with errors.Is.
var errNoNodes = errors.New("no live server node known")

func noNodes() error { return fmt.Errorf("%w: %w", pb.ErrUnavailable, errNoNodes) }

func (m upstreamMetadata) consistency() pb.Consistency {
	if m.u.strong {
		return pb.Consistency_CONSISTENCY_STRONG
	}
	return pb.Consistency_CONSISTENCY_LOCAL
}

// rpc is one call of a read: the value, the business result, or the call's
// own (gRPC) error.
type rpc[T any] func(ctx context.Context, c pb.GatewayClient, opts ...grpc.CallOption) (T, *pb.Result, error)

// callPolicy says how one kind of read is attempted.
type callPolicy struct {
	// timeout bounds each attempt; zero means only the request's context.
	timeout time.Duration
	// answersUnavailable: the method answers codes.Unavailable itself
	// (GetUploadKey before the key is installed), so that status from a
	// node that was reached is its answer, not a transport failure.
	answersUnavailable bool
}

// read runs fn against the nodes nearest first, moving on while calls fail
// in transport.
func read[T any](ctx context.Context, u *Upstream, pol callPolicy, fn rpc[T]) (T, error) {
	var zero T
	nodes := u.Nodes()
	if len(nodes) == 0 {
		return zero, noNodes()
	}
	var last error
	for i, n := range nodes {
		if i > 0 {
			u.metrics.failovers.Inc()
		}
		conn, err := u.dial(n.Addr)
		if err != nil {
			u.fail(n.ID, err)
			last = fmt.Errorf("%w: dial %s: %v", pb.ErrUnavailable, n.ID, err)
			continue
		}
		actx, cancel := ctx, context.CancelFunc(func() {})
		if pol.timeout > 0 {
			actx, cancel = context.WithTimeout(ctx, pol.timeout)
		}
		var p peer.Peer
		v, res, err := fn(actx, pb.NewGatewayClient(conn), grpc.Peer(&p))
		cancel()
		if err == nil {
			return v, res.Err()
		}
		if ctx.Err() != nil {
			return zero, fmt.Errorf("%w: %w", pb.ErrUnavailable, ctx.Err())
		}
		if !transportFailure(err) || (pol.answersUnavailable && status.Code(err) == codes.Unavailable && p.Addr != nil) {
			return zero, pb.FromStatus(err)
		}
		u.fail(n.ID, err)
		last = pb.FromStatus(err)
	}
	return zero, last
}

// transportFailure reports a call that failed without a node's answer: no
// connection, a broken one, or an attempt that ran out of time (the caller
// checks that the request's own context is still alive).
func transportFailure(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled:
		return true
	}
	return false
}

func (m upstreamMetadata) reads() callPolicy { return callPolicy{timeout: m.u.cfg.CallTimeout} }

// Manifest reads a manifest by digest; concurrent reads of the same one
// share a round trip (see coalescer).
func (m upstreamMetadata) Manifest(ctx context.Context, repo, digest string) (*pb.ManifestRecord, error) {
	return m.u.manifests.do(ctx, "d\x00"+repo+"\x00"+digest, func(ctx context.Context) (*pb.ManifestRecord, error) {
		return m.manifest(ctx, repo, digest)
	})
}

func (m upstreamMetadata) manifest(ctx context.Context, repo, digest string) (*pb.ManifestRecord, error) {
	return read(ctx, m.u, m.reads(), func(ctx context.Context, c pb.GatewayClient, opts ...grpc.CallOption) (*pb.ManifestRecord, *pb.Result, error) {
		resp, err := c.GetManifest(ctx, &pb.GetManifestRequest{Repository: repo, Digest: digest, Consistency: m.consistency(), MinIndex: m.u.written.Load()}, opts...)
		return resp.GetManifest(), resp.GetResult(), err
	})
}

// ManifestByTag reads the manifest tag points at in one round trip to one
// node (same consistency as Tag then Manifest). A node too old to know
// the request's tag field says so by not setting TagResolved; then the
// two calls are made. Concurrent reads of the same tag share a round trip
// (see coalescer).
func (m upstreamMetadata) ManifestByTag(ctx context.Context, repo, tag string) (*pb.ManifestRecord, error) {
	return m.u.manifests.do(ctx, "t\x00"+repo+"\x00"+tag, func(ctx context.Context) (*pb.ManifestRecord, error) {
		return m.manifestByTag(ctx, repo, tag)
	})
}

func (m upstreamMetadata) manifestByTag(ctx context.Context, repo, tag string) (*pb.ManifestRecord, error) {
	type answer struct {
		rec      *pb.ManifestRecord
		resolved bool
	}
	a, err := read(ctx, m.u, m.reads(), func(ctx context.Context, c pb.GatewayClient, opts ...grpc.CallOption) (answer, *pb.Result, error) {
		resp, err := c.GetManifest(ctx, &pb.GetManifestRequest{Repository: repo, Tag: tag, Consistency: m.consistency(), MinIndex: m.u.written.Load()}, opts...)
		return answer{resp.GetManifest(), resp.GetTagResolved()}, resp.GetResult(), err
	})
	if err == nil && !a.resolved || err != nil && !a.resolved && pb.CodeOf(err) == pb.Code_CODE_MANIFEST_UNKNOWN {
		d, err := m.Tag(ctx, repo, tag)
		if err != nil {
			return nil, err
		}
		return m.manifest(ctx, repo, d)
	}
	return a.rec, err
}

func (m upstreamMetadata) Tag(ctx context.Context, repo, tag string) (string, error) {
	return read(ctx, m.u, m.reads(), func(ctx context.Context, c pb.GatewayClient, opts ...grpc.CallOption) (string, *pb.Result, error) {
		resp, err := c.GetTag(ctx, &pb.GetTagRequest{Repository: repo, Tag: tag, Consistency: m.consistency(), MinIndex: m.u.written.Load()}, opts...)
		return resp.GetDigest(), resp.GetResult(), err
	})
}

func (m upstreamMetadata) Tags(ctx context.Context, repo, after string, limit int) ([]string, error) {
	return read(ctx, m.u, m.reads(), func(ctx context.Context, c pb.GatewayClient, opts ...grpc.CallOption) ([]string, *pb.Result, error) {
		resp, err := c.ListTags(ctx, &pb.ListRequest{Repository: repo, After: after, Limit: limit32(limit), Consistency: m.consistency(), MinIndex: m.u.written.Load()}, opts...)
		return resp.GetItems(), resp.GetResult(), err
	})
}

func (m upstreamMetadata) Repositories(ctx context.Context, after string, limit int) ([]string, error) {
	return read(ctx, m.u, m.reads(), func(ctx context.Context, c pb.GatewayClient, opts ...grpc.CallOption) ([]string, *pb.Result, error) {
		resp, err := c.ListRepositories(ctx, &pb.ListRequest{After: after, Limit: limit32(limit), Consistency: m.consistency(), MinIndex: m.u.written.Load()}, opts...)
		return resp.GetItems(), resp.GetResult(), err
	})
}

func (m upstreamMetadata) Referrers(ctx context.Context, repo, subject string) ([]*pb.Referrer, error) {
	return read(ctx, m.u, m.reads(), func(ctx context.Context, c pb.GatewayClient, opts ...grpc.CallOption) ([]*pb.Referrer, *pb.Result, error) {
		resp, err := c.ListReferrers(ctx, &pb.ListReferrersRequest{Repository: repo, Subject: subject, Consistency: m.consistency(), MinIndex: m.u.written.Load()}, opts...)
		return resp.GetReferrers(), resp.GetResult(), err
	})
}

func (m upstreamMetadata) LinkedBlob(ctx context.Context, repo, digest string) (*pb.BlobRecord, error) {
	return read(ctx, m.u, m.reads(), func(ctx context.Context, c pb.GatewayClient, opts ...grpc.CallOption) (*pb.BlobRecord, *pb.Result, error) {
		resp, err := c.GetLinkedBlob(ctx, &pb.GetLinkedBlobRequest{Repository: repo, Digest: digest, Consistency: m.consistency(), MinIndex: m.u.written.Load()}, opts...)
		return resp.GetBlob(), resp.GetResult(), err
	})
}

func (m upstreamMetadata) Policy(ctx context.Context, repo string) (pb.EffectivePolicy, error) {
	return read(ctx, m.u, m.reads(), func(ctx context.Context, c pb.GatewayClient, opts ...grpc.CallOption) (pb.EffectivePolicy, *pb.Result, error) {
		resp, err := c.GetPolicy(ctx, &pb.GetPolicyRequest{Repository: repo}, opts...)
		return pb.EffectivePolicy{Regions: resp.GetRegions(), MinRegions: int(resp.GetMinRegions())}, resp.GetResult(), err
	})
}

// WaitPlaced waits on one node at a time, bounded by ctx only: the node
// answers shortly before ctx's deadline with the record as it stands.
func (m upstreamMetadata) WaitPlaced(ctx context.Context, digest string, regions int) (*pb.BlobRecord, error) {
	return read(ctx, m.u, callPolicy{}, func(ctx context.Context, c pb.GatewayClient, opts ...grpc.CallOption) (*pb.BlobRecord, *pb.Result, error) {
		resp, err := c.WaitBlobPlaced(ctx, &pb.WaitBlobPlacedRequest{Digest: digest, Regions: limit32(regions)}, opts...)
		return resp.GetBlob(), resp.GetResult(), err
	})
}

// WriteFence is the newest applied index a node reported in a ping.
func (m upstreamMetadata) WriteFence(context.Context) (uint64, error) {
	return m.u.applied.Load(), nil
}

func (m upstreamMetadata) UploadKeys(ctx context.Context) ([]*pb.UploadKey, error) {
	pol := m.reads()
	pol.answersUnavailable = true
	return read(ctx, m.u, pol, func(ctx context.Context, c pb.GatewayClient, opts ...grpc.CallOption) ([]*pb.UploadKey, *pb.Result, error) {
		resp, err := c.GetUploadKey(ctx, &pb.GetUploadKeyRequest{}, opts...)
		if err == nil && len(resp.Keys) == 0 && len(resp.Key) > 0 {
			// A node from before the ring: its one key is the ring's first.
			return []*pb.UploadKey{{Id: 0, Key: resp.Key}}, nil, nil
		}
		return resp.GetKeys(), nil, err
	})
}

// raise sets *v to at least x.
func raise(v *atomic.Uint64, x uint64) {
	for old := v.Load(); x > old && !v.CompareAndSwap(old, x); {
		old = v.Load()
	}
}

func limit32(n int) int32 { return int32(min(max(n, 0), math.MaxInt32)) }

// Commit asks the nearest healthy node to validate and commit cmd. While
// the cluster has no leader (NOT_LEADER: nothing was done) it asks again
// after a short jittered wait, until ctx ends.
func (m upstreamMetadata) Commit(ctx context.Context, cmd *pb.Command) error {
	req := &pb.CommitRequest{Command: cmd, Actor: pb.ActorFrom(ctx)}
	resend := idempotent(cmd)
	start := time.Now()
	_, bounded := ctx.Deadline()
	for attempt := 0; ; attempt++ {
		err := m.u.commit(ctx, req, resend)
		if !errors.Is(err, pb.ErrNotLeader) && !errors.Is(err, errNoNodes) {
			return err
		}
		wait := time.Duration(10+rand.IntN(40)) * time.Millisecond << min(attempt, 2)
		if !bounded && time.Since(start)+wait > writeRetryWindow {
			return fmt.Errorf("%w: %v", pb.ErrUnavailable, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: %w (last: %v)", pb.ErrUnavailable, ctx.Err(), err)
		case <-time.After(wait):
		}
	}
}

// commit sends req to the nodes nearest first, moving on after a
// transport failure only when the command cannot have been applied (no
// connection carried it: gRPC fills in the peer only once a stream
// exists) or applying it twice is harmless.
func (u *Upstream) commit(ctx context.Context, req *pb.CommitRequest, resend bool) error {
	nodes := u.Nodes()
	if len(nodes) == 0 {
		return noNodes()
	}
	var last error
	for i, n := range nodes {
		if i > 0 {
			u.metrics.failovers.Inc()
		}
		conn, err := u.dial(n.Addr)
		if err != nil {
			u.fail(n.ID, err)
			last = fmt.Errorf("%w: dial %s: %v", pb.ErrUnavailable, n.ID, err)
			continue
		}
		var p peer.Peer
		resp, err := pb.NewGatewayClient(conn).Commit(ctx, req, grpc.Peer(&p))
		if err == nil {
			raise(&u.written, resp.GetIndex())
			return resp.GetResult().Err()
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%w: %w", pb.ErrUnavailable, ctx.Err())
		}
		if !transportFailure(err) {
			return pb.FromStatus(err)
		}
		u.fail(n.ID, err)
		if p.Addr != nil && !resend {
			return fmt.Errorf("%w: node %s failed after the write may have reached it, so it is not sent again: %s",
				pb.ErrUnavailable, n.ID, status.Convert(err).Message())
		}
		last = pb.FromStatus(err)
	}
	return last
}

// idempotent reports commands that may be applied twice with the effect
// of once, and so may be resent after a node failed mid-call. Conditional
// manifest puts, deletes and unlinks may not: a resent DeleteTag could
// remove a tag that someone pushed again in between, and a resent
// If-None-Match put would fail on its own first application.
func idempotent(cmd *pb.Command) bool {
	switch c := cmd.GetIntent().(type) {
	case *pb.Command_LinkBlob:
		return c.LinkBlob.GetPlacedRegion() != "" // a mount's source may be unlinked in between
	case *pb.Command_PlaceBlob:
		return true
	case *pb.Command_PutManifest:
		return c.PutManifest.GetIfMatch() == "" && !c.PutManifest.GetIfNoneMatch()
	}
	return false
}
