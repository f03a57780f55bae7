package chaos

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/url"
	"path/filepath"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/meridian-registry/meridian/replication"
)

// CheckNameLiveManifests is the check of the region stores after the last
// garbage collection.
const CheckNameLiveManifests = "live-manifests-complete"

// blobStore is what the check reads a region's copies through: the
// registry's own driver for the region's store (replication.Driver), or a
// fake in tests.
type blobStore interface {
	Open(ctx context.Context, dgst digest.Digest, offset int64) (io.ReadCloser, error)
}

// RegionStores opens every region's store directly, as the nodes of the
// region do but not through the harness's fault proxies: a directory
// region's directory, an S3 region's versitygw. A store that cannot be
// opened is left out, and the check counts its copies as unreadable.
func (c *Cluster) RegionStores(ctx context.Context) (map[string]blobStore, error) {
	stores := map[string]blobStore{}
	var errs []error
	for _, r := range c.prof.Regions {
		cfg := replication.StoreConfig{Region: r.Name, URL: "file://" + filepath.Join(c.dir, "blobs", r.Name)}
		if s := c.s3[r.Name]; s != nil {
			u := url.URL{Scheme: "s3", User: url.UserPassword(s.access, s.secret), Host: s.addr, Path: "/" + s.bucket,
				RawQuery: "secure=false&region=us-east-1&path_style=true"}
			cfg.URL = u.String()
		}
		d, err := replication.OpenStore(ctx, cfg)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		stores[r.Name] = d
	}
	return stores, errors.Join(errs...)
}

// RegionsOf is the regions the cluster's replication policies place repo
// in.
func (c *Cluster) RegionsOf(repo string) []string {
	all := regionNames(c.prof)
	return policyRegions(replicationPolicies(all), all, repo)
}

// storeCopy is one blob that live manifests reference, in one region
// their policy names.
type storeCopy struct {
	region string
	blob   Blob
	owners []int // the live pushes referencing it, as indexes into ops
}

// copyState is what reading a copy found.
type copyState int

const (
	copyHeld copyState = iota
	copyMissing
	copyWrong
	copyUnreadable
)

type copyRead struct {
	state copyState
	size  int64
	got   string // sha256 of the bytes read
	err   string
}

// storeReadAttempts is how often a copy is read before it counts as
// unreadable: an error other than "not found" says nothing about the
// copy.
const storeReadAttempts = 3

// CheckLiveManifests checks, in the region stores themselves, that every
// live manifest is complete: every blob that an acknowledged push or
// mount not targeted by a delete (of any outcome: an unknown delete may
// have applied) references is held, with bytes that hash to its digest
// and of its size, by every region that regionsOf names for the
// manifest's repository. drain is the last garbage collection: the check
// is meant to run once every region has removed what it condemned, and
// if that was not seen it does not decide (a removal still under way
// could yet take a live blob). Copies whose store could not be read count
// as unreadable, which leaves the check undecided as well. Checked counts
// the copies read to a verdict.
func CheckLiveManifests(ctx context.Context, ops []Op, stores map[string]blobStore, regionsOf func(repo string) []string, drain GCDrain) CheckResult {
	copies, live, gone := liveCopies(ops, regionsOf)
	reads := readCopies(ctx, copies, stores)
	var (
		vs                         []Violation
		held, unreadable           int
		bytes                      int64
		regions                    = map[string]bool{}
		firstUnreadable, unreadErr string
	)
	for i, c := range copies {
		regions[c.region] = true
		r := reads[i]
		var what string
		switch r.state {
		case copyHeld:
			held++
			bytes += r.size
			continue
		case copyUnreadable:
			unreadable++
			if firstUnreadable == "" {
				firstUnreadable, unreadErr = c.region+" "+shortDigest(c.blob.Digest), r.err
			}
			continue
		case copyMissing:
			what = "is missing"
		case copyWrong:
			what = fmt.Sprintf("holds %d bytes hashing to %s", r.size, r.got)
		}
		shown := make([]Op, 0, min(len(c.owners), maxLiveOwnersShown))
		for _, j := range c.owners[:min(len(c.owners), maxLiveOwnersShown)] {
			shown = append(shown, ops[j])
		}
		vs = append(vs, Violation{Check: CheckNameLiveManifests, Ops: shown,
			Message: fmt.Sprintf("region %s: blob %s (%d bytes) of %d live manifests (%s) %s",
				c.region, c.blob.Digest, c.blob.Size, len(c.owners), opRef(ops[c.owners[0]]), what)})
	}
	checked := len(copies) - unreadable
	detail := fmt.Sprintf("%d live manifests (%d deleted left out): %d blob copies in %d regions, %d held (%d bytes read), %d missing or wrong, %d unreadable; %s",
		live, gone, len(copies), len(regions), held, bytes, len(vs), unreadable, drain)
	r := newResult(CheckNameLiveManifests, checked, vs, detail)
	switch {
	case r.Status != CheckPass:
	case unreadable > 0:
		r.Status = CheckUnknown
		r.Detail = fmt.Sprintf("%d copies could not be read (first: %s: %s); %s", unreadable, firstUnreadable, unreadErr, r.Detail)
	case !drain.Drained:
		r.Status = CheckUnknown
		r.Detail = "the last gc run's removals were not seen to finish; " + r.Detail
	}
	return r
}

// liveCopies lists the copies CheckLiveManifests reads: each blob of a
// live manifest once per region, with every live push referencing it;
// and how many manifests are live and how many were deleted.
func liveCopies(ops []Op, regionsOf func(repo string) []string) (copies []storeCopy, live, gone int) {
	deleted := map[repoKey]bool{}
	for _, op := range ops {
		if op.Kind == OpDelete {
			deleted[repoKey{op.Repo, op.Digest}] = true
		}
	}
	type copyKey struct{ region, digest string }
	index := map[copyKey]int{}
	for i, op := range ops {
		if !isPushKind(op.Kind) || op.Outcome != OutcomeOK || op.Digest == "" {
			continue
		}
		if deleted[repoKey{op.Repo, op.Digest}] {
			gone++
			continue
		}
		live++
		for _, region := range regionsOf(op.Repo) {
			for _, b := range op.Blobs {
				k := copyKey{region, b.Digest}
				j, ok := index[k]
				if !ok {
					j = len(copies)
					index[k] = j
					copies = append(copies, storeCopy{region: region, blob: b})
				}
				copies[j].owners = append(copies[j].owners, i)
			}
		}
	}
	return copies, live, gone
}

// maxLiveOwnersShown bounds the pushes a violation lists.
const maxLiveOwnersShown = 5

// readCopies reads every copy from its region's store, a few at a time.
func readCopies(ctx context.Context, copies []storeCopy, stores map[string]blobStore) []copyRead {
	reads := make([]copyRead, len(copies))
	work := make(chan int)
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for i := range work {
				reads[i] = readCopy(ctx, stores[copies[i].region], copies[i].blob)
			}
		})
	}
	for i := range copies {
		work <- i
	}
	close(work)
	wg.Wait()
	return reads
}

// readCopy reads one blob from store and hashes it, trying again after
// errors that are not "not found".
func readCopy(ctx context.Context, store blobStore, b Blob) copyRead {
	if store == nil {
		return copyRead{state: copyUnreadable, err: "the region's store could not be opened"}
	}
	var last copyRead
	for attempt := 0; attempt < storeReadAttempts; attempt++ {
		if attempt > 0 && !sleepCtx(ctx, time.Second) {
			break
		}
		rc, err := store.Open(ctx, digest.Digest(b.Digest), 0)
		if errors.Is(err, replication.ErrBlobNotFound) {
			return copyRead{state: copyMissing}
		}
		if err != nil {
			last = copyRead{state: copyUnreadable, err: err.Error()}
			continue
		}
		h := sha256.New()
		n, err := io.Copy(h, rc)
		rc.Close()
		if err != nil {
			last = copyRead{state: copyUnreadable, err: "reading: " + err.Error()}
			continue
		}
		got := "sha256:" + hex.EncodeToString(h.Sum(nil))
		if got != b.Digest || n != b.Size {
			return copyRead{state: copyWrong, size: n, got: got}
		}
		return copyRead{state: copyHeld, size: n, got: got}
	}
	return last
}
