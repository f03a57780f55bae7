package replication_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
	"github.com/meridian-registry/meridian/replication"
	"github.com/meridian-registry/meridian/replication/drivertest"
)

// blobNode is a node serving drivers over gRPC on a real TCP listener, which
// a test can stop, restart on a new address, or cut off from its clients.
type blobNode struct {
	t       *testing.T
	drivers map[string]replication.Driver

	// streams counts the streaming handlers running, so a test can wait
	// until the node has finished with a broken stream.
	streams atomic.Int32

	mu   sync.Mutex
	srv  *grpc.Server
	lis  *trackingListener
	conn *grpc.ClientConn   // to the current server
	old  []*grpc.ClientConn // every connection made, closed at the end
}

func startBlobNode(t *testing.T, drivers map[string]replication.Driver) *blobNode {
	t.Helper()
	n := &blobNode{t: t, drivers: drivers}
	n.start()
	t.Cleanup(n.close)
	return n
}

// start serves on a new 127.0.0.1:0 listener and points conns at it.
func (n *blobNode) start() {
	n.t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		n.t.Fatalf("listen: %v", err)
	}
	lis := &trackingListener{Listener: l}
	srv := grpc.NewServer(
		grpc.MaxRecvMsgSize(64<<20), // as the node's server, so the driver's own limit is what a test meets
		grpc.WaitForHandlers(true),  // Stop returns once handlers (and their rollbacks) are done
		grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
			n.streams.Add(1)
			defer n.streams.Add(-1)
			return handler(srv, ss)
		}),
	)
	pb.RegisterBlobStoreServer(srv, replication.NewBlobStoreServer(n.drivers))
	go srv.Serve(lis)
	conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		n.t.Fatalf("grpc.NewClient: %v", err)
	}
	n.mu.Lock()
	n.srv, n.lis, n.conn = srv, lis, conn
	n.old = append(n.old, conn)
	n.mu.Unlock()
}

// stop stops the server, waiting for its handlers; the client connection
// stays, as a client's would when a node dies.
func (n *blobNode) stop() {
	n.mu.Lock()
	srv := n.srv
	n.mu.Unlock()
	srv.Stop()
}

func (n *blobNode) close() {
	n.stop()
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, c := range n.old {
		c.Close()
	}
}

func (n *blobNode) conns(context.Context) (grpc.ClientConnInterface, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.conn, nil
}

func (n *blobNode) remote(region string) *replication.Remote {
	return replication.NewRemote(region, n.conns)
}

// waitIdle waits until no streaming handler runs on the node.
func (n *blobNode) waitIdle() {
	n.t.Helper()
	waitFor(n.t, "the node's streaming handlers to return", func() bool { return n.streams.Load() == 0 })
}

// trackingListener remembers the connections it accepted, so a test can cut
// them all as a failing network would, while the server keeps running.
type trackingListener struct {
	net.Listener
	mu    sync.Mutex
	conns []net.Conn
}

func (l *trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.mu.Lock()
		l.conns = append(l.conns, c)
		l.mu.Unlock()
	}
	return c, err
}

func (l *trackingListener) cut() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, c := range l.conns {
		c.Close()
	}
	l.conns = nil
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestRemoteConformance runs the driver suite through a Remote, a real gRPC
// server on TCP, and a Filesystem.
func TestRemoteConformance(t *testing.T) {
	drivertest.Run(t, func(t *testing.T) replication.Driver {
		n := startBlobNode(t, map[string]replication.Driver{"eu": newFilesystem(t, t.TempDir())})
		return n.remote("eu")
	})
}

// gatedReader yields first, then blocks until release is closed, then
// yields rest.
type gatedReader struct {
	first, rest io.Reader
	release     chan struct{}
}

func (g *gatedReader) Read(p []byte) (int, error) {
	n, err := g.first.Read(p)
	if err != io.EOF {
		return n, err
	}
	<-g.release
	return g.rest.Read(p)
}

// A chunk whose connection breaks midway, after part of it reached the
// disk, is dropped whole: the upload is as before and the same chunk can be
// sent again at the same offset.
func TestRemoteWriteConnectionLost(t *testing.T) {
	for _, tt := range []struct {
		name string
		cut  func(n *blobNode)
	}{
		{"connections cut", func(n *blobNode) { n.lis.cut() }},
		{"node stopped and replaced", func(n *blobNode) { n.stop(); n.start() }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ctx := t.Context()
			local := newFilesystem(t, t.TempDir())
			n := startBlobNode(t, map[string]replication.Driver{"eu": local})
			rem := n.remote("eu")

			content := randomContent(1, 4<<20+123)
			const head = 1000
			id, err := rem.StartUpload(ctx)
			if err != nil {
				t.Fatalf("StartUpload: %v", err)
			}
			if n, err := rem.WriteUpload(ctx, id, 0, bytes.NewReader(content[:head])); err != nil || n != head {
				t.Fatalf("WriteUpload(head) = %d, %v", n, err)
			}

			chunk := content[head:]
			r := &gatedReader{first: bytes.NewReader(chunk[:2<<20]), rest: bytes.NewReader(chunk[2<<20:]), release: make(chan struct{})}
			type result struct {
				n   int64
				err error
			}
			done := make(chan result, 1)
			go func() {
				n, err := rem.WriteUpload(ctx, id, head, r)
				done <- result{n, err}
			}()
			// Wait until part of the chunk is on the node's disk.
			waitFor(t, "part of the chunk to reach the disk", func() bool {
				size, err := local.UploadSize(ctx, id)
				return err == nil && size > head
			})
			tt.cut(n)
			close(r.release)
			res := <-done
			if res.err == nil || res.n != 0 {
				t.Fatalf("WriteUpload across a broken connection = %d, %v; want 0 and an error", res.n, res.err)
			}
			t.Logf("WriteUpload across a broken connection: %v", res.err)
			for _, sentinel := range []error{replication.ErrUploadOffset, replication.ErrUploadNotFound, replication.ErrBlobNotFound} {
				if errors.Is(res.err, sentinel) {
					t.Errorf("WriteUpload across a broken connection: %v matches %v", res.err, sentinel)
				}
			}
			n.waitIdle()

			if size, err := rem.UploadSize(ctx, id); err != nil || size != head {
				t.Fatalf("UploadSize after the broken chunk = %d, %v; want %d", size, err, head)
			}
			if n, err := rem.WriteUpload(ctx, id, head, bytes.NewReader(chunk)); err != nil || n != int64(len(chunk)) {
				t.Fatalf("retry of the chunk at %d = %d, %v", head, n, err)
			}
			dgst := digest.FromBytes(content)
			if err := rem.CommitUpload(ctx, id, int64(len(content)), dgst); err != nil {
				t.Fatalf("CommitUpload: %v", err)
			}
			if got := readAll(t, rem, dgst); !bytes.Equal(got, content) {
				t.Fatal("blob written after a broken chunk differs")
			}
		})
	}
}

// A node that cannot be reached is not a missing blob.
func TestRemoteNodeDown(t *testing.T) {
	stopped := startBlobNode(t, map[string]replication.Driver{"eu": newFilesystem(t, t.TempDir())})
	stopped.stop()

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refused := l.Addr().String()
	l.Close()
	conn, err := grpc.NewClient(refused, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })

	errNoNode := errors.New("no healthy node in region eu")
	for _, tt := range []struct {
		name  string
		conns func(context.Context) (grpc.ClientConnInterface, error)
		want  func(error) bool
	}{
		{"server stopped", stopped.conns, func(err error) bool { return status.Code(err) == codes.Unavailable }},
		{"connection refused", func(context.Context) (grpc.ClientConnInterface, error) { return conn, nil }, func(err error) bool { return status.Code(err) == codes.Unavailable }},
		{"no node to pick", func(context.Context) (grpc.ClientConnInterface, error) { return nil, errNoNode }, func(err error) bool { return errors.Is(err, errNoNode) }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			rem := replication.NewRemote("eu", tt.conns)
			_, err := rem.Stat(t.Context(), digest.FromString("x"))
			if err == nil || errors.Is(err, replication.ErrBlobNotFound) {
				t.Fatalf("Stat through an unreachable node: got %v, want an error other than ErrBlobNotFound", err)
			}
			t.Logf("Stat through an unreachable node: %v", err)
			if !tt.want(err) {
				t.Errorf("Stat through an unreachable node: got %v (code %v)", err, status.Code(err))
			}
			rc, err := rem.Open(t.Context(), digest.FromString("x"), 0)
			if err == nil || errors.Is(err, replication.ErrBlobNotFound) {
				if rc != nil {
					rc.Close()
				}
				t.Fatalf("Open through an unreachable node: got %v, want an error other than ErrBlobNotFound", err)
			}
		})
	}
}

func TestRemoteUnknownRegion(t *testing.T) {
	n := startBlobNode(t, map[string]replication.Driver{"eu": newFilesystem(t, t.TempDir())})
	rem := n.remote("mars")
	ctx := t.Context()
	dgst := digest.FromString("x")
	calls := map[string]func() error{
		"Stat":        func() error { _, err := rem.Stat(ctx, dgst); return err },
		"StartUpload": func() error { _, err := rem.StartUpload(ctx); return err },
		"WriteUpload": func() error {
			_, err := rem.WriteUpload(ctx, strings.Repeat("0", 32), 0, strings.NewReader("x"))
			return err
		},
		"Open": func() error {
			rc, err := rem.Open(ctx, dgst, 0)
			if err == nil {
				rc.Close()
			}
			return err
		},
		"PurgeUploads": func() error { _, err := rem.PurgeUploads(ctx, time.Now()); return err },
	}
	for name, call := range calls {
		err := call()
		if !errors.Is(err, replication.ErrRegionNotServed) {
			t.Errorf("%s for region mars on a node of eu: got %v, want ErrRegionNotServed", name, err)
			continue
		}
		if msg := err.Error(); !strings.Contains(msg, `"mars"`) || !strings.Contains(msg, "eu") {
			t.Errorf("%s: error %q should name the region asked for and those served", name, msg)
		}
		if errors.Is(err, replication.ErrBlobNotFound) || errors.Is(err, replication.ErrUploadNotFound) {
			t.Errorf("%s: region error %v also matches a not-found sentinel", name, err)
		}
	}
}

// statDriver answers every Stat with err.
type statDriver struct {
	replication.Driver
	err error
}

func (d statDriver) Stat(context.Context, digest.Digest) (int64, error) { return 0, d.err }

// Every Driver sentinel crosses the wire as itself and as nothing else; other
// errors keep their message and match none.
func TestRemoteErrorTable(t *testing.T) {
	sentinels := []error{
		replication.ErrBlobNotFound,
		replication.ErrUploadNotFound,
		replication.ErrUploadOffset,
		replication.ErrStorageFull,
		replication.ErrInvalidDigest,
	}
	plain := errors.New("disk on fire")
	for _, tt := range []struct {
		err  error
		want error // nil: no sentinel
		code codes.Code
	}{
		{fmt.Errorf("%w: sha256:abc", replication.ErrBlobNotFound), replication.ErrBlobNotFound, codes.NotFound},
		{fmt.Errorf("%w: 0123", replication.ErrUploadNotFound), replication.ErrUploadNotFound, codes.NotFound},
		{fmt.Errorf("%w: write at 3", replication.ErrUploadOffset), replication.ErrUploadOffset, codes.OutOfRange},
		{replication.StorageError(fmt.Errorf("write: %w", syscall.ENOSPC)), replication.ErrStorageFull, codes.ResourceExhausted},
		{fmt.Errorf("%w %q", replication.ErrInvalidDigest, "md5:x"), replication.ErrInvalidDigest, codes.InvalidArgument},
		{plain, nil, codes.Unknown},
		{fmt.Errorf("slow disk: %w", context.DeadlineExceeded), nil, codes.DeadlineExceeded},
	} {
		t.Run(tt.err.Error(), func(t *testing.T) {
			n := startBlobNode(t, map[string]replication.Driver{"eu": statDriver{err: tt.err}})
			_, err := n.remote("eu").Stat(t.Context(), digest.FromString("x"))
			if err == nil {
				t.Fatal("Stat succeeded")
			}
			for _, s := range sentinels {
				if got := errors.Is(err, s); got != (s == tt.want) {
					t.Errorf("errors.Is(%v, %v) = %v", err, s, got)
				}
			}
			if code := status.Code(err); code != tt.code {
				t.Errorf("status.Code(%v) = %v, want %v", err, code, tt.code)
			}
			if !strings.Contains(err.Error(), tt.err.Error()) {
				t.Errorf("error %q lost the node's message %q", err, tt.err)
			}
		})
	}
}

// A WriteUpload message larger than a node accepts is refused, and the
// chunk dropped.
func TestRemoteOversizeMessage(t *testing.T) {
	ctx := t.Context()
	local := newFilesystem(t, t.TempDir())
	n := startBlobNode(t, map[string]replication.Driver{"eu": local})
	id, err := local.StartUpload(ctx)
	if err != nil {
		t.Fatal(err)
	}
	stream, err := pb.NewBlobStoreClient(n.conn).WriteUpload(ctx)
	if err != nil {
		t.Fatal(err)
	}
	msgs := []*pb.WriteUploadRequest{
		{Region: "eu", UploadId: id},
		{Data: make([]byte, 1000)},
		{Data: make([]byte, 5<<20)},
	}
	for _, m := range msgs {
		if err := stream.Send(m); err != nil {
			break // the node ended the call; CloseAndRecv says how
		}
	}
	_, err = stream.CloseAndRecv()
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("oversize message: got %v, want InvalidArgument", err)
	}
	n.waitIdle()
	if size, err := local.UploadSize(ctx, id); err != nil || size != 0 {
		t.Fatalf("upload after a refused chunk holds %d bytes (%v), want 0", size, err)
	}
}

// Closing a reader midway ends the node's stream rather than leaving it to
// push the rest of the blob.
func TestRemoteOpenClose(t *testing.T) {
	ctx := t.Context()
	local := newFilesystem(t, t.TempDir())
	n := startBlobNode(t, map[string]replication.Driver{"eu": local})
	rem := n.remote("eu")
	content := randomContent(2, 16<<20)
	dgst := digest.FromBytes(content)
	id, _ := local.StartUpload(ctx)
	if _, err := local.WriteUpload(ctx, id, 0, bytes.NewReader(content)); err != nil {
		t.Fatal(err)
	}
	if err := local.CommitUpload(ctx, id, int64(len(content)), dgst); err != nil {
		t.Fatal(err)
	}
	rc, err := rem.Open(ctx, dgst, 100)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	p := make([]byte, 1000)
	if _, err := io.ReadFull(rc, p); err != nil || !bytes.Equal(p, content[100:1100]) {
		t.Fatalf("first read: %v", err)
	}
	rc.Close()
	if _, err := rc.Read(p); err == nil {
		t.Fatal("Read after Close succeeded")
	}
	n.waitIdle()
}

func randomContent(seed byte, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) ^ seed ^ byte(i>>11)
	}
	return b
}

func readAll(t *testing.T, d replication.Driver, dgst digest.Digest) []byte {
	t.Helper()
	rc, err := d.Open(t.Context(), dgst, 0)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("reading %s: %v", dgst, err)
	}
	return b
}
