package membership

import (
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/serf/coordinate"
)

// RTT keeps this member's Vivaldi network coordinate and the round-trip
// times it measured to other members.
//
// Times are measured on the connections that carry requests (a periodic
// ping over each gRPC connection), not by memberlist's UDP probes, which a
// TCP proxy or a cross-region link would not see the same way. A direct
// measurement, smoothed, is the best estimate of a member's distance; the
// coordinate (hashicorp/serf/coordinate) estimates distances to members
// this one has not measured lately from what every member measured.
type RTT struct {
	client *coordinate.Client

	mu    sync.Mutex
	peers map[string]*peerRTT
}

type peerRTT struct {
	ewma     time.Duration
	coord    *coordinate.Coordinate
	measured time.Time
	failures int
}

// measurementTTL is how long a direct measurement is preferred over the
// coordinate estimate.
const measurementTTL = 30 * time.Second

// NewRTT returns an RTT tracker at the origin.
func NewRTT() *RTT {
	c, err := coordinate.NewClient(coordinate.DefaultConfig())
	if err != nil {
		panic(err) // only for an invalid default config
	}
	return &RTT{client: c, peers: map[string]*peerRTT{}}
}

// Coordinate returns this member's current coordinate.
func (r *RTT) Coordinate() *coordinate.Coordinate { return r.client.GetCoordinate() }

// Observe records a successful ping of member id that took rtt and returned
// the member's coordinate (nil if it sent none).
func (r *RTT) Observe(id string, remote *coordinate.Coordinate, rtt time.Duration) {
	if remote != nil && remote.IsValid() && remote.IsCompatibleWith(r.client.GetCoordinate()) {
		r.client.Update(id, remote, rtt)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	p := r.peer(id)
	if p.ewma == 0 || p.failures > 0 {
		p.ewma = rtt
	} else {
		p.ewma = (p.ewma*3 + rtt) / 4
	}
	p.failures = 0
	p.measured = time.Now()
	if remote != nil {
		p.coord = remote
	}
}

// Failed records a failed ping or request to member id.
func (r *RTT) Failed(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.peer(id).failures++
}

// Forget drops what is known of member id.
func (r *RTT) Forget(id string) {
	r.client.ForgetNode(id)
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.peers, id)
}

func (r *RTT) peer(id string) *peerRTT {
	p, ok := r.peers[id]
	if !ok {
		p = &peerRTT{}
		r.peers[id] = p
	}
	return p
}

// Estimate returns the round-trip time to member id: the smoothed
// measurement while recent, else the coordinate distance. ok is false when
// nothing is known.
func (r *RTT) Estimate(id string) (rtt time.Duration, ok bool) {
	r.mu.Lock()
	p, known := r.peers[id]
	var measured time.Time
	var ewma time.Duration
	var coord *coordinate.Coordinate
	if known {
		measured, ewma, coord = p.measured, p.ewma, p.coord
	}
	r.mu.Unlock()
	if !known {
		return 0, false
	}
	if ewma > 0 && time.Since(measured) < measurementTTL {
		return ewma, true
	}
	if coord != nil && coord.IsCompatibleWith(r.client.GetCoordinate()) {
		return r.client.DistanceTo(coord), true
	}
	return ewma, ewma > 0
}

// Healthy reports whether the last ping or request to member id succeeded
// (true for members never tried).
func (r *RTT) Healthy(id string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	p, ok := r.peers[id]
	return !ok || p.failures == 0
}

// Rank orders member ids nearest first: healthy before failing, then by
// estimated round-trip time (unknown last), then by id.
func (r *RTT) Rank(ids []string) []string {
	type ranked struct {
		id      string
		healthy bool
		rtt     time.Duration
		known   bool
	}
	rs := make([]ranked, len(ids))
	for i, id := range ids {
		rtt, known := r.Estimate(id)
		rs[i] = ranked{id, r.Healthy(id), rtt, known}
	}
	slices.SortStableFunc(rs, func(a, b ranked) int {
		switch {
		case a.healthy != b.healthy:
			if a.healthy {
				return -1
			}
			return 1
		case a.known != b.known:
			if a.known {
				return -1
			}
			return 1
		case a.rtt != b.rtt:
			if a.rtt < b.rtt {
				return -1
			}
			return 1
		}
		if a.id < b.id {
			return -1
		}
		return 1
	})
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = r.id
	}
	return out
}
