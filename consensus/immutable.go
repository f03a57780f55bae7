package consensus

import (
	"context"

	"github.com/cockroachdb/pebble/v2"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// Tag immutability. Rules live in the state, so every replica refuses the
// same writes: a tag a rule covers, once it exists, cannot be moved to
// another manifest or deleted, nor can the manifest it points at or its
// repository. Pushing the same manifest under the tag again is allowed
// (it changes nothing), as is creating a new covered tag.

func applySetImmutableRule(b *pebble.Batch, e *pb.LogEntry) error {
	r := e.GetSetImmutableRule().GetRule()
	if r == nil || r.Tags == "" || !pb.ValidGlob(r.Tags) || !pb.ValidGlob(r.Repositories) {
		return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "an immutability rule needs a valid repository pattern and tag glob")
	}
	return setProto(b, key(tableImmutable, r.Repositories, r.Tags), r)
}

func applyDeleteImmutableRule(b *pebble.Batch, e *pb.LogEntry) error {
	r := e.GetDeleteImmutableRule().GetRule()
	k := key(tableImmutable, r.GetRepositories(), r.GetTags())
	ok, err := has(b, k)
	if err != nil {
		return err
	}
	if !ok {
		return pb.Errorf(pb.Code_CODE_NAME_UNKNOWN, "no immutability rule for repositories %q tags %q", r.GetRepositories(), r.GetTags())
	}
	return b.Delete(k, nil)
}

func immutableRules(r pebble.Reader) ([]*pb.ImmutableRule, error) {
	return scanValues(r, key(tableImmutable), "", -1, func() *pb.ImmutableRule { return &pb.ImmutableRule{} })
}

// refuseImmutable refuses changing tag of repo when a rule covers it.
func refuseImmutable(rules []*pb.ImmutableRule, repo, tag, change string) error {
	for _, r := range rules {
		if r.Covers(repo, tag) {
			return pb.Errorf(pb.Code_CODE_DENIED, "tag %s of %s is immutable (rule: %s); %s is refused", tag, repo, r.Describe(), change)
		}
	}
	return nil
}

// refuseImmutableTagsOf refuses a delete that would take a covered tag
// with it: the tags of manifest digest, or of the whole repository when
// digest is "".
func refuseImmutableTagsOf(b pebble.Reader, repo, digest, change string) error {
	rules, err := immutableRules(b)
	if err != nil || len(rules) == 0 {
		return err
	}
	p := prefix(tableTagIndex, repo)
	if digest != "" {
		p = prefix(tableTagIndex, repo, digest)
	}
	var refusal error
	err = scan(b, p, "", -1, func(k, _ []byte) error {
		if refusal == nil {
			refusal = refuseImmutable(rules, repo, lastField(k), change)
		}
		return nil
	})
	if err != nil {
		return err
	}
	return refusal
}

// ImmutableRules lists the tag immutability rules.
func (s *Store) ImmutableRules(context.Context) ([]*pb.ImmutableRule, error) {
	var rules []*pb.ImmutableRule
	err := s.read(func(db *pebble.DB) error {
		var err error
		rules, err = immutableRules(db)
		return err
	})
	return rules, err
}
