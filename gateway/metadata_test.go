package gateway

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// fakeMetadata is an in-memory Metadata with the semantics of the consensus
// state store and FSM (consensus/store.go, consensus/fsm.go): the same
// business errors, the same preconditions, and commands that apply entirely
// or not at all.
type fakeMetadata struct {
	t *testing.T

	mu        sync.Mutex
	key       []byte
	rotated   []*pb.UploadKey // keys added to the ring after key (id 0)
	repos     map[string]bool
	manifests map[repoKey]*pb.ManifestRecord
	tags      map[string]map[string]string // repo → tag → digest
	links     map[repoKey]bool
	blobs     map[string]*pb.BlobRecord
	referrers map[repoKey]map[string]*pb.Referrer // (repo, subject) → referrer digest → descriptor
	// fail, when set, is what every proposal returns (no leader, say).
	fail      error
	proposals int
	// policy is what Policy answers for every repository.
	policy pb.EffectivePolicy
	// fence counts WriteFence calls and is what the last one answered;
	// onFence, when set, runs at each call. linkFences are the fences
	// of the links with a placement, in order.
	fence      uint64
	onFence    func()
	linkFences []uint64
}

type repoKey struct{ repo, digest string }

var _ Metadata = (*fakeMetadata)(nil)

func newFakeMetadata(t *testing.T) *fakeMetadata {
	key := make([]byte, 32)
	rand.Read(key)
	return &fakeMetadata{
		t: t, key: key,
		repos:     map[string]bool{},
		manifests: map[repoKey]*pb.ManifestRecord{},
		tags:      map[string]map[string]string{},
		links:     map[repoKey]bool{},
		blobs:     map[string]*pb.BlobRecord{},
		referrers: map[repoKey]map[string]*pb.Referrer{},
		policy:    pb.EffectivePolicy{Regions: []string{"local"}, MinRegions: 1},
	}
}

func (m *fakeMetadata) setFail(err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.fail = err
}

// keyFields reports fields that would corrupt the real store's key layout,
// where 0x00 separates fields: the gateway must validate before proposing.
func (m *fakeMetadata) keyFields(fields ...string) {
	for _, f := range fields {
		if f == "" || strings.IndexByte(f, 0) >= 0 {
			m.t.Errorf("unvalidated key field %q reached the log", f)
		}
	}
}

func (m *fakeMetadata) Commit(ctx context.Context, cmd *pb.Command) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%w: %v", pb.ErrUnavailable, err)
	}
	if m.fail != nil {
		return m.fail
	}
	m.proposals++
	cmd = proto.Clone(cmd).(*pb.Command) // the log holds its own copy
	switch c := cmd.Intent.(type) {
	case *pb.Command_PutManifest:
		return m.putManifest(c.PutManifest)
	case *pb.Command_DeleteManifest:
		return m.deleteManifest(c.DeleteManifest)
	case *pb.Command_DeleteTag:
		return m.deleteTag(c.DeleteTag)
	case *pb.Command_LinkBlob:
		return m.linkBlob(c.LinkBlob)
	case *pb.Command_UnlinkBlob:
		return m.unlinkBlob(c.UnlinkBlob)
	}
	m.t.Errorf("a gateway sent a command it may not send: %v", cmd)
	return errors.New("not a gateway command")
}

func (m *fakeMetadata) putManifest(c *pb.PutManifest) error {
	repo := c.Repository
	m.keyFields(repo, c.Digest)
	m.keyFields(c.Tags...)
	if len(c.Tags) > 0 && (c.IfMatch != "" || c.IfNoneMatch) {
		if len(c.Tags) != 1 {
			return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "a conditional tag update names exactly one tag")
		}
		current, exists := m.tags[repo][c.Tags[0]]
		if c.IfNoneMatch && exists {
			return pb.Errorf(pb.Code_CODE_PRECONDITION_FAILED, "tag %s already exists", c.Tags[0])
		}
		if c.IfMatch != "" && (!exists || (c.IfMatch != "*" && current != c.IfMatch)) {
			return pb.Errorf(pb.Code_CODE_PRECONDITION_FAILED, "tag %s does not point at %s", c.Tags[0], c.IfMatch)
		}
	}
	for _, d := range c.Blobs {
		if !m.links[repoKey{repo, d}] {
			return pb.Errorf(pb.Code_CODE_MANIFEST_BLOB_UNKNOWN, "blob %s is not in %s", d, repo)
		}
	}
	for _, d := range c.Manifests {
		if m.manifests[repoKey{repo, d}] == nil {
			return pb.Errorf(pb.Code_CODE_MANIFEST_BLOB_UNKNOWN, "manifest %s is not in %s", d, repo)
		}
	}
	m.repos[repo] = true
	m.manifests[repoKey{repo, c.Digest}] = &pb.ManifestRecord{
		Digest: c.Digest, MediaType: c.MediaType, Content: c.Content,
		Subject: c.Subject, ArtifactType: c.ArtifactType, Annotations: c.Annotations,
	}
	if c.Subject != "" {
		m.keyFields(c.Subject)
		k := repoKey{repo, c.Subject}
		if m.referrers[k] == nil {
			m.referrers[k] = map[string]*pb.Referrer{}
		}
		m.referrers[k][c.Digest] = &pb.Referrer{
			MediaType: c.MediaType, Digest: c.Digest, Size: int64(len(c.Content)),
			ArtifactType: c.ArtifactType, Annotations: c.Annotations,
		}
	}
	if len(c.Tags) > 0 && m.tags[repo] == nil {
		m.tags[repo] = map[string]string{}
	}
	for _, tag := range c.Tags {
		m.tags[repo][tag] = c.Digest
	}
	return nil
}

func (m *fakeMetadata) deleteManifest(c *pb.DeleteManifest) error {
	k := repoKey{c.Repository, c.Digest}
	rec := m.manifests[k]
	if rec == nil {
		return pb.Errorf(pb.Code_CODE_MANIFEST_UNKNOWN, "manifest %s not found in %s", c.Digest, c.Repository)
	}
	for tag, d := range m.tags[c.Repository] {
		if d == c.Digest {
			delete(m.tags[c.Repository], tag)
		}
	}
	if rec.Subject != "" {
		delete(m.referrers[repoKey{c.Repository, rec.Subject}], c.Digest)
	}
	delete(m.manifests, k)
	return nil
}

func (m *fakeMetadata) deleteTag(c *pb.DeleteTag) error {
	if _, ok := m.tags[c.Repository][c.Tag]; !ok {
		return pb.Errorf(pb.Code_CODE_MANIFEST_UNKNOWN, "tag %s not found in %s", c.Tag, c.Repository)
	}
	delete(m.tags[c.Repository], c.Tag)
	return nil
}

func (m *fakeMetadata) linkBlob(c *pb.LinkBlob) error {
	m.keyFields(c.Repository, c.Digest)
	if c.PlacedRegion != "" {
		m.linkFences = append(m.linkFences, c.WrittenAfterIndex)
	}
	rec, found := m.blobs[c.Digest]
	if c.PlacedRegion == "" {
		if !found {
			return pb.Errorf(pb.Code_CODE_BLOB_UNKNOWN, "blob %s not found", c.Digest)
		}
		if c.MountFrom != "" && !m.links[repoKey{c.MountFrom, c.Digest}] {
			return pb.Errorf(pb.Code_CODE_BLOB_UNKNOWN, "blob %s not found in %s", c.Digest, c.MountFrom)
		}
	} else {
		if !found {
			rec = &pb.BlobRecord{Digest: c.Digest, Size: c.Size}
		} else if rec.Size != c.Size {
			return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, "blob %s has size %d, not %d", c.Digest, rec.Size, c.Size)
		}
		if !slices.Contains(rec.Regions, c.PlacedRegion) {
			rec.Regions = append(rec.Regions, c.PlacedRegion)
			slices.Sort(rec.Regions)
		}
		m.blobs[c.Digest] = rec
	}
	m.repos[c.Repository] = true
	m.links[repoKey{c.Repository, c.Digest}] = true
	return nil
}

func (m *fakeMetadata) unlinkBlob(c *pb.UnlinkBlob) error {
	k := repoKey{c.Repository, c.Digest}
	if !m.links[k] {
		return pb.Errorf(pb.Code_CODE_BLOB_UNKNOWN, "blob %s not found in %s", c.Digest, c.Repository)
	}
	delete(m.links, k)
	return nil
}

func (m *fakeMetadata) Manifest(_ context.Context, repo, d string) (*pb.ManifestRecord, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	rec := m.manifests[repoKey{repo, d}]
	if rec == nil {
		return nil, pb.Errorf(pb.Code_CODE_MANIFEST_UNKNOWN, "manifest %s not found in %s", d, repo)
	}
	return proto.Clone(rec).(*pb.ManifestRecord), nil
}

func (m *fakeMetadata) Tag(_ context.Context, repo, tag string) (string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, ok := m.tags[repo][tag]
	if !ok {
		return "", pb.Errorf(pb.Code_CODE_TAG_UNKNOWN, "tag %s not found in %s", tag, repo)
	}
	return d, nil
}

// page returns up to limit of keys sorted, after after; a negative limit means
// no limit, as in the store's scan.
func page(keys []string, after string, limit int) []string {
	slices.Sort(keys)
	out := []string{}
	for _, k := range keys {
		if limit >= 0 && len(out) >= limit {
			break
		}
		if k > after {
			out = append(out, k)
		}
	}
	return out
}

func (m *fakeMetadata) Tags(_ context.Context, repo, after string, limit int) ([]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.repos[repo] {
		return nil, pb.Errorf(pb.Code_CODE_NAME_UNKNOWN, "repository %s not known", repo)
	}
	var tags []string
	for t := range m.tags[repo] {
		tags = append(tags, t)
	}
	return page(tags, after, limit), nil
}

func (m *fakeMetadata) Repositories(_ context.Context, after string, limit int) ([]string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var repos []string
	for r := range m.repos {
		repos = append(repos, r)
	}
	return page(repos, after, limit), nil
}

func (m *fakeMetadata) Referrers(_ context.Context, repo, subject string) ([]*pb.Referrer, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	refs := []*pb.Referrer{}
	for _, r := range m.referrers[repoKey{repo, subject}] {
		refs = append(refs, proto.Clone(r).(*pb.Referrer))
	}
	slices.SortFunc(refs, func(a, b *pb.Referrer) int { return strings.Compare(a.Digest, b.Digest) })
	return refs, nil
}

func (m *fakeMetadata) LinkedBlob(_ context.Context, repo, d string) (*pb.BlobRecord, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	rec := m.blobs[d]
	if !m.links[repoKey{repo, d}] || rec == nil {
		return nil, pb.Errorf(pb.Code_CODE_BLOB_UNKNOWN, "blob %s not found in %s", d, repo)
	}
	return proto.Clone(rec).(*pb.BlobRecord), nil
}

func (m *fakeMetadata) Policy(context.Context, string) (pb.EffectivePolicy, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.policy, nil
}

// place records a copy of a blob in another region, as a replicator would.
func (m *fakeMetadata) place(d, region string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	rec := m.blobs[d]
	rec.Regions = append(rec.Regions, region)
	slices.Sort(rec.Regions)
}

func (m *fakeMetadata) WaitPlaced(ctx context.Context, d string, n int) (*pb.BlobRecord, error) {
	for {
		m.mu.Lock()
		rec := proto.Clone(m.blobs[d]).(*pb.BlobRecord)
		m.mu.Unlock()
		if len(rec.Regions) >= n {
			return rec, nil
		}
		select {
		case <-ctx.Done():
			return rec, ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func (m *fakeMetadata) WriteFence(context.Context) (uint64, error) {
	m.mu.Lock()
	m.fence++
	fence, on := m.fence, m.onFence
	m.mu.Unlock()
	if on != nil {
		on()
	}
	return fence, nil
}

func (m *fakeMetadata) UploadKeys(context.Context) ([]*pb.UploadKey, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.key == nil {
		return nil, nil
	}
	return append([]*pb.UploadKey{{Id: 0, Key: m.key}}, m.rotated...), nil
}
