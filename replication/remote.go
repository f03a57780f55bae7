package replication

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// Remote is a Driver for a region whose store this process cannot reach
// itself (a file:// directory of another region): every call goes over gRPC
// to a node of that region, which serves its own driver (BlobStoreServer).
//
// Bytes stream both ways in messages of remoteChunkSize; no call holds a
// whole blob. A WriteUpload is all or nothing across the wire too: if the
// reader fails, the client aborts the chunk and returns only once the node
// has rolled it back; if the connection breaks, the node's driver sees its
// reader fail and rolls the chunk back on its own. As with any remote call,
// a connection lost after the node finished a write but before its answer
// arrived leaves the chunk written and the caller with an error; the caller
// learns the truth from UploadSize (a retry at the old offset is refused).
//
// Transport failures keep their gRPC status in the error chain (status.Code
// finds it) and never match a Driver sentinel: a node that is down is not a
// missing blob.
type Remote struct {
	region string
	conns  func(ctx context.Context) (grpc.ClientConnInterface, error)
}

var _ Driver = (*Remote)(nil)

// ErrRegionNotServed means the node reached serves no blob store for the
// requested region (the caller picked a node of another region, or the
// cluster's region lists disagree). Another node may serve it.
var ErrRegionNotServed = errors.New("replication: node serves no store for this region")

// errChunkAborted travels from a client whose reader failed to the node, and
// back as the node's acknowledgement that the chunk was dropped.
var errChunkAborted = errors.New("replication: chunk aborted by the client")

const (
	// remoteChunkSize is the data carried by one message in either direction.
	remoteChunkSize = 256 << 10
	// remoteReadChunkSize is the data of one message a node streams to a
	// reader: larger than remoteChunkSize, since fewer messages cost less
	// framing, allocation and wake-ups per byte. Readers accept any size up
	// to the connection's message limit.
	remoteReadChunkSize = 1 << 20
	// maxRemoteChunk is the largest data a server accepts in one message.
	maxRemoteChunk = 4 << 20

	// Flow control and socket buffers for connections carrying blob
	// streams. gRPC's defaults (a 64 KiB window grown by estimation, 32 KiB
	// read and write buffers) cost a read syscall and a wake-up per 32 KiB
	// and stall the sender until the window grows.
	remoteStreamWindow = 4 << 20
	remoteConnWindow   = 16 << 20
	remoteSocketBuffer = 256 << 10
)

// RemoteDialOptions tune a client connection that carries Remote blob
// streams: fixed flow-control windows of several MiB and larger socket
// buffers.
func RemoteDialOptions() []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithInitialWindowSize(remoteStreamWindow),
		grpc.WithInitialConnWindowSize(remoteConnWindow),
		grpc.WithReadBufferSize(remoteSocketBuffer),
		grpc.WithWriteBufferSize(remoteSocketBuffer),
	}
}

// RemoteServerOptions are RemoteDialOptions' counterpart for a server of
// BlobStoreServer (uploads stream towards it).
func RemoteServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.InitialWindowSize(remoteStreamWindow),
		grpc.InitialConnWindowSize(remoteConnWindow),
		grpc.ReadBufferSize(remoteSocketBuffer),
		grpc.WriteBufferSize(remoteSocketBuffer),
	}
}

// NewRemote returns a driver for region reached through the nodes conns
// returns. conns is called once per operation and should return a connection
// to a healthy node of that region, so a failed node is replaced by the next
// call; Remote neither retries nor picks nodes itself.
func NewRemote(region string, conns func(ctx context.Context) (grpc.ClientConnInterface, error)) *Remote {
	return &Remote{region: region, conns: conns}
}

// wireErrors is the one translation between Driver errors and the wire, read
// both ways: a server answers an error matching err (errors.Is, first row
// wins) with code and a BlobStoreError detail carrying reason; a client turns
// that reason back into err. Only the detail is trusted on the way back, since
// gRPC and proxies produce codes such as NotFound or ResourceExhausted on
// their own.
var wireErrors = []struct {
	err    error
	reason pb.BlobStoreReason
	code   codes.Code
}{
	{ErrBlobNotFound, pb.BlobStoreReason_BLOB_STORE_REASON_BLOB_NOT_FOUND, codes.NotFound},
	{ErrUploadNotFound, pb.BlobStoreReason_BLOB_STORE_REASON_UPLOAD_NOT_FOUND, codes.NotFound},
	{ErrUploadOffset, pb.BlobStoreReason_BLOB_STORE_REASON_UPLOAD_OFFSET, codes.OutOfRange},
	{ErrStorageFull, pb.BlobStoreReason_BLOB_STORE_REASON_STORAGE_FULL, codes.ResourceExhausted},
	{ErrInvalidDigest, pb.BlobStoreReason_BLOB_STORE_REASON_INVALID_DIGEST, codes.InvalidArgument},
	{ErrRegionNotServed, pb.BlobStoreReason_BLOB_STORE_REASON_REGION_NOT_SERVED, codes.FailedPrecondition},
	{errChunkAborted, pb.BlobStoreReason_BLOB_STORE_REASON_CHUNK_ABORTED, codes.Aborted},
}

// toStatus turns a driver error into the status a BlobStoreServer answers.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	for _, w := range wireErrors {
		if errors.Is(err, w.err) {
			st, derr := status.New(w.code, err.Error()).WithDetails(&pb.BlobStoreError{Reason: w.reason})
			if derr != nil {
				return status.Error(w.code, err.Error())
			}
			return st.Err()
		}
	}
	if errors.Is(err, errChunkTooLarge) {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	return status.FromContextError(err).Err() // Unknown unless a context error
}

// remoteError is a failed call as a Remote returns it: the domain sentinel
// the server named, if any, the caller's context error when that is what
// ended the call, and always the gRPC status.
type remoteError struct {
	region, op string
	st         *status.Status
	is         []error
	named      bool // the node named a domain error; its message says which
}

func (e *remoteError) Error() string {
	msg := e.st.Message()
	if !e.named {
		msg = e.st.Code().String() + ": " + msg
	}
	return fmt.Sprintf("replication: region %s (remote): %s: %s", e.region, e.op, msg)
}

func (e *remoteError) Unwrap() []error {
	return append(e.is[:len(e.is):len(e.is)], e.st.Err())
}

// fromStatus turns a failed call into the error a Remote returns.
func (r *Remote) fromStatus(ctx context.Context, op string, err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return fmt.Errorf("replication: region %s (remote): %s: %w", r.region, op, err)
	}
	e := &remoteError{region: r.region, op: op, st: st}
	for _, d := range st.Details() {
		if be, ok := d.(*pb.BlobStoreError); ok {
			for _, w := range wireErrors {
				if w.reason == be.GetReason() {
					e.is, e.named = append(e.is, w.err), true
				}
			}
		}
	}
	if c := st.Code(); (c == codes.Canceled || c == codes.DeadlineExceeded) && ctx.Err() != nil {
		e.is = append(e.is, ctx.Err())
	}
	return e
}

func (r *Remote) client(ctx context.Context) (pb.BlobStoreClient, error) {
	cc, err := r.conns(ctx)
	if err != nil {
		return nil, fmt.Errorf("replication: region %s (remote): no node to reach: %w", r.region, err)
	}
	return pb.NewBlobStoreClient(cc), nil
}

// Proto3 strings must be UTF-8, and nothing else can be a valid upload id or
// digest, so such values are refused here with the error the node's driver
// would give rather than failing to marshal.

func checkWireID(id string) error {
	if !utf8.ValidString(id) {
		return fmt.Errorf("%w: malformed id %q", ErrUploadNotFound, id)
	}
	return nil
}

func checkWireDigest(dgst digest.Digest) error {
	if !utf8.ValidString(string(dgst)) {
		return fmt.Errorf("%w %q: not UTF-8", ErrInvalidDigest, string(dgst))
	}
	return nil
}

// Stat implements Driver.
func (r *Remote) Stat(ctx context.Context, dgst digest.Digest) (int64, error) {
	if err := checkWireDigest(dgst); err != nil {
		return 0, err
	}
	c, err := r.client(ctx)
	if err != nil {
		return 0, err
	}
	resp, err := c.Stat(ctx, &pb.StatBlobRequest{Region: r.region, Digest: string(dgst)})
	if err != nil {
		return 0, r.fromStatus(ctx, "stat "+string(dgst), err)
	}
	return resp.GetSize(), nil
}

// Open implements Driver. It returns once the node has opened the blob, so a
// missing blob is reported here rather than by the first Read. The reader
// must be closed; Close cancels the stream.
func (r *Remote) Open(ctx context.Context, dgst digest.Digest, offset int64) (io.ReadCloser, error) {
	if err := checkWireDigest(dgst); err != nil {
		return nil, err
	}
	c, err := r.client(ctx)
	if err != nil {
		return nil, err
	}
	req := &pb.OpenBlobRequest{Region: r.region, Digest: string(dgst), Offset: offset}
	return r.openStream(ctx, "open "+string(dgst), func(ctx context.Context) (grpc.ServerStreamingClient[pb.BlobChunk], error) {
		return c.Open(ctx, req)
	})
}

// Delete implements Driver.
func (r *Remote) Delete(ctx context.Context, dgst digest.Digest) error {
	if err := checkWireDigest(dgst); err != nil {
		return err
	}
	c, err := r.client(ctx)
	if err != nil {
		return err
	}
	_, err = c.Delete(ctx, &pb.DeleteBlobRequest{Region: r.region, Digest: string(dgst)})
	return r.fromStatus(ctx, "delete "+string(dgst), err)
}

// StartUpload implements Driver.
func (r *Remote) StartUpload(ctx context.Context) (string, error) {
	c, err := r.client(ctx)
	if err != nil {
		return "", err
	}
	resp, err := c.StartUpload(ctx, &pb.StartUploadRequest{Region: r.region})
	if err != nil {
		return "", r.fromStatus(ctx, "start upload", err)
	}
	return resp.GetUploadId(), nil
}

// WriteUpload implements Driver, streaming src to the node in messages of
// remoteChunkSize. If src fails, it sends an abort and waits for the node to
// confirm the chunk was dropped before returning src's error.
func (r *Remote) WriteUpload(ctx context.Context, id string, offset int64, src io.Reader) (int64, error) {
	if err := checkWireID(id); err != nil {
		return 0, err
	}
	c, err := r.client(ctx)
	if err != nil {
		return 0, err
	}
	op := "write upload " + id
	// Leaving without a clean close cancels the stream, which the node sees
	// as a broken chunk and rolls back.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.WriteUpload(ctx)
	if err != nil {
		return 0, r.fromStatus(ctx, op, err)
	}
	if err := stream.Send(&pb.WriteUploadRequest{Region: r.region, UploadId: id, Offset: offset}); err != nil {
		return 0, r.closeWrite(ctx, op, stream)
	}
	var sent int64
	for {
		// A fresh buffer per message: gRPC may keep a sent message.
		buf := make([]byte, remoteChunkSize)
		n, rerr := readChunk(src, buf)
		if n > 0 {
			if err := stream.Send(&pb.WriteUploadRequest{Data: buf[:n]}); err != nil {
				// The node ended the call early (it refused the chunk) or
				// the stream broke: its status says which.
				return 0, r.closeWrite(ctx, op, stream)
			}
			sent += int64(n)
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return 0, r.abortWrite(ctx, op, stream, sent, rerr)
		}
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		return 0, r.fromStatus(ctx, op, err)
	}
	return resp.GetWritten(), nil
}

// closeWrite returns the status that ended a WriteUpload stream early.
func (r *Remote) closeWrite(ctx context.Context, op string, stream grpc.ClientStreamingClient[pb.WriteUploadRequest, pb.WriteUploadResponse]) error {
	_, err := stream.CloseAndRecv()
	if err == nil {
		err = status.Error(codes.Internal, "stream ended before the chunk was sent")
	}
	return r.fromStatus(ctx, op, err)
}

// abortWrite asks the node to drop the chunk and waits until it has. The
// error wraps src's failure, and the node's answer too when that is anything
// other than the expected acknowledgement.
func (r *Remote) abortWrite(ctx context.Context, op string, stream grpc.ClientStreamingClient[pb.WriteUploadRequest, pb.WriteUploadResponse], sent int64, rerr error) error {
	// A failed Send means the stream already ended; CloseAndRecv reports how.
	_ = stream.Send(&pb.WriteUploadRequest{Abort: true})
	_, err := stream.CloseAndRecv()
	failed := fmt.Errorf("replication: region %s (remote): %s: reading input failed after %d bytes, chunk dropped: %w", r.region, op, sent, rerr)
	if err == nil {
		return failed
	}
	if err := r.fromStatus(ctx, op, err); !errors.Is(err, errChunkAborted) {
		return fmt.Errorf("%w (node: %w)", failed, err)
	}
	return failed
}

// readChunk fills buf from r as far as r allows, so that each message is
// full however small r's reads are. It returns io.EOF only with the last
// bytes or none.
func readChunk(r io.Reader, buf []byte) (int, error) {
	n := 0
	for n < len(buf) {
		m, err := r.Read(buf[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// UploadSize implements Driver.
func (r *Remote) UploadSize(ctx context.Context, id string) (int64, error) {
	if err := checkWireID(id); err != nil {
		return 0, err
	}
	c, err := r.client(ctx)
	if err != nil {
		return 0, err
	}
	resp, err := c.UploadSize(ctx, &pb.UploadSizeRequest{Region: r.region, UploadId: id})
	if err != nil {
		return 0, r.fromStatus(ctx, "upload size "+id, err)
	}
	return resp.GetSize(), nil
}

// OpenUpload implements Driver; the reader must be closed.
func (r *Remote) OpenUpload(ctx context.Context, id string) (io.ReadCloser, error) {
	if err := checkWireID(id); err != nil {
		return nil, err
	}
	c, err := r.client(ctx)
	if err != nil {
		return nil, err
	}
	req := &pb.OpenUploadRequest{Region: r.region, UploadId: id}
	return r.openStream(ctx, "open upload "+id, func(ctx context.Context) (grpc.ServerStreamingClient[pb.BlobChunk], error) {
		return c.OpenUpload(ctx, req)
	})
}

// CommitUpload implements Driver.
func (r *Remote) CommitUpload(ctx context.Context, id string, size int64, dgst digest.Digest) error {
	if err := checkWireDigest(dgst); err != nil {
		return err
	}
	if err := checkWireID(id); err != nil {
		return err
	}
	c, err := r.client(ctx)
	if err != nil {
		return err
	}
	_, err = c.CommitUpload(ctx, &pb.CommitUploadRequest{Region: r.region, UploadId: id, Size: size, Digest: string(dgst)})
	return r.fromStatus(ctx, "commit upload "+id, err)
}

// CancelUpload implements Driver.
func (r *Remote) CancelUpload(ctx context.Context, id string) error {
	if err := checkWireID(id); err != nil {
		return err
	}
	c, err := r.client(ctx)
	if err != nil {
		return err
	}
	_, err = c.CancelUpload(ctx, &pb.CancelUploadRequest{Region: r.region, UploadId: id})
	return r.fromStatus(ctx, "cancel upload "+id, err)
}

// PurgeUploads implements Driver. When it fails, the count of uploads the
// node removed before failing is lost, and 0 is returned.
func (r *Remote) PurgeUploads(ctx context.Context, olderThan time.Time) (int, error) {
	c, err := r.client(ctx)
	if err != nil {
		return 0, err
	}
	resp, err := c.PurgeUploads(ctx, &pb.PurgeUploadsRequest{Region: r.region, OlderThanUnixNano: unixNano(olderThan)})
	if err != nil {
		return 0, r.fromStatus(ctx, "purge uploads", err)
	}
	return int(resp.GetRemoved()), nil
}

// unixNano is t.UnixNano, clamped to what an int64 holds instead of
// overflowing (time.Time{} is far before 1678).
func unixNano(t time.Time) int64 {
	switch {
	case t.Before(time.Unix(0, math.MinInt64)):
		return math.MinInt64
	case t.After(time.Unix(0, math.MaxInt64)):
		return math.MaxInt64
	}
	return t.UnixNano()
}

// openStream starts a read stream and waits for its first message, which the
// node sends once the blob or upload is open.
func (r *Remote) openStream(ctx context.Context, op string, start func(context.Context) (grpc.ServerStreamingClient[pb.BlobChunk], error)) (io.ReadCloser, error) {
	ctx, cancel := context.WithCancel(ctx)
	stream, err := start(ctx)
	if err != nil {
		cancel()
		return nil, r.fromStatus(ctx, op, err)
	}
	first, err := stream.Recv()
	if err == io.EOF {
		err = status.Error(codes.Internal, "stream ended without its first message")
	}
	if err != nil {
		cancel()
		return nil, r.fromStatus(ctx, op, err)
	}
	sr := &streamReader{r: r, ctx: ctx, op: op, stream: stream, cancel: cancel, buf: first.GetData()}
	if n := first.GetLength(); n >= 0 {
		sr.known, sr.remaining = true, n
		if int64(len(sr.buf)) > n {
			cancel()
			return nil, fmt.Errorf("replication: region %s (remote): %s: node sent more bytes than it announced", r.region, op)
		}
	}
	return sr, nil
}

// streamReader reads a BlobChunk stream. It checks the byte count against the
// length the node announced, so a stream cut short never reads as complete.
type streamReader struct {
	r      *Remote
	ctx    context.Context
	op     string
	stream grpc.ServerStreamingClient[pb.BlobChunk]
	cancel context.CancelFunc

	buf       []byte
	known     bool  // whether the node announced the length
	remaining int64 // bytes still to come, buf included, if known
	err       error
	closed    atomic.Bool
}

var errReaderClosed = errors.New("replication: read from a closed remote reader")

func (sr *streamReader) Read(p []byte) (int, error) {
	if sr.closed.Load() {
		return 0, errReaderClosed
	}
	for len(sr.buf) == 0 {
		if sr.err != nil {
			return 0, sr.err
		}
		msg, err := sr.stream.Recv()
		switch {
		case err == io.EOF && sr.known && sr.remaining != 0:
			sr.err = fmt.Errorf("replication: region %s (remote): %s: %w: stream ended %d bytes short", sr.r.region, sr.op, io.ErrUnexpectedEOF, sr.remaining)
		case err == io.EOF:
			sr.err = io.EOF
		case err != nil:
			sr.err = sr.r.fromStatus(sr.ctx, sr.op, err)
		case sr.known && int64(len(msg.GetData())) > sr.remaining:
			sr.err = fmt.Errorf("replication: region %s (remote): %s: node sent more bytes than it announced", sr.r.region, sr.op)
		default:
			sr.buf = msg.GetData()
		}
	}
	n := copy(p, sr.buf)
	sr.buf = sr.buf[n:]
	sr.remaining -= int64(n)
	return n, nil
}

// Close cancels the stream. It is idempotent, and safe to call while a Read
// is blocked (which it ends).
func (sr *streamReader) Close() error {
	sr.closed.Store(true)
	sr.cancel()
	return nil
}
