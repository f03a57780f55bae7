package consensus

import (
	"cmp"
	"context"
	"path"
	"slices"

	"github.com/cockroachdb/pebble/v2"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// Retention. Rules live in the state ('e'); a run plans from a snapshot and
// commits ApplyRetention entries, and the state machine re-checks every
// item where it applies, like garbage collection does. Tag push times ('V')
// and coarse last-pull times ('p', batched by members) are state too, so
// every replica judges an item the same way.

func applySetRetentionRule(b *pebble.Batch, e *pb.LogEntry) error {
	r := e.GetSetRetentionRule().GetRule()
	if r == nil || r.KeepTags < 0 || r.UntaggedAfterNanos < 0 || r.KeepPulledWithinNanos < 0 ||
		!pb.ValidGlob(r.Repositories) || !pb.ValidGlob(r.TagPattern) {
		return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "a retention rule needs valid patterns and limits that are not negative")
	}
	for _, p := range r.ProtectedTags {
		if !pb.ValidGlob(p) {
			return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "protected tag pattern %q is not a valid glob", p)
		}
	}
	return setProto(b, key(tableRetention, r.Repositories), r)
}

func applyDeleteRetentionRule(b *pebble.Batch, e *pb.LogEntry) error {
	k := key(tableRetention, e.GetDeleteRetentionRule().Repositories)
	ok, err := has(b, k)
	if err != nil {
		return err
	}
	if !ok {
		return pb.Errorf(pb.Code_CODE_NAME_UNKNOWN, "no retention rule for repositories %q", e.GetDeleteRetentionRule().Repositories)
	}
	return b.Delete(k, nil)
}

func applyRecordPulls(b *pebble.Batch, e *pb.LogEntry) error {
	for _, p := range e.GetRecordPulls().Pulls {
		exists, err := has(b, key(tableManifest, p.Repository, p.Digest))
		if err != nil {
			return err
		}
		if !exists {
			continue
		}
		k := key(tablePulled, p.Repository, p.Digest)
		if last, _, err := timeAt(b, k); err != nil || last >= p.UnixNano {
			if err != nil {
				return err
			}
			continue
		}
		if err := putTime(b, k, p.UnixNano); err != nil {
			return err
		}
	}
	return nil
}

// pulledAfter reports whether repo's manifest d was pulled after t (t 0:
// pulls do not count).
func pulledAfter(r pebble.Reader, repo, d string, t int64) (bool, error) {
	if t == 0 {
		return false, nil
	}
	last, ok, err := timeAt(r, key(tablePulled, repo, d))
	return ok && last > t, err
}

func applyApplyRetention(b *pebble.Batch, e *pb.LogEntry) error {
	c := e.GetApplyRetention()
	now := e.TimeUnixNano
	run := &pb.RetentionRun{}
	if _, err := getProto(b, key(tableGC, "retention"), run); err != nil {
		return err
	}
	if run.RunId != c.RunId {
		run = &pb.RetentionRun{RunId: c.RunId, StartedUnixNano: c.PushedBeforeUnixNano}
	}
	immutable, err := immutableRules(b)
	if err != nil {
		return err
	}
	for _, t := range c.Tags {
		cur, ok, err := get(b, key(tableTag, t.Repository, t.Tag))
		if err != nil {
			return err
		}
		if !ok || string(cur) != t.Digest || refuseImmutable(immutable, t.Repository, t.Tag, "") != nil {
			continue
		}
		pushed, _, err := timeAt(b, key(tableTagTime, t.Repository, t.Tag))
		if err != nil {
			return err
		}
		pulled, err := pulledAfter(b, t.Repository, t.Digest, t.KeepIfPulledAfterUnixNano)
		if err != nil {
			return err
		}
		if pushed > c.PushedBeforeUnixNano || pulled {
			continue
		}
		if err := removeTag(b, t.Repository, t.Tag, t.Digest); err != nil {
			return err
		}
		run.TagsDeleted++
		// A manifest left with no tag and no index goes with its last tag.
		_, tagged, err := firstUnder(b, prefix(tableTagIndex, t.Repository, t.Digest))
		if err != nil {
			return err
		}
		_, listed, err := firstUnder(b, prefix(tableChildRef, t.Repository, t.Digest))
		if err != nil {
			return err
		}
		rec := &pb.ManifestRecord{}
		found, err := getProto(b, key(tableManifest, t.Repository, t.Digest), rec)
		if err != nil {
			return err
		}
		if !tagged && !listed && found {
			if err := removeManifest(b, t.Repository, rec, now); err != nil {
				return err
			}
			run.ManifestsDeleted++
		} else if err := markIfUntagged(b, t.Repository, t.Digest, now); err != nil {
			return err
		}
	}
	for _, m := range c.Manifests {
		rec, ok, err := manifestCollectable(b, m.Repository, m.Digest, m.UntaggedBeforeUnixNano)
		if err != nil {
			return err
		}
		if !ok {
			continue
		}
		if pulled, err := pulledAfter(b, m.Repository, m.Digest, m.KeepIfPulledAfterUnixNano); err != nil || pulled {
			if err != nil {
				return err
			}
			continue
		}
		if err := removeManifest(b, m.Repository, rec, now); err != nil {
			return err
		}
		run.ManifestsDeleted++
	}
	return setProto(b, key(tableGC, "retention"), run)
}

// removeTag deletes one tag of repo pointing at d, with its push time and
// its quota charge.
func removeTag(b *pebble.Batch, repo, tag, d string) error {
	for _, k := range [][]byte{key(tableTag, repo, tag), key(tableTagIndex, repo, d, tag), key(tableTagTime, repo, tag)} {
		if err := b.Delete(k, nil); err != nil {
			return err
		}
	}
	return chargeTags(b, repo, -1)
}

func retentionRules(r pebble.Reader) ([]*pb.RetentionRule, error) {
	return scanValues(r, key(tableRetention), "", -1, func() *pb.RetentionRule { return &pb.RetentionRule{} })
}

// governing returns the rule with the longest pattern covering repo.
func governing(rules []*pb.RetentionRule, repo string) *pb.RetentionRule {
	var best *pb.RetentionRule
	for _, r := range rules {
		if pb.MatchRepository(r.Repositories, repo) && (best == nil || len(r.Repositories) > len(best.Repositories)) {
			best = r
		}
	}
	return best
}

func globMatch(pattern, s string) bool {
	ok, err := path.Match(pattern, s)
	return err == nil && ok
}

// RetentionRules lists the retention rules.
func (s *Store) RetentionRules(context.Context) ([]*pb.RetentionRule, error) {
	var out []*pb.RetentionRule
	err := s.read(func(db *pebble.DB) error {
		var err error
		out, err = retentionRules(db)
		return err
	})
	return out, err
}

// PlanRetention applies the rules to the state as of now and returns what
// a run would delete (the items of its ApplyRetention entries).
func (s *Store) PlanRetention(_ context.Context, now int64) (*pb.ApplyRetention, error) {
	plan := &pb.ApplyRetention{PushedBeforeUnixNano: now}
	err := s.read(func(db *pebble.DB) error {
		snap := db.NewSnapshot()
		defer snap.Close()
		rules, err := retentionRules(snap)
		if err != nil || len(rules) == 0 {
			return err
		}
		immutable, err := immutableRules(snap)
		if err != nil {
			return err
		}
		var repos []string
		if err := scan(snap, key(tableRepo), "", -1, func(k, _ []byte) error {
			repos = append(repos, string(k[2:]))
			return nil
		}); err != nil {
			return err
		}
		for _, repo := range repos {
			rule := governing(rules, repo)
			if rule == nil {
				continue
			}
			keepAfter := int64(0)
			if rule.KeepPulledWithinNanos > 0 {
				keepAfter = now - rule.KeepPulledWithinNanos
			}
			if rule.KeepTags > 0 {
				tags, err := retentionTags(snap, repo, rule, immutable)
				if err != nil {
					return err
				}
				for _, t := range tags[min(int(rule.KeepTags), len(tags)):] {
					if pulled, err := pulledAfter(snap, repo, t.Digest, keepAfter); err != nil {
						return err
					} else if !pulled {
						t.KeepIfPulledAfterUnixNano = keepAfter
						plan.Tags = append(plan.Tags, t)
					}
				}
			}
			if rule.UntaggedAfterNanos > 0 {
				before := now - rule.UntaggedAfterNanos
				var digests []string
				if err := scan(snap, prefix(tableUntagged, repo), "", -1, func(k, v []byte) error {
					if since, ok, _ := timeAt(snap, k); ok && since <= before {
						digests = append(digests, lastField(k))
					}
					return nil
				}); err != nil {
					return err
				}
				for _, d := range digests {
					_, ok, err := manifestCollectable(snap, repo, d, before)
					if err != nil {
						return err
					}
					pulled, err := pulledAfter(snap, repo, d, keepAfter)
					if err != nil {
						return err
					}
					if ok && !pulled {
						plan.Manifests = append(plan.Manifests, &pb.RetentionManifest{Repository: repo, Digest: d,
							UntaggedBeforeUnixNano: before, KeepIfPulledAfterUnixNano: keepAfter})
					}
				}
			}
		}
		return nil
	})
	return plan, err
}

// retentionTags lists the tags of repo that rule counts, newest push
// first: those matching its pattern that no protection or immutability
// rule covers.
func retentionTags(r pebble.Reader, repo string, rule *pb.RetentionRule, immutable []*pb.ImmutableRule) ([]*pb.RetentionTag, error) {
	type pushedTag struct {
		t      *pb.RetentionTag
		pushed int64
	}
	var tags []pushedTag
	err := scan(r, prefix(tableTag, repo), "", -1, func(k, v []byte) error {
		tag := lastField(k)
		if rule.TagPattern != "" && !globMatch(rule.TagPattern, tag) {
			return nil
		}
		if slices.ContainsFunc(rule.ProtectedTags, func(p string) bool { return globMatch(p, tag) }) ||
			refuseImmutable(immutable, repo, tag, "") != nil {
			return nil
		}
		pushed, _, err := timeAt(r, key(tableTagTime, repo, tag))
		tags = append(tags, pushedTag{&pb.RetentionTag{Repository: repo, Tag: tag, Digest: string(v)}, pushed})
		return err
	})
	slices.SortFunc(tags, func(a, b pushedTag) int {
		if c := cmp.Compare(b.pushed, a.pushed); c != 0 {
			return c
		}
		return cmp.Compare(a.t.Tag, b.t.Tag)
	})
	out := make([]*pb.RetentionTag, len(tags))
	for i, t := range tags {
		out[i] = t.t
	}
	return out, err
}

// RetentionRun returns the last retention run (empty before the first).
func (s *Store) RetentionRun(context.Context) (*pb.RetentionRun, error) {
	r := &pb.RetentionRun{}
	err := s.read(func(db *pebble.DB) error {
		_, err := getProto(db, key(tableGC, "retention"), r)
		return err
	})
	return r, err
}
