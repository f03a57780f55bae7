package consensus

import (
	"context"
	"fmt"

	"github.com/cockroachdb/pebble/v2"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// Quotas. Each quota keeps its usage beside its limits ('Q'), updated in the
// same batch as the change that moves it: a new repository, a new tag, a
// blob link that brings a blob the covered repositories did not hold yet.
// A change that would pass a limit is refused with DENIED, so two regions
// writing at once cannot both get under it.

// keptRejection is a refusal that still records what already happened
// outside the state machine (bytes a push stored before its link was
// refused, which garbage collection must find): the apply's batch is
// dropped, keep writes a fresh one, and the proposer gets the refusal.
type keptRejection struct {
	refused *pb.Error
	keep    func(b *pebble.Batch) error
}

func (k keptRejection) Error() string { return k.refused.Error() }
func (k keptRejection) Unwrap() error { return k.refused }

func applySetQuota(b *pebble.Batch, e *pb.LogEntry) error {
	q := e.GetSetQuota().GetQuota()
	if q == nil || q.MaxBytes < 0 || q.MaxRepositories < 0 || q.MaxTags < 0 || !pb.ValidGlob(q.Repositories) {
		return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "a quota needs a valid repository pattern and limits that are not negative")
	}
	u := &pb.QuotaUsage{Quota: q}
	var repos []string
	if err := scan(b, key(tableRepo), "", -1, func(k, _ []byte) error {
		if repo := string(k[2:]); pb.MatchRepository(q.Repositories, repo) {
			repos = append(repos, repo)
		}
		return nil
	}); err != nil {
		return err
	}
	seen := map[string]bool{}
	for _, repo := range repos {
		u.Repositories++
		if err := scan(b, prefix(tableTag, repo), "", -1, func(_, _ []byte) error {
			u.Tags++
			return nil
		}); err != nil {
			return err
		}
		blobs, err := lastFields(b, prefix(tableLink, repo))
		if err != nil {
			return err
		}
		for _, d := range blobs {
			if seen[d] {
				continue
			}
			seen[d] = true
			size, err := blobSize(b, d)
			if err != nil {
				return err
			}
			u.Bytes += size
		}
	}
	return setProto(b, key(tableQuota, q.Repositories), u)
}

func applyDeleteQuota(b *pebble.Batch, e *pb.LogEntry) error {
	k := key(tableQuota, e.GetDeleteQuota().Repositories)
	ok, err := has(b, k)
	if err != nil {
		return err
	}
	if !ok {
		return pb.Errorf(pb.Code_CODE_NAME_UNKNOWN, "no quota for repositories %q", e.GetDeleteQuota().Repositories)
	}
	return b.Delete(k, nil)
}

func blobSize(r pebble.Reader, d string) (int64, error) {
	rec := &pb.BlobRecord{}
	_, err := getProto(r, key(tableBlob, d), rec)
	return rec.Size, err
}

func quotaUsages(r pebble.Reader) ([]*pb.QuotaUsage, error) {
	return scanValues(r, key(tableQuota), "", -1, func() *pb.QuotaUsage { return &pb.QuotaUsage{} })
}

// chargeQuotas applies delta to every quota covering repo: delta returns
// the change to make, or an error to refuse it. Nothing is written when
// any quota refuses.
func chargeQuotas(b *pebble.Batch, repo string, delta func(u *pb.QuotaUsage) (bytes, repos, tags int64, err error)) error {
	usages, err := quotaUsages(b)
	if err != nil || len(usages) == 0 {
		return err
	}
	var changed []*pb.QuotaUsage
	for _, u := range usages {
		if !pb.MatchRepository(u.Quota.Repositories, repo) {
			continue
		}
		db, dr, dt, err := delta(u)
		if err != nil {
			return err
		}
		if db == 0 && dr == 0 && dt == 0 {
			continue
		}
		q := u.Quota
		switch {
		case db > 0 && q.MaxBytes > 0 && u.Bytes+db > q.MaxBytes:
			return quotaExceeded(q, u.Bytes, q.MaxBytes, "bytes", fmt.Sprintf("; this needs %d more", db))
		case dr > 0 && q.MaxRepositories > 0 && u.Repositories+dr > q.MaxRepositories:
			return quotaExceeded(q, u.Repositories, q.MaxRepositories, "repositories", "")
		case dt > 0 && q.MaxTags > 0 && u.Tags+dt > q.MaxTags:
			return quotaExceeded(q, u.Tags, q.MaxTags, "tags", "")
		}
		u.Bytes, u.Repositories, u.Tags = max(u.Bytes+db, 0), max(u.Repositories+dr, 0), max(u.Tags+dt, 0)
		changed = append(changed, u)
	}
	for _, u := range changed {
		if err := setProto(b, key(tableQuota, u.Quota.Repositories), u); err != nil {
			return err
		}
	}
	return nil
}

func quotaExceeded(q *pb.Quota, used, limit int64, what, more string) error {
	return pb.Errorf(pb.Code_CODE_DENIED, "quota exceeded: uses %d of %d %s (quota on repositories %q)%s", used, limit, what, q.Repositories, more)
}

// chargeRepository counts a repository created (+1) or deleted (-1).
func chargeRepository(b *pebble.Batch, repo string, n int64) error {
	return chargeQuotas(b, repo, func(*pb.QuotaUsage) (int64, int64, int64, error) { return 0, n, 0, nil })
}

// chargeTags counts tags created (n > 0) or deleted (n < 0).
func chargeTags(b *pebble.Batch, repo string, n int64) error {
	return chargeQuotas(b, repo, func(*pb.QuotaUsage) (int64, int64, int64, error) { return 0, 0, n, nil })
}

// chargeLink counts blob d of size bytes linked into (sign 1) or unlinked
// from (sign -1) repo: its bytes count for a quota unless another
// repository the quota covers links it too. Call it before the link is
// written or after it is removed.
func chargeLink(b *pebble.Batch, repo, d string, size, sign int64) error {
	return chargeQuotas(b, repo, func(u *pb.QuotaUsage) (int64, int64, int64, error) {
		shared := false
		err := scan(b, prefix(tableBlobRepos, d), "", -1, func(k, _ []byte) error {
			if other := lastField(k); other != repo && pb.MatchRepository(u.Quota.Repositories, other) {
				shared = true
			}
			return nil
		})
		if err != nil || shared {
			return 0, 0, 0, err
		}
		return sign * size, 0, 0, nil
	})
}

// QuotaUsages lists the quotas with what their repositories use.
func (s *Store) QuotaUsages(context.Context) ([]*pb.QuotaUsage, error) {
	var out []*pb.QuotaUsage
	err := s.read(func(db *pebble.DB) error {
		var err error
		out, err = quotaUsages(db)
		return err
	})
	return out, err
}
