package replication

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// BlobStoreServer serves local drivers, one per region, to Remote drivers in
// other processes (the BlobStore gRPC service). It validates nothing itself
// beyond message sizes: ids, digests and offsets go to the driver, which
// checks them.
type BlobStoreServer struct {
	pb.UnimplementedBlobStoreServer
	drivers map[string]Driver
	served  string // the regions, for error messages
}

// NewBlobStoreServer returns a server for drivers, keyed by region name.
// Calls naming any other region fail with ErrRegionNotServed.
func NewBlobStoreServer(drivers map[string]Driver) *BlobStoreServer {
	return &BlobStoreServer{
		drivers: maps.Clone(drivers),
		served:  strings.Join(slices.Sorted(maps.Keys(drivers)), ", "),
	}
}

var (
	// errChunkTooLarge refuses a WriteUpload message over maxRemoteChunk.
	errChunkTooLarge = errors.New("replication: message carries more than the largest chunk a node accepts")
	// errStreamBroken is what the driver reads when the client's stream ends
	// without a clean close.
	errStreamBroken = errors.New("replication: client stream broke before the chunk ended")
	// errChunkUnread tells the stream pump that the driver stopped reading.
	errChunkUnread = errors.New("replication: driver stopped reading the chunk")
)

func (s *BlobStoreServer) driver(region string) (Driver, error) {
	d, ok := s.drivers[region]
	if !ok {
		return nil, fmt.Errorf("%w: %q (this node serves: %s)", ErrRegionNotServed, region, s.served)
	}
	return d, nil
}

// Stat implements pb.BlobStoreServer.
func (s *BlobStoreServer) Stat(ctx context.Context, req *pb.StatBlobRequest) (*pb.StatBlobResponse, error) {
	d, err := s.driver(req.GetRegion())
	if err != nil {
		return nil, toStatus(err)
	}
	size, err := d.Stat(ctx, digest.Digest(req.GetDigest()))
	if err != nil {
		return nil, toStatus(err)
	}
	return &pb.StatBlobResponse{Size: size}, nil
}

// Open implements pb.BlobStoreServer.
func (s *BlobStoreServer) Open(req *pb.OpenBlobRequest, stream pb.BlobStore_OpenServer) error {
	d, err := s.driver(req.GetRegion())
	if err != nil {
		return toStatus(err)
	}
	rc, err := d.Open(stream.Context(), digest.Digest(req.GetDigest()), req.GetOffset())
	if err != nil {
		return toStatus(err)
	}
	defer rc.Close()
	length := int64(-1)
	if f, ok := rc.(interface{ Stat() (fs.FileInfo, error) }); ok {
		// Blobs never change, so a file's size now is the stream's end.
		if fi, err := f.Stat(); err == nil && fi.Mode().IsRegular() {
			length = fi.Size() - req.GetOffset()
		}
	}
	return sendStream(rc, length, remoteReadChunkSize, stream)
}

// Delete implements pb.BlobStoreServer.
func (s *BlobStoreServer) Delete(ctx context.Context, req *pb.DeleteBlobRequest) (*pb.DeleteBlobResponse, error) {
	d, err := s.driver(req.GetRegion())
	if err != nil {
		return nil, toStatus(err)
	}
	if err := d.Delete(ctx, digest.Digest(req.GetDigest())); err != nil {
		return nil, toStatus(err)
	}
	return &pb.DeleteBlobResponse{}, nil
}

// StartUpload implements pb.BlobStoreServer.
func (s *BlobStoreServer) StartUpload(ctx context.Context, req *pb.StartUploadRequest) (*pb.StartUploadResponse, error) {
	d, err := s.driver(req.GetRegion())
	if err != nil {
		return nil, toStatus(err)
	}
	id, err := d.StartUpload(ctx)
	if err != nil {
		return nil, toStatus(err)
	}
	return &pb.StartUploadResponse{UploadId: id}, nil
}

// WriteUpload implements pb.BlobStoreServer. The stream is piped into the
// driver's WriteUpload, so anything but a clean end of the stream (the client
// aborts, cancels, or its connection dies) is a reader error to the driver,
// which drops the whole chunk: all or nothing holds across the wire.
func (s *BlobStoreServer) WriteUpload(stream pb.BlobStore_WriteUploadServer) error {
	first, err := stream.Recv()
	if err == io.EOF {
		return status.Error(codes.InvalidArgument, "replication: write upload: empty stream")
	}
	if err != nil {
		return err
	}
	d, err := s.driver(first.GetRegion())
	if err != nil {
		return toStatus(err)
	}
	pr, pw := io.Pipe()
	go pumpChunk(stream, first, pw)
	n, err := d.WriteUpload(stream.Context(), first.GetUploadId(), first.GetOffset(), pr)
	// A driver that refused the chunk stops reading early; this frees the
	// pump, which the end of the call then frees from Recv.
	pr.CloseWithError(errChunkUnread)
	if err != nil {
		return toStatus(err)
	}
	return stream.SendAndClose(&pb.WriteUploadResponse{Written: n})
}

// pumpChunk feeds the data of a WriteUpload stream, starting with msg, into
// pw, and closes pw with io.EOF only when the client half-closed the stream.
func pumpChunk(stream pb.BlobStore_WriteUploadServer, msg *pb.WriteUploadRequest, pw *io.PipeWriter) {
	for {
		switch data := msg.GetData(); {
		case msg.GetAbort():
			pw.CloseWithError(errChunkAborted)
			return
		case len(data) > maxRemoteChunk:
			pw.CloseWithError(fmt.Errorf("%w: %d bytes, limit %d", errChunkTooLarge, len(data), maxRemoteChunk))
			return
		case len(data) > 0:
			if _, err := pw.Write(data); err != nil {
				return // the driver stopped reading
			}
		}
		var err error
		msg, err = stream.Recv()
		if err == io.EOF {
			pw.Close()
			return
		}
		if err != nil {
			pw.CloseWithError(fmt.Errorf("%w: %w", errStreamBroken, err))
			return
		}
	}
}

// UploadSize implements pb.BlobStoreServer.
func (s *BlobStoreServer) UploadSize(ctx context.Context, req *pb.UploadSizeRequest) (*pb.UploadSizeResponse, error) {
	d, err := s.driver(req.GetRegion())
	if err != nil {
		return nil, toStatus(err)
	}
	size, err := d.UploadSize(ctx, req.GetUploadId())
	if err != nil {
		return nil, toStatus(err)
	}
	return &pb.UploadSizeResponse{Size: size}, nil
}

// OpenUpload implements pb.BlobStoreServer. The length is not announced: an
// upload may grow while it is read.
func (s *BlobStoreServer) OpenUpload(req *pb.OpenUploadRequest, stream pb.BlobStore_OpenUploadServer) error {
	d, err := s.driver(req.GetRegion())
	if err != nil {
		return toStatus(err)
	}
	rc, err := d.OpenUpload(stream.Context(), req.GetUploadId())
	if err != nil {
		return toStatus(err)
	}
	defer rc.Close()
	return sendStream(rc, -1, remoteReadChunkSize, stream)
}

// CommitUpload implements pb.BlobStoreServer.
func (s *BlobStoreServer) CommitUpload(ctx context.Context, req *pb.CommitUploadRequest) (*pb.CommitUploadResponse, error) {
	d, err := s.driver(req.GetRegion())
	if err != nil {
		return nil, toStatus(err)
	}
	if err := d.CommitUpload(ctx, req.GetUploadId(), req.GetSize(), digest.Digest(req.GetDigest())); err != nil {
		return nil, toStatus(err)
	}
	return &pb.CommitUploadResponse{}, nil
}

// CancelUpload implements pb.BlobStoreServer.
func (s *BlobStoreServer) CancelUpload(ctx context.Context, req *pb.CancelUploadRequest) (*pb.CancelUploadResponse, error) {
	d, err := s.driver(req.GetRegion())
	if err != nil {
		return nil, toStatus(err)
	}
	if err := d.CancelUpload(ctx, req.GetUploadId()); err != nil {
		return nil, toStatus(err)
	}
	return &pb.CancelUploadResponse{}, nil
}

// PurgeUploads implements pb.BlobStoreServer.
func (s *BlobStoreServer) PurgeUploads(ctx context.Context, req *pb.PurgeUploadsRequest) (*pb.PurgeUploadsResponse, error) {
	d, err := s.driver(req.GetRegion())
	if err != nil {
		return nil, toStatus(err)
	}
	n, err := d.PurgeUploads(ctx, time.Unix(0, req.GetOlderThanUnixNano()))
	if err != nil {
		return nil, toStatus(err)
	}
	return &pb.PurgeUploadsResponse{Removed: int64(n)}, nil
}

// sendStream sends r in messages of chunk bytes, the first one (sent even
// when r is empty) announcing length. Only one message is in memory at a
// time; Send blocks while the client's flow-control window is full.
func sendStream(r io.Reader, length int64, chunk int, stream interface{ Send(*pb.BlobChunk) error }) error {
	for first := true; ; first = false {
		// A fresh buffer per message: gRPC may keep a sent message.
		buf := make([]byte, chunk)
		n, rerr := readChunk(r, buf)
		if rerr != nil && rerr != io.EOF {
			return toStatus(fmt.Errorf("replication: reading for the stream: %w", rerr))
		}
		if n > 0 || first {
			msg := &pb.BlobChunk{Data: buf[:n]}
			if first {
				msg.Length = length
			}
			if err := stream.Send(msg); err != nil {
				return err
			}
		}
		if rerr == io.EOF {
			return nil
		}
	}
}
