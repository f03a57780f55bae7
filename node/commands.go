package node

import (
	"context"
	"fmt"
	"slices"
	"time"
	"unicode"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meridian-registry/meridian/consensus"
	"github.com/meridian-registry/meridian/gateway"
	"github.com/meridian-registry/meridian/node/transport"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// The node owns its commands: every write, whether from this node's own
// gateway, a standalone gateway, another node or the admin API, is checked
// here field by field before consensus builds its log entry. A command that
// fails gets ErrInvalidArgument with the reason, and nothing is committed.

// maxTextField bounds free-text fields (media and artifact types).
const maxTextField = 255

func invalid(format string, args ...any) error {
	return pb.Errorf(pb.Code_CODE_INVALID_ARGUMENT, format, args...)
}

// validateCommand checks every field of cmd.
func (n *Node) validateCommand(ctx context.Context, cmd *pb.Command) error {
	switch c := cmd.GetIntent().(type) {
	case *pb.Command_PutManifest:
		return n.validatePutManifest(c.PutManifest)
	case *pb.Command_DeleteManifest:
		return firstErr(checkRepo(c.DeleteManifest.GetRepository()), checkDigest("digest", c.DeleteManifest.GetDigest()))
	case *pb.Command_DeleteTag:
		return firstErr(checkRepo(c.DeleteTag.GetRepository()), checkTag(c.DeleteTag.GetTag()))
	case *pb.Command_LinkBlob:
		l := c.LinkBlob
		err := firstErr(checkRepo(l.GetRepository()), checkDigest("digest", l.GetDigest()), n.checkSize(l.GetSize()))
		if err == nil && l.PlacedRegion != "" {
			err = n.checkRegion(l.PlacedRegion)
		}
		if err == nil && l.MountFrom != "" {
			err = checkRepo(l.MountFrom)
		}
		return err
	case *pb.Command_UnlinkBlob:
		return firstErr(checkRepo(c.UnlinkBlob.GetRepository()), checkDigest("digest", c.UnlinkBlob.GetDigest()))
	case *pb.Command_PlaceBlob:
		p := c.PlaceBlob
		return firstErr(checkDigest("digest", p.GetDigest()), n.checkSize(p.GetSize()), n.checkRegion(p.GetRegion()))
	case *pb.Command_SetPolicy:
		return n.validatePolicy(ctx, c.SetPolicy.GetPolicy())
	case *pb.Command_DeletePolicy:
		if !policyPrefixRE.MatchString(c.DeletePolicy.GetPrefix()) {
			return invalid("prefix %q: not a repository name prefix", c.DeletePolicy.GetPrefix())
		}
		return nil
	case *pb.Command_BlobRemoved:
		return firstErr(checkDigest("digest", c.BlobRemoved.GetDigest()), n.checkRegion(c.BlobRemoved.GetRegion()))
	case *pb.Command_DeleteRepository:
		return checkRepo(c.DeleteRepository.GetRepository())
	case *pb.Command_SetImmutableRule:
		return checkImmutableRule(c.SetImmutableRule.GetRule())
	case *pb.Command_DeleteImmutableRule:
		return checkImmutableRule(c.DeleteImmutableRule.GetRule())
	case *pb.Command_SetQuota:
		q := c.SetQuota.GetQuota()
		if q == nil {
			return invalid("no quota")
		}
		if q.MaxBytes < 0 || q.MaxRepositories < 0 || q.MaxTags < 0 {
			return invalid("quota limits cannot be negative")
		}
		if q.MaxBytes == 0 && q.MaxRepositories == 0 && q.MaxTags == 0 {
			return invalid("a quota sets at least one of --max-bytes, --max-repositories, --max-tags")
		}
		return checkRepoPattern(q.Repositories)
	case *pb.Command_DeleteQuota:
		return checkRepoPattern(c.DeleteQuota.GetRepositories())
	case *pb.Command_SetRetentionRule:
		return checkRetentionRule(c.SetRetentionRule.GetRule())
	case *pb.Command_DeleteRetentionRule:
		return checkRepoPattern(c.DeleteRetentionRule.GetRepositories())
	case *pb.Command_RecordPulls:
		pulls := c.RecordPulls.GetPulls()
		if len(pulls) == 0 || len(pulls) > 1000 {
			return invalid("record pulls: %d pulls, want 1 to 1000", len(pulls))
		}
		latest := time.Now().Add(time.Hour).UnixNano()
		for _, p := range pulls {
			if err := firstErr(checkRepo(p.Repository), checkDigest("digest", p.Digest)); err != nil {
				return err
			}
			if p.UnixNano <= 0 || p.UnixNano > latest {
				return invalid("record pulls: time %d is not a time of a pull", p.UnixNano)
			}
		}
		return nil
	case *pb.Command_PutWebhook:
		return checkWebhook(c.PutWebhook.GetWebhook())
	case *pb.Command_DeleteWebhook:
		if !webhookNameRE.MatchString(c.DeleteWebhook.GetName()) {
			return invalid("webhook name %q: use 1-63 letters, digits, '.', '_' or '-'", c.DeleteWebhook.GetName())
		}
		return nil
	case *pb.Command_ReplayDeadLetters:
		r := c.ReplayDeadLetters
		if !webhookNameRE.MatchString(r.GetName()) {
			return invalid("webhook name %q: use 1-63 letters, digits, '.', '_' or '-'", r.GetName())
		}
		for _, id := range r.GetIds() {
			if _, _, err := consensus.ParseEventID(id); err != nil {
				return invalid("%v", err)
			}
		}
		return nil
	case *pb.Command_WebhookProgress:
		p := c.WebhookProgress
		if !webhookNameRE.MatchString(p.GetName()) || p.GetIndex() == 0 {
			return invalid("webhook progress: a webhook name and an index")
		}
		return nil
	case *pb.Command_SetRegions:
		if !slices.Equal(c.SetRegions.GetRegions(), n.cfg.regionNames()) {
			return invalid("regions %v: the cluster's configured regions are %v", c.SetRegions.GetRegions(), n.cfg.regionNames())
		}
		return nil
	default:
		if isAccessIntent(cmd) {
			return invalid("users, teams, robots and grants change through ManageAccess (meridian user|team|robot|access), not Commit")
		}
		return invalid("no command, or a command this node does not know (%T)", cmd.GetIntent())
	}
}

func (n *Node) validatePutManifest(m *pb.PutManifest) error {
	if err := firstErr(checkRepo(m.GetRepository()), checkDigest("digest", m.GetDigest())); err != nil {
		return err
	}
	if len(m.Content) == 0 {
		return invalid("manifest %s: no content", m.Digest)
	}
	if max := int64(n.cfg.MaxManifestSize); int64(len(m.Content)) > max {
		return invalid("manifest %s: %d bytes, more than the %d bytes max_manifest_size allows", m.Digest, len(m.Content), max)
	}
	d, _ := gateway.ParseDigest(m.Digest)
	if got := d.Algorithm().FromBytes(m.Content); got != d {
		return invalid("manifest content hashes to %s, not %s", got, d)
	}
	if err := firstErr(checkText("media_type", m.MediaType, true), checkText("artifact_type", m.ArtifactType, false)); err != nil {
		return err
	}
	for _, t := range m.Tags {
		if err := checkTag(t); err != nil {
			return err
		}
	}
	if m.IfMatch != "" {
		if err := checkDigest("if_match", m.IfMatch); err != nil {
			return err
		}
	}
	if m.Subject != "" {
		if err := checkDigest("subject", m.Subject); err != nil {
			return err
		}
	}
	for _, list := range [][]string{m.Blobs, m.Manifests} {
		for _, b := range list {
			if err := checkDigest("referenced digest", b); err != nil {
				return err
			}
		}
	}
	// Annotations come out of the manifest: they cannot outweigh it.
	size := 0
	for k, v := range m.Annotations {
		size += len(k) + len(v)
	}
	if size > len(m.Content) {
		return invalid("annotations of %d bytes in a manifest of %d", size, len(m.Content))
	}
	return nil
}

func (n *Node) checkSize(size int64) error {
	if size < 0 {
		return invalid("size %d: negative", size)
	}
	if max := int64(n.cfg.MaxBlobSize); max > 0 && size > max {
		return invalid("size %d: more than max_blob_size %d", size, max)
	}
	return nil
}

func (n *Node) checkRegion(region string) error {
	if !slices.Contains(n.cfg.regionNames(), region) {
		return invalid("region %q: the cluster's regions are %v", region, n.cfg.regionNames())
	}
	return nil
}

func checkRetentionRule(r *pb.RetentionRule) error {
	if r == nil {
		return invalid("no retention rule")
	}
	if r.KeepTags < 0 || r.UntaggedAfterNanos < 0 || r.KeepPulledWithinNanos < 0 {
		return invalid("retention limits cannot be negative")
	}
	if r.KeepTags == 0 && r.UntaggedAfterNanos == 0 {
		return invalid("a retention rule keeps a number of tags (--keep-tags) or deletes untagged manifests (--untagged-after), or both")
	}
	if err := checkRepoPattern(r.Repositories); err != nil {
		return err
	}
	if len(r.ProtectedTags) > 100 {
		return invalid("at most 100 protected tag patterns")
	}
	for _, g := range append([]string{r.TagPattern}, r.ProtectedTags...) {
		if err := checkText("tag pattern", g, false); err != nil {
			return err
		}
		if !pb.ValidGlob(g) {
			return invalid("tag pattern %q: not a valid glob", g)
		}
	}
	return nil
}

func checkRepoPattern(p string) error {
	if err := checkText("repositories", p, false); err != nil {
		return err
	}
	if !pb.ValidGlob(p) {
		return invalid("repositories %q: not a valid pattern", p)
	}
	return nil
}

func checkImmutableRule(r *pb.ImmutableRule) error {
	if r == nil || r.Tags == "" {
		return invalid("an immutability rule names a tag pattern (--tags)")
	}
	if err := firstErr(checkText("repositories", r.Repositories, false), checkText("tags", r.Tags, true)); err != nil {
		return err
	}
	if !pb.ValidGlob(r.Repositories) || !pb.ValidGlob(r.Tags) {
		return invalid("immutability rule %s: not a valid pattern", r.Describe())
	}
	return nil
}

func checkRepo(name string) error {
	if err := gateway.ValidateName(name); err != nil {
		return invalid("%v", err)
	}
	return nil
}

func checkTag(tag string) error {
	if err := gateway.ValidateTag(tag); err != nil {
		return invalid("%v", err)
	}
	return nil
}

func checkDigest(field, s string) error {
	if _, err := gateway.ParseDigest(s); err != nil {
		return invalid("%s: %v", field, err)
	}
	return nil
}

// checkText bounds a free-text field and keeps control characters out.
func checkText(field, s string, required bool) error {
	if required && s == "" {
		return invalid("%s is required", field)
	}
	if len(s) > maxTextField {
		return invalid("%s: %d bytes, at most %d", field, len(s), maxTextField)
	}
	for _, r := range s {
		if unicode.IsControl(r) || r == unicode.ReplacementChar {
			return invalid("%s %q: control or invalid characters", field, s)
		}
	}
	return nil
}

func firstErr(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// gatewayIntents are what a gateway may ask a node to commit.
func gatewayIntent(cmd *pb.Command) bool {
	switch cmd.GetIntent().(type) {
	case *pb.Command_PutManifest, *pb.Command_DeleteManifest, *pb.Command_DeleteTag,
		*pb.Command_LinkBlob, *pb.Command_UnlinkBlob, *pb.Command_RecordPulls:
		return true
	}
	return false
}

// mayCommit checks a Gateway/Commit: it carries repository writes only,
// whoever calls. Everything else has its own path: placements, removals
// and regions come from nodes through Member/Forward, policies, deletes of
// repositories and lifecycle rules through the Admin service, which
// checks for a cluster admin even in plaintext. A gateway certificate may
// not send anything else, and a node has no reason to.
func (n *Node) mayCommit(ctx context.Context, cmd *pb.Command) error {
	if gatewayIntent(cmd) || cmd.GetIntent() == nil || isAccessIntent(cmd) {
		// An empty command fails validation with its reason, and an access
		// change with the way to make it.
		return nil
	}
	who := "this caller"
	if id, ok := transport.Caller(ctx); ok {
		who = id.String()
	}
	return status.Error(codes.PermissionDenied, fmt.Sprintf("%s may not commit %T through Gateway/Commit: it takes repository writes only", who, cmd.GetIntent()))
}
