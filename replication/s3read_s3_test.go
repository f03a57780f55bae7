package replication_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/meridian-registry/meridian/replication"
	"github.com/meridian-registry/meridian/replication/s3test"
)

// rangedGETs counts the GETs of data objects a FaultProxy sees, and how
// many of them asked for a closed range (bytes=a-b, a parallel part).
type rangedGETs struct {
	mu          sync.Mutex
	gets, parts int
}

func (c *rangedGETs) observe(r *http.Request) {
	if r.Method != http.MethodGet || !strings.Contains(r.URL.Path, "/data/") {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gets++
	if rg := r.Header.Get("Range"); strings.HasPrefix(rg, "bytes=") && !strings.HasSuffix(rg, "-") {
		c.parts++
	}
}

func (c *rangedGETs) take() (gets, parts int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	gets, parts = c.gets, c.parts
	c.gets, c.parts = 0, 0
	return gets, parts
}

// part is the read part size of partedS3's drivers.
const part = 64 << 10

// partedS3 is an S3 driver on a new bucket of a real S3 server, reached
// through a fault proxy, that reads blobs of more than part bytes in
// parts; tweak adjusts the rest of its configuration.
func partedS3(t *testing.T, bucket string, tweak func(*replication.S3Config)) (*replication.S3, *s3test.FaultProxy, *s3test.Server) {
	t.Helper()
	srv := s3test.Start(t)
	srv.CreateBucket(t, bucket)
	proxy := s3test.NewFaultProxy(t, srv.Endpoint())
	return newS3(t, srv, bucket, "", func(c *replication.S3Config) {
		c.Endpoint = proxy.Addr()
		c.ReadPartSize = part
		tweak(c)
	}), proxy, srv
}

// TestS3ParallelRead reads a blob of several read parts from offsets
// around part boundaries: the bytes are the blob's, they come from ranged
// GETs of one part each, and every buffer is back once the readers close.
func TestS3ParallelRead(t *testing.T) {
	d, proxy, _ := partedS3(t, "parallel", func(c *replication.S3Config) { c.ReadBuffers = 8 })
	var count rangedGETs
	proxy.SetObserver(count.observe)
	content := s3Random(40, 20*part+12345)
	dgst := s3Push(t, d, content)
	count.take()
	size := int64(len(content))
	for _, off := range []int64{0, 1, part - 1, part, 3*part + 7, size - part - 1, size - part, size - 1, size} {
		rc, err := d.Open(t.Context(), dgst, off)
		if err != nil {
			t.Fatalf("Open at %d: %v", off, err)
		}
		var got bytes.Buffer
		if off%2 == 0 {
			_, err = io.Copy(&got, rc) // WriteTo
		} else {
			_, err = io.Copy(&got, struct{ io.Reader }{rc}) // Read
		}
		rc.Close()
		if err != nil {
			t.Fatalf("reading from %d: %v", off, err)
		}
		if !bytes.Equal(got.Bytes(), content[off:]) {
			t.Fatalf("read %d bytes from offset %d, not the blob's %d from there", got.Len(), off, size-off)
		}
		gets, parts := count.take()
		wantParallel := size-off > part
		if wantParallel && (parts != gets || gets != int((size-off+part-1)/part)) {
			t.Errorf("offset %d: %d GETs of the data, %d of them ranged parts; want one ranged GET per %d-byte part", off, gets, parts, part)
		}
		if !wantParallel && parts != 0 {
			t.Errorf("offset %d: %d ranged parts for the last %d bytes, want one streamed GET", off, parts, size-off)
		}
	}
	if n := d.ReadBuffersInUse(); n != 0 {
		t.Errorf("%d read buffers taken after every reader closed", n)
	}

	// Half a blob, then Close: the parts in flight stop, the buffers return.
	rc, err := d.Open(t.Context(), dgst, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(rc, make([]byte, size/2)); err != nil {
		t.Fatal(err)
	}
	rc.Close()
	if n := d.ReadBuffersInUse(); n != 0 {
		t.Errorf("%d read buffers taken after a reader closed halfway", n)
	}
	if _, err := rc.Read(make([]byte, 1)); err == nil {
		t.Error("Read after Close succeeded")
	}
}

// TestS3ParallelReadBudget opens more readers at once than the read
// buffers allow: those that find none stream a single GET, and all read
// their blob whole.
func TestS3ParallelReadBudget(t *testing.T) {
	d, proxy, _ := partedS3(t, "budget", func(c *replication.S3Config) { c.ReadBuffers = 4 }) // one reader's read-ahead
	var count rangedGETs
	proxy.SetObserver(count.observe)
	content := s3Random(41, 10*part+1)
	dgst := s3Push(t, d, content)
	count.take()
	var readers []io.ReadCloser
	for range 3 {
		rc, err := d.Open(t.Context(), dgst, 0)
		if err != nil {
			t.Fatal(err)
		}
		readers = append(readers, rc)
	}
	if n := d.ReadBuffersInUse(); n != 4 {
		t.Errorf("%d read buffers taken by 3 readers of a budget of 4, want all 4", n)
	}
	for i, rc := range readers {
		got, err := io.ReadAll(rc)
		rc.Close()
		if err != nil || !bytes.Equal(got, content) {
			t.Fatalf("reader %d: %d bytes, %v; want the blob's %d", i, len(got), err, len(content))
		}
	}
	gets, parts := count.take()
	if streamed := gets - parts; streamed != 2 || parts != 11 {
		t.Errorf("%d ranged part GETs and %d streamed GETs; want one reader's 11 parts and 2 streams", parts, streamed)
	}
	if n := d.ReadBuffersInUse(); n != 0 {
		t.Errorf("%d read buffers taken after every reader closed", n)
	}
}

// TestS3ParallelReadFailures checks that a part the store fails, or a data
// object shorter than its link says, fails the read instead of ending it
// early, and that a failing first part fails Open.
func TestS3ParallelReadFailures(t *testing.T) {
	d, proxy, srv := partedS3(t, "failures", func(c *replication.S3Config) { c.MaxRetries = 1 })
	content := s3Random(42, 8*part)
	dgst := s3Push(t, d, content)

	// Parts from the fourth on fail.
	proxy.SetFilter(func(r *http.Request) bool {
		var a, b int64
		_, err := fmt.Sscanf(r.Header.Get("Range"), "bytes=%d-%d", &a, &b)
		return r.Method == http.MethodGet && err == nil && a >= 3*part
	})
	proxy.SetFailure(http.StatusInternalServerError, "InternalError")
	proxy.SetMode(s3test.Fail)
	rc, err := d.Open(t.Context(), dgst, 0)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rc)
	rc.Close()
	if err == nil || errors.Is(err, replication.ErrBlobNotFound) {
		t.Errorf("read through failing parts: %v, want the store's error", err)
	}
	if !bytes.Equal(got, content[:3*part]) {
		t.Errorf("read %d bytes before the failure, want the 3 parts before it", len(got))
	}
	if rc, err := d.Open(t.Context(), dgst, 3*part+5); err == nil {
		rc.Close()
		t.Error("Open whose first part fails succeeded")
	}
	proxy.SetMode(s3test.Pass)

	// The data object loses its tail behind the driver's back.
	mc, err := minio.New(srv.Endpoint(), &minio.Options{Creds: credentials.NewStaticV4(srv.AccessKey(), srv.SecretKey(), "")})
	if err != nil {
		t.Fatal(err)
	}
	var dataKey string
	for _, k := range s3ListKeys(t, mc, "failures", "data/") {
		dataKey = k
	}
	short := content[:5*part+100]
	if _, err := mc.PutObject(t.Context(), "failures", dataKey, bytes.NewReader(short), int64(len(short)), minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	rc, err = d.Open(t.Context(), dgst, 0)
	if err != nil {
		t.Fatal(err)
	}
	n, err := io.Copy(io.Discard, rc)
	rc.Close()
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("read of a data object shorter than its link: %d bytes, %v; want io.ErrUnexpectedEOF", n, err)
	}
	if n := d.ReadBuffersInUse(); n != 0 {
		t.Errorf("%d read buffers taken after every reader closed", n)
	}
}

// TestS3OpenRange reads stretches of a blob of many read parts: each
// stretch's bytes are the blob's, and no GET asks the store for a byte
// past the stretch's end (a small range of a large blob costs one small
// GET, not a read part and its read-ahead).
func TestS3OpenRange(t *testing.T) {
	d, proxy, _ := partedS3(t, "ranges", func(c *replication.S3Config) { c.ReadBuffers = 8 })
	var mu sync.Mutex
	var ranges []string
	proxy.SetObserver(func(r *http.Request) {
		if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/data/") {
			mu.Lock()
			ranges = append(ranges, r.Header.Get("Range"))
			mu.Unlock()
		}
	})
	taken := func() []string {
		mu.Lock()
		defer mu.Unlock()
		out := ranges
		ranges = nil
		return out
	}
	var ro replication.RangeOpener = d
	content := s3Random(43, 20*part+12345)
	dgst := s3Push(t, d, content)
	taken()
	size := int64(len(content))
	for _, tc := range []struct{ off, n int64 }{
		{10 * part, 100}, {0, 1}, {3*part + 7, 5 * part}, {size - 100, 100}, {part - 1, part + 2}, {7, size - 7}, {size, 0},
	} {
		rc, err := ro.OpenRange(t.Context(), dgst, tc.off, tc.n)
		if err != nil {
			t.Fatalf("OpenRange(%d, %d): %v", tc.off, tc.n, err)
		}
		got, err := io.ReadAll(rc)
		rc.Close()
		if err != nil || !bytes.Equal(got, content[tc.off:tc.off+tc.n]) {
			t.Fatalf("OpenRange(%d, %d): %d bytes, %v; want the blob's %d bytes from there", tc.off, tc.n, len(got), err, tc.n)
		}
		var fetched int64
		for _, rg := range taken() {
			var a, b int64 = 0, size - 1
			if rg != "" {
				if _, err := fmt.Sscanf(rg, "bytes=%d-%d", &a, &b); err != nil {
					if _, err := fmt.Sscanf(rg, "bytes=%d-", &a); err != nil {
						t.Fatalf("unreadable Range %q", rg)
					}
					b = size - 1
				}
			}
			if a < tc.off || b >= tc.off+tc.n {
				t.Errorf("OpenRange(%d, %d) asked the store for %q, outside the range", tc.off, tc.n, rg)
			}
			fetched += b - a + 1
		}
		if fetched != tc.n {
			t.Errorf("OpenRange(%d, %d) fetched %d bytes from the store, want exactly %d", tc.off, tc.n, fetched, tc.n)
		}
	}
	if _, err := ro.OpenRange(t.Context(), dgst, size-10, 11); err == nil {
		t.Error("OpenRange past the blob's end succeeded")
	}
	if n := d.ReadBuffersInUse(); n != 0 {
		t.Errorf("%d read buffers taken after every reader closed", n)
	}
}
