package replication

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"slices"
	"strings"
	"sync"
	"time"
)

// Regions is the set of blob stores a process can reach, one per region,
// and its view of how far each is. Reads go to the nearest region that holds
// a blob, uploads to the nearest region a repository lives in.
//
// Distance is this process's own region first, then the others by a moving
// average of how long their stores took to answer (time to first byte of an
// open, or a whole small call), unknown ones last in name order. A failing
// store counts as far away until it answers again.
type Regions struct {
	local  string
	mu     sync.RWMutex
	stores map[string]Driver
	cost   map[string]time.Duration // EWMA of observed latency; absent: unknown
}

// failurePenalty is the latency charged for a failed call, so a store that
// fails sorts behind every healthy one but recovers once it answers.
const failurePenalty = 30 * time.Second

// NewRegions returns an empty set for a process in region local.
func NewRegions(local string) *Regions {
	return &Regions{local: local, stores: map[string]Driver{}, cost: map[string]time.Duration{}}
}

// Local is the region this process runs in.
func (r *Regions) Local() string { return r.local }

// Add registers the store of a region.
func (r *Regions) Add(region string, d Driver) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.stores[region] = d
}

// Driver returns the store of a region.
func (r *Regions) Driver(region string) (Driver, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	d, ok := r.stores[region]
	return d, ok
}

// Names returns every region, sorted.
func (r *Regions) Names() []string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	names := make([]string, 0, len(r.stores))
	for n := range r.stores {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// Observe feeds one call's latency (or failure) into a region's distance.
func (r *Regions) Observe(region string, took time.Duration, err error) {
	if err != nil {
		took = failurePenalty
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	old, ok := r.cost[region]
	switch {
	case !ok, err != nil, old >= failurePenalty:
		// First sample, a failure, or the first success after one: take it as is.
		r.cost[region] = took
	default:
		r.cost[region] = (old*7 + took) / 8
	}
}

// Cost returns a region's current distance estimate and whether one exists.
func (r *Regions) Cost(region string) (time.Duration, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	c, ok := r.cost[region]
	return c, ok
}

// Nearest returns candidates that have a store here, nearest first.
func (r *Regions) Nearest(candidates []string) []string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]string, 0, len(candidates))
	for _, c := range candidates {
		if _, ok := r.stores[c]; ok && !slices.Contains(out, c) {
			out = append(out, c)
		}
	}
	slices.SortStableFunc(out, func(a, b string) int {
		if a == r.local || b == r.local {
			// The local region first, unless its store is failing.
			ca, cb := r.cost[a] >= failurePenalty, r.cost[b] >= failurePenalty
			if ca != cb {
				if ca {
					return 1
				}
				return -1
			}
			if a == r.local {
				return -1
			}
			return 1
		}
		ka, oka := r.cost[a]
		kb, okb := r.cost[b]
		switch {
		case oka && okb && ka != kb:
			return cmp.Compare(ka, kb)
		case oka != okb:
			if oka {
				return -1
			}
			return 1
		}
		return cmp.Compare(a, b)
	})
	return out
}

// TopologyFingerprint identifies a region list (names and store URLs without
// credentials, see RedactStoreURL) so processes configured with different
// lists can refuse each other. regions maps name to store URL; an empty map
// gives "".
func TopologyFingerprint(regions map[string]string) string {
	if len(regions) == 0 {
		return ""
	}
	lines := make([]string, 0, len(regions))
	for name, store := range regions {
		lines = append(lines, name+"="+RedactStoreURL(store))
	}
	slices.Sort(lines)
	sum := sha256.Sum256([]byte(strings.Join(lines, "\n")))
	return hex.EncodeToString(sum[:6])
}
