package node

import (
	"time"

	"github.com/meridian-registry/meridian/consensus"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// backupChunk is how much of the file one BackupChunk carries: well under
// gRPC's 4 MiB message limit, large enough to keep the stream busy.
const backupChunk = 256 << 10

// Backup streams a backup file of the replicated state (`meridian
// backup`). It is linearizable: the read index it waits for is taken after
// the call arrived, so the state holds every write acknowledged before,
// and the state and blob list come from one pinned snapshot at or after
// that index.
func (s adminServer) Backup(_ *pb.BackupRequest, stream pb.Admin_BackupServer) error {
	ctx := stream.Context()
	index, err := s.n.readIndexes.ReadIndex(ctx)
	if err != nil {
		return pb.ToStatus(err)
	}
	if err := s.n.consensus.WaitApplied(ctx, index); err != nil {
		return pb.ToStatus(err)
	}
	w := &chunkWriter{send: func(b []byte) error { return stream.Send(&pb.BackupChunk{Data: b}) }}
	hdr, err := s.n.consensus.Store().WriteBackup(w, consensus.BackupInfo{
		ClusterID: s.n.cfg.ClusterID, NodeID: s.n.cfg.NodeID, NodeVersion: Version,
		ReadIndex: index, Time: time.Now(),
	})
	if err == nil {
		err = w.flush()
	}
	if err != nil {
		s.n.logger.Warn("backup failed", "err", err)
		return pb.ToStatus(err)
	}
	principal := ""
	if a := pb.ActorFrom(ctx); a != nil {
		principal = a.Principal
	}
	s.n.logger.Info("streamed a backup", "raft_index", hdr.RaftIndex, "read_index", index, "bytes", w.sent, "by", principal)
	return nil
}

// chunkWriter cuts what is written into chunks of backupChunk bytes.
type chunkWriter struct {
	send func([]byte) error
	buf  []byte
	sent int64
}

func (c *chunkWriter) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		if c.buf == nil {
			c.buf = make([]byte, 0, backupChunk)
		}
		k := min(len(p), backupChunk-len(c.buf))
		c.buf = append(c.buf, p[:k]...)
		p = p[k:]
		if len(c.buf) == backupChunk {
			if err := c.flush(); err != nil {
				return 0, err
			}
		}
	}
	return n, nil
}

func (c *chunkWriter) flush() error {
	if len(c.buf) == 0 {
		return nil
	}
	// A sent message must not change (stats handlers may read it later):
	// each chunk gets a buffer of its own.
	b := c.buf
	c.buf = nil
	c.sent += int64(len(b))
	return c.send(b)
}
