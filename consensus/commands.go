package consensus

import (
	"context"
	"fmt"
	"time"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// Entry builds the log entry of a validated command: the log format its
// command needs (CommandVersion, so that older binaries keep applying the
// commands they know) and the proposer's time, fixed here so every replica
// applies the same thing. It is the one place a command becomes a LogEntry; callers
// outside this package send commands, never entries. actor (who asked; nil
// for the cluster's own housekeeping) rides in the same entry, and the
// audit log is written from it as the entry applies.
func Entry(cmd *pb.Command, actor *pb.Actor, now time.Time) (*pb.LogEntry, error) {
	e := &pb.LogEntry{Version: CommandVersion(cmd), TimeUnixNano: now.UnixNano(), Actor: actor}
	switch c := cmd.GetIntent().(type) {
	case *pb.Command_PutManifest:
		e.Command = &pb.LogEntry_PutManifest{PutManifest: c.PutManifest}
	case *pb.Command_DeleteManifest:
		e.Command = &pb.LogEntry_DeleteManifest{DeleteManifest: c.DeleteManifest}
	case *pb.Command_DeleteTag:
		e.Command = &pb.LogEntry_DeleteTag{DeleteTag: c.DeleteTag}
	case *pb.Command_LinkBlob:
		e.Command = &pb.LogEntry_LinkBlob{LinkBlob: c.LinkBlob}
	case *pb.Command_UnlinkBlob:
		e.Command = &pb.LogEntry_UnlinkBlob{UnlinkBlob: c.UnlinkBlob}
	case *pb.Command_PlaceBlob:
		e.Command = &pb.LogEntry_PlaceBlob{PlaceBlob: c.PlaceBlob}
	case *pb.Command_SetPolicy:
		e.Command = &pb.LogEntry_SetPolicy{SetPolicy: c.SetPolicy}
	case *pb.Command_DeletePolicy:
		e.Command = &pb.LogEntry_DeletePolicy{DeletePolicy: c.DeletePolicy}
	case *pb.Command_SetRegions:
		e.Command = &pb.LogEntry_SetRegions{SetRegions: c.SetRegions}
	case *pb.Command_PutUser:
		e.Command = &pb.LogEntry_PutUser{PutUser: c.PutUser}
	case *pb.Command_DeleteUser:
		e.Command = &pb.LogEntry_DeleteUser{DeleteUser: c.DeleteUser}
	case *pb.Command_PutTeam:
		e.Command = &pb.LogEntry_PutTeam{PutTeam: c.PutTeam}
	case *pb.Command_DeleteTeam:
		e.Command = &pb.LogEntry_DeleteTeam{DeleteTeam: c.DeleteTeam}
	case *pb.Command_PutRobot:
		e.Command = &pb.LogEntry_PutRobot{PutRobot: c.PutRobot}
	case *pb.Command_RevokeRobot:
		e.Command = &pb.LogEntry_RevokeRobot{RevokeRobot: c.RevokeRobot}
	case *pb.Command_PutGrant:
		e.Command = &pb.LogEntry_PutGrant{PutGrant: c.PutGrant}
	case *pb.Command_DeleteGrant:
		e.Command = &pb.LogEntry_DeleteGrant{DeleteGrant: c.DeleteGrant}
	case *pb.Command_DeleteRepository:
		e.Command = &pb.LogEntry_DeleteRepository{DeleteRepository: c.DeleteRepository}
	case *pb.Command_BlobRemoved:
		e.Command = &pb.LogEntry_BlobRemoved{BlobRemoved: c.BlobRemoved}
	case *pb.Command_SetImmutableRule:
		e.Command = &pb.LogEntry_SetImmutableRule{SetImmutableRule: c.SetImmutableRule}
	case *pb.Command_DeleteImmutableRule:
		e.Command = &pb.LogEntry_DeleteImmutableRule{DeleteImmutableRule: c.DeleteImmutableRule}
	case *pb.Command_SetQuota:
		e.Command = &pb.LogEntry_SetQuota{SetQuota: c.SetQuota}
	case *pb.Command_DeleteQuota:
		e.Command = &pb.LogEntry_DeleteQuota{DeleteQuota: c.DeleteQuota}
	case *pb.Command_SetRetentionRule:
		e.Command = &pb.LogEntry_SetRetentionRule{SetRetentionRule: c.SetRetentionRule}
	case *pb.Command_DeleteRetentionRule:
		e.Command = &pb.LogEntry_DeleteRetentionRule{DeleteRetentionRule: c.DeleteRetentionRule}
	case *pb.Command_RecordPulls:
		e.Command = &pb.LogEntry_RecordPulls{RecordPulls: c.RecordPulls}
	case *pb.Command_PutWebhook:
		e.Command = &pb.LogEntry_PutWebhook{PutWebhook: c.PutWebhook}
	case *pb.Command_DeleteWebhook:
		e.Command = &pb.LogEntry_DeleteWebhook{DeleteWebhook: c.DeleteWebhook}
	case *pb.Command_WebhookProgress:
		e.Command = &pb.LogEntry_WebhookProgress{WebhookProgress: c.WebhookProgress}
	case *pb.Command_ReplayDeadLetters:
		e.Command = &pb.LogEntry_ReplayDeadLetters{ReplayDeadLetters: c.ReplayDeadLetters}
	default:
		return nil, fmt.Errorf("%w: no command, or one this binary does not know (%T)", pb.ErrInvalidArgument, cmd.GetIntent())
	}
	return e, nil
}

// Commit builds the entry of a validated command and proposes it; see
// Propose for the answers. It also returns the entry's log index once
// applied (with a business error too: the entry is in the log), so that a
// follower that forwarded the command can wait until it applied it too.
func (n *Node) Commit(ctx context.Context, cmd *pb.Command, actor *pb.Actor) (uint64, error) {
	e, err := Entry(cmd, actor, time.Now())
	if err != nil {
		return 0, err
	}
	return n.propose(ctx, e)
}
