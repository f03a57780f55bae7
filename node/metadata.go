package node

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/meridian-registry/meridian/consensus"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// clusterMetadata serves the gateway from this node's replica with the
// configured consistency:
//
//   - local: read the replica; a miss is confirmed by catching up with the
//     leader (read index) and reading again, so a pull right after a push
//     through another node never gets a false 404;
//   - strong: catch up with the leader before every read (linearizable).
//
// Writes go through Raft on the leader (forwarded when this node is not).
type clusterMetadata struct {
	n      *Node
	store  *consensus.Store
	strong bool
	// minIndex is the newest write the asking gateway acknowledged (0 for
	// the in-process gateway, whose writes are this node's own: see
	// Node.acked). Local reads wait until the replica has applied it.
	minIndex uint64
}

func (n *Node) metadata(strong bool) clusterMetadata {
	return clusterMetadata{n: n, store: n.consensus.Store(), strong: strong || n.cfg.ReadConsistency == "strong"}
}

func (m clusterMetadata) Commit(ctx context.Context, cmd *pb.Command) error {
	return m.n.commit(ctx, cmd)
}

// read runs fn with the requested consistency; miss tells a "not found"
// answer that local mode must confirm.
func read[T any](ctx context.Context, m clusterMetadata, fn func() (T, error), miss ...*pb.Error) (T, error) {
	// Until a replica has caught up once since it started, its store may
	// lack entries it had applied before a crash (applies are not synced;
	// Raft replays them), so even local reads wait for the leader then.
	if m.strong || !m.n.caughtUp.Load() {
		if err := m.catchUpOnce(ctx); err != nil {
			var zero T
			return zero, err
		}
		return fn()
	}
	if err := m.readOwnWrites(ctx); err != nil {
		var zero T
		return zero, err
	}
	v, err := fn()
	for _, target := range miss {
		if errors.Is(err, target) {
			if cerr := m.catchUpOnce(ctx); cerr != nil {
				// Cannot confirm the miss: say so rather than a 404.
				return v, cerr
			}
			return fn()
		}
	}
	return v, err
}

// readOwnWrites waits until the replica has applied every write the
// asker could have been told about: this node's acknowledged writes and
// the gateway's min_index. Usually both are applied already and this is
// two atomic loads. A follower that lags gets ownWritesWait to apply
// them; past that it catches up with the leader instead, whose read index
// covers every write acknowledged in this cluster (and so also a
// min_index from before the cluster was restored from a backup, which its
// log may never reach). A node that cannot do either answers
// errBehindOwnWrites, which the gateway's read takes as "ask another
// node".
func (m clusterMetadata) readOwnWrites(ctx context.Context) error {
	want := max(m.minIndex, m.n.acked.Load())
	if want == 0 || m.n.consensus.AppliedIndex() >= want {
		return nil
	}
	wctx, cancel := context.WithTimeout(ctx, ownWritesWait)
	err := m.n.consensus.WaitApplied(wctx, want)
	cancel()
	if err == nil {
		return nil
	}
	cctx, cancel := context.WithTimeout(ctx, ownWritesCatchUp)
	defer cancel()
	if err := m.catchUpOnce(cctx); err != nil {
		return fmt.Errorf("%w: %w: %w", pb.ErrUnavailable, errBehindOwnWrites, err)
	}
	return nil
}

// ownWritesWait bounds waiting for a replica to apply writes it (or the
// asking gateway) already saw acknowledged, before asking the leader: a
// follower learns of a commit within the leader's commit timeout (10-20
// ms) and a network hop.
const ownWritesWait = 250 * time.Millisecond

// ownWritesCatchUp bounds catching up with the leader after that: a node
// that cannot, say one cut off from the leader, answers soon, so that the
// gateway asks another node well within its own call timeout.
const ownWritesCatchUp = 2 * time.Second

// errBehindOwnWrites: this replica could not show the caller its own
// writes (wrapped with pb.ErrUnavailable: a 503 over HTTP).
var errBehindOwnWrites = errors.New("this node has not applied writes the caller saw acknowledged, and cannot catch up with the leader")

func (m clusterMetadata) Manifest(ctx context.Context, repo, digest string) (*pb.ManifestRecord, error) {
	return read(ctx, m, func() (*pb.ManifestRecord, error) { return m.store.Manifest(ctx, repo, digest) }, pb.ErrManifestUnknown)
}

func (m clusterMetadata) Tag(ctx context.Context, repo, tag string) (string, error) {
	return read(ctx, m, func() (string, error) { return m.store.Tag(ctx, repo, tag) }, pb.ErrTagUnknown)
}

func (m clusterMetadata) Tags(ctx context.Context, repo, after string, limit int) ([]string, error) {
	return read(ctx, m, func() ([]string, error) { return m.store.Tags(ctx, repo, after, limit) }, pb.ErrNameUnknown)
}

func (m clusterMetadata) Repositories(ctx context.Context, after string, limit int) ([]string, error) {
	return read(ctx, m, func() ([]string, error) { return m.store.Repositories(ctx, after, limit) })
}

func (m clusterMetadata) Referrers(ctx context.Context, repo, subject string) ([]*pb.Referrer, error) {
	return read(ctx, m, func() ([]*pb.Referrer, error) { return m.store.Referrers(ctx, repo, subject) })
}

func (m clusterMetadata) LinkedBlob(ctx context.Context, repo, digest string) (*pb.BlobRecord, error) {
	return read(ctx, m, func() (*pb.BlobRecord, error) { return m.store.LinkedBlob(ctx, repo, digest) }, pb.ErrBlobUnknown)
}

// WriteFence is this replica's applied index: every entry up to it was
// committed before anything the caller writes next.
func (m clusterMetadata) WriteFence(context.Context) (uint64, error) {
	index, _, err := m.store.AppliedIndex()
	return index, err
}

func (m clusterMetadata) UploadKeys(ctx context.Context) ([]*pb.UploadKey, error) {
	k, err := m.store.UploadKeys(ctx)
	if err != nil || len(k) > 0 {
		return k, err
	}
	if err := m.catchUpOnce(ctx); err != nil {
		return nil, err
	}
	return m.store.UploadKeys(ctx)
}

// requestCatchUp marks a request whose reads already caught up with the
// leader: later reads of the same request (a tag, then its manifest) see a
// state at least that new, so one read index serves them all.
type requestCatchUp struct{ done atomic.Bool }

type requestCatchUpKey struct{}

// withRequestCatchUp gives each request its own marker.
func withRequestCatchUp(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx := context.WithValue(r.Context(), requestCatchUpKey{}, &requestCatchUp{})
		next.ServeHTTP(w, r.WithContext(ctx))
	})
}

// catchUpOnce catches up unless this request already did.
func (m clusterMetadata) catchUpOnce(ctx context.Context) error {
	mark, _ := ctx.Value(requestCatchUpKey{}).(*requestCatchUp)
	if mark != nil && mark.done.Load() {
		return nil
	}
	if err := m.n.catchUp(ctx); err != nil {
		return err
	}
	if mark != nil {
		mark.done.Store(true)
	}
	return nil
}
