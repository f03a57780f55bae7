package replication_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/opencontainers/go-digest"

	"github.com/meridian-registry/meridian/replication"
	"github.com/meridian-registry/meridian/replication/drivertest"
	"github.com/meridian-registry/meridian/replication/s3test"
)

func TestS3Conformance(t *testing.T) {
	srv := s3test.Start(t)
	srv.CreateBucket(t, "conformance")
	drivertest.Run(t, func(t *testing.T) replication.Driver {
		return newS3(t, srv, "conformance", t.Name())
	})
}

// s3Config is the configuration of the drivers under test: parts of the
// smallest size S3 allows, so that a few MiB cross part boundaries, and
// copy pieces small enough that a 20 MiB copy runs in parallel pieces.
func s3Config(srv *s3test.Server, bucket, prefix string) replication.S3Config {
	return replication.S3Config{
		Endpoint:     srv.Endpoint(),
		Bucket:       bucket,
		Prefix:       prefix,
		AccessKey:    srv.AccessKey(),
		SecretKey:    srv.SecretKey(),
		PathStyle:    true,
		PartSize:     replication.S3MinPartSize,
		CopyPartSize: 8 << 20,
	}
}

func newS3(t testing.TB, srv *s3test.Server, bucket, prefix string, tweaks ...func(*replication.S3Config)) *replication.S3 {
	t.Helper()
	cfg := s3Config(srv, bucket, prefix)
	for _, f := range tweaks {
		f(&cfg)
	}
	d, err := replication.NewS3(t.Context(), cfg)
	if err != nil {
		t.Fatalf("NewS3: %v", err)
	}
	return d
}

// listKeys returns the keys under prefix in bucket.
func s3ListKeys(t *testing.T, c *minio.Client, bucket, prefix string) []string {
	t.Helper()
	var keys []string
	for o := range c.ListObjects(t.Context(), bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true}) {
		if o.Err != nil {
			t.Fatalf("list %s/%s: %v", bucket, prefix, o.Err)
		}
		keys = append(keys, o.Key)
	}
	return keys
}

// listMultipart returns the multipart uploads in progress under prefix.
func s3ListMultipart(t *testing.T, c *minio.Client, bucket, prefix string) []minio.ObjectMultipartInfo {
	t.Helper()
	res, err := minio.Core{Client: c}.ListMultipartUploads(t.Context(), bucket, prefix, "", "", "", 1000)
	if err != nil {
		t.Fatalf("ListMultipartUploads: %v", err)
	}
	return res.Uploads
}

func s3Random(seed uint64, n int) []byte {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)}).Read(b)
	return b
}

func s3Write(t *testing.T, d replication.Driver, id string, off int64, p []byte) {
	t.Helper()
	if n, err := d.WriteUpload(t.Context(), id, off, bytes.NewReader(p)); err != nil || n != int64(len(p)) {
		t.Fatalf("WriteUpload(%d bytes at %d) = %d, %v", len(p), off, n, err)
	}
}

func s3Push(t *testing.T, d replication.Driver, content []byte) digest.Digest {
	t.Helper()
	id, err := d.StartUpload(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	s3Write(t, d, id, 0, content)
	dgst := digest.FromBytes(content)
	if err := d.CommitUpload(t.Context(), id, int64(len(content)), dgst); err != nil {
		t.Fatalf("CommitUpload: %v", err)
	}
	return dgst
}

func s3ReadAll(t *testing.T, d replication.Driver, dgst digest.Digest) []byte {
	t.Helper()
	rc, err := d.Open(t.Context(), dgst, 0)
	if err != nil {
		t.Fatalf("Open(%s): %v", dgst, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("reading %s: %v", dgst, err)
	}
	return b
}

// TestS3UploadLayout checks the design the driver documents: chunks below
// 5 MiB only move a single tail object, a part is stored once 5 MiB have
// arrived, and a commit leaves nothing under uploads/.
func TestS3UploadLayout(t *testing.T) {
	srv := s3test.Start(t)
	srv.CreateBucket(t, "layout")
	d := newS3(t, srv, "layout", "p")
	c := srv.Client(t)
	ctx := t.Context()

	content := s3Random(1, 7<<20)
	id, err := d.StartUpload(ctx)
	if err != nil {
		t.Fatal(err)
	}
	const chunk = 256 << 10
	off := 0
	for ; off < 4<<20; off += chunk {
		s3Write(t, d, id, int64(off), content[off:off+chunk])
	}
	uploadDir := "p/uploads/" + id + "/"
	if keys := s3ListKeys(t, c, "layout", uploadDir); len(keys) != 2 {
		t.Fatalf("after 4 MiB in small chunks, objects %v; want the state and one tail", keys)
	}
	if mpus := s3ListMultipart(t, c, "layout", "p/"); len(mpus) != 0 {
		t.Fatalf("multipart uploads before 5 MiB: %d, want none", len(mpus))
	}
	for ; off < len(content); off += chunk {
		s3Write(t, d, id, int64(off), content[off:off+chunk])
	}
	if mpus := s3ListMultipart(t, c, "layout", "p/"); len(mpus) != 1 || mpus[0].Key != uploadDir+"data" {
		t.Fatalf("multipart uploads after 7 MiB: %+v; want one at %sdata", mpus, uploadDir)
	}
	dgst := digest.FromBytes(content)
	if err := d.CommitUpload(ctx, id, int64(len(content)), dgst); err != nil {
		t.Fatal(err)
	}
	if keys := s3ListKeys(t, c, "layout", "p/uploads/"); len(keys) != 0 {
		t.Fatalf("objects left under uploads/ after commit: %v", keys)
	}
	if mpus := s3ListMultipart(t, c, "layout", "p/"); len(mpus) != 0 {
		t.Fatalf("multipart uploads left after commit: %+v", mpus)
	}
	if keys := s3ListKeys(t, c, "layout", "p/blobs/"); len(keys) != 1 || keys[0] != "p/blobs/sha256/"+dgst.Encoded() {
		t.Fatalf("blobs: %v; want p/blobs/sha256/%s", keys, dgst.Encoded())
	}
	if !bytes.Equal(s3ReadAll(t, d, dgst), content) {
		t.Fatal("blob differs")
	}
}

// TestS3UploadAcrossProcesses continues an upload from another driver
// instance (another gateway process) and across a restart of the store.
func TestS3UploadAcrossProcesses(t *testing.T) {
	srv := s3test.Start(t)
	srv.CreateBucket(t, "shared")
	first := newS3(t, srv, "shared", "")
	ctx := t.Context()
	content := s3Random(2, 6<<20+100)
	id, err := first.StartUpload(ctx)
	if err != nil {
		t.Fatal(err)
	}
	s3Write(t, first, id, 0, content[:3<<20])

	srv.Restart()
	second := newS3(t, srv, "shared", "")
	if size, err := second.UploadSize(ctx, id); err != nil || size != 3<<20 {
		t.Fatalf("UploadSize from another process after a restart = %d, %v; want %d", size, err, 3<<20)
	}
	s3Write(t, second, id, 3<<20, content[3<<20:])
	if _, err := first.WriteUpload(ctx, id, 3<<20, bytes.NewReader([]byte("stale"))); !errors.Is(err, replication.ErrUploadOffset) {
		t.Fatalf("write at a stale offset from the first process: got %v, want ErrUploadOffset", err)
	}
	dgst := digest.FromBytes(content)
	if err := first.CommitUpload(ctx, id, int64(len(content)), dgst); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(s3ReadAll(t, second, dgst), content) {
		t.Fatal("blob differs")
	}
}

// TestS3ConcurrentWritesAcrossProcesses races writes at one offset from two
// driver instances, which share no lock: only the store's conditional
// writes keep more than one from being recorded.
func TestS3ConcurrentWritesAcrossProcesses(t *testing.T) {
	srv := s3test.Start(t)
	srv.CreateBucket(t, "race")
	drivers := []*replication.S3{newS3(t, srv, "race", ""), newS3(t, srv, "race", "")}
	for _, chunkSize := range []int{256 << 10, 6 << 20} { // tails only; parts too
		t.Run(fmt.Sprint(chunkSize), func(t *testing.T) {
			ctx := t.Context()
			id, err := drivers[0].StartUpload(ctx)
			if err != nil {
				t.Fatal(err)
			}
			// With a 6 MiB head the upload already has a multipart
			// upload, so the racers store the same part numbers in it.
			head := s3Random(3, chunkSize)
			s3Write(t, drivers[0], id, 0, head)
			const writers = 6
			chunks := make([][]byte, writers)
			errs := make([]error, writers)
			var wg sync.WaitGroup
			for i := range writers {
				chunks[i] = s3Random(uint64(10+i), chunkSize)
				wg.Go(func() {
					_, errs[i] = drivers[i%2].WriteUpload(ctx, id, int64(len(head)), bytes.NewReader(chunks[i]))
				})
			}
			wg.Wait()
			winner := -1
			for i, err := range errs {
				switch {
				case err == nil && winner >= 0:
					t.Fatalf("writers %d and %d both recorded a chunk at offset %d", winner, i, len(head))
				case err == nil:
					winner = i
				case !errors.Is(err, replication.ErrUploadOffset):
					t.Logf("writer %d: %v", i, err) // a conflict the driver could not classify
				}
			}
			if winner < 0 {
				t.Fatal("no write succeeded")
			}
			want := append(head, chunks[winner]...)
			if size, err := drivers[1].UploadSize(ctx, id); err != nil || size != int64(len(want)) {
				t.Fatalf("UploadSize = %d, %v; want %d", size, err, len(want))
			}
			// Racing writers may have stored the same part numbers, so
			// the winner's parts can have been overwritten: the commit
			// may then fail, but it must never produce other bytes.
			dgst := digest.FromBytes(want)
			err = drivers[1].CommitUpload(ctx, id, int64(len(want)), dgst)
			if err != nil {
				if chunkSize < replication.S3MinPartSize {
					t.Fatalf("CommitUpload of tails only: %v", err)
				}
				t.Logf("commit refused after racing parts (allowed): %v", err)
				if _, err := drivers[0].Stat(ctx, dgst); !errors.Is(err, replication.ErrBlobNotFound) {
					t.Fatalf("refused commit left a blob: Stat = %v", err)
				}
				return
			}
			if !bytes.Equal(s3ReadAll(t, drivers[0], dgst), want) {
				t.Fatal("committed blob differs from the head and the winning chunk")
			}
		})
	}
}

// TestS3PurgeAbortsMultipart checks that PurgeUploads aborts the multipart
// uploads of stale uploads, those no state records (a crashed write) and
// those of interrupted copies into blobs/, and keeps a live upload's.
func TestS3PurgeAbortsMultipart(t *testing.T) {
	srv := s3test.Start(t)
	srv.CreateBucket(t, "purge")
	d := newS3(t, srv, "purge", "store")
	c := srv.Client(t)
	core := minio.Core{Client: c}
	ctx := t.Context()

	stale, err := d.StartUpload(ctx)
	if err != nil {
		t.Fatal(err)
	}
	s3Write(t, d, stale, 0, s3Random(4, 6<<20))
	for _, key := range []string{
		"store/uploads/0123456789abcdef0123456789abcdef/data", // state never written
		"store/blobs/sha256/" + strings.Repeat("ab", 32),      // copy cut short
	} {
		if _, err := core.NewMultipartUpload(ctx, "purge", key, minio.PutObjectOptions{PartSize: 5 << 20}); err != nil {
			t.Fatal(err)
		}
	}
	outside, err := core.NewMultipartUpload(ctx, "purge", "other-app/file", minio.PutObjectOptions{PartSize: 5 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if got := len(s3ListMultipart(t, c, "purge", "store/")); got != 3 {
		t.Fatalf("%d multipart uploads before the purge, want 3", got)
	}
	time.Sleep(1100 * time.Millisecond) // S3 times have whole seconds
	cutoff := time.Now()
	time.Sleep(1100 * time.Millisecond)
	live, err := d.StartUpload(ctx)
	if err != nil {
		t.Fatal(err)
	}
	s3Write(t, d, live, 0, s3Random(5, 6<<20))

	n, err := d.PurgeUploads(ctx, cutoff)
	if err != nil || n != 1 {
		t.Fatalf("PurgeUploads = %d, %v; want 1", n, err)
	}
	left := s3ListMultipart(t, c, "purge", "store/")
	if len(left) != 1 || !strings.Contains(left[0].Key, live) {
		t.Fatalf("multipart uploads after the purge: %+v; want only the live upload's", left)
	}
	if _, err := d.UploadSize(ctx, stale); !errors.Is(err, replication.ErrUploadNotFound) {
		t.Fatalf("stale upload: UploadSize = %v, want ErrUploadNotFound", err)
	}
	if size, err := d.UploadSize(ctx, live); err != nil || size != 6<<20 {
		t.Fatalf("live upload: UploadSize = %d, %v", size, err)
	}
	if keys := s3ListKeys(t, c, "purge", "store/uploads/"+stale); len(keys) != 0 {
		t.Fatalf("objects of the purged upload remain: %v", keys)
	}
	if other := s3ListMultipart(t, c, "purge", "other-app/"); len(other) != 1 || other[0].UploadID != outside {
		t.Fatalf("a multipart upload outside the store's prefix was touched: %+v", other)
	}
}

func TestS3PresignGet(t *testing.T) {
	srv := s3test.Start(t)
	srv.CreateBucket(t, "presign")
	d := newS3(t, srv, "presign", "x")
	content := s3Random(6, 100_000)
	dgst := s3Push(t, d, content)
	u, err := d.PresignGet(t.Context(), dgst, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get(u.String())
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK || !bytes.Equal(got, content) {
		t.Fatalf("GET presigned URL: %s, %d bytes, %v; want 200 and the blob", resp.Status, len(got), err)
	}
	missing, err := d.PresignGet(t.Context(), digest.FromString("absent"), time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	resp, err = http.Get(missing.String())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("GET presigned URL of a missing blob: %s, want 404", resp.Status)
	}
}

func TestS3CopyBlob(t *testing.T) {
	srv := s3test.Start(t)
	srv.CreateBucket(t, "region-a")
	srv.CreateBucket(t, "region-b")
	a := newS3(t, srv, "region-a", "")
	b := newS3(t, srv, "region-b", "meridian")
	ctx := t.Context()
	// Below and above CopyPartSize (8 MiB): CopyObject, then parallel
	// UploadPartCopy pieces.
	for _, size := range []int{1000, 20<<20 + 7} {
		content := s3Random(uint64(size), size)
		dgst := s3Push(t, a, content)
		if err := b.CopyBlob(ctx, a, dgst); err != nil {
			t.Fatalf("CopyBlob of %d bytes: %v", size, err)
		}
		if !bytes.Equal(s3ReadAll(t, b, dgst), content) {
			t.Fatalf("copy of %d bytes differs", size)
		}
	}
	if err := b.CopyBlob(ctx, a, digest.FromString("absent")); !errors.Is(err, replication.ErrBlobNotFound) {
		t.Fatalf("CopyBlob of a missing blob: got %v, want ErrBlobNotFound", err)
	}
	if mpus := s3ListMultipart(t, srv.Client(t), "region-b", ""); len(mpus) != 0 {
		t.Fatalf("copies left multipart uploads: %+v", mpus)
	}
}

func TestS3CopyBlobNotSameBackend(t *testing.T) {
	srv := s3test.Start(t)
	srv.CreateBucket(t, "dst")
	srv.CreateBucket(t, "src")
	d := newS3(t, srv, "dst", "")
	fs, err := replication.NewFilesystem(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	dgst := s3Push(t, fs, []byte("on disk"))
	if err := d.CopyBlob(t.Context(), fs, dgst); !errors.Is(err, replication.ErrNotSameBackend) {
		t.Fatalf("CopyBlob from a filesystem: got %v, want ErrNotSameBackend", err)
	}
	// The same server through another address is another endpoint as far
	// as the driver can tell.
	proxy := s3test.NewFaultProxy(t, srv.Endpoint())
	other := newS3(t, srv, "src", "", func(c *replication.S3Config) { c.Endpoint = proxy.Addr() })
	dgst = s3Push(t, other, []byte("elsewhere"))
	if err := d.CopyBlob(t.Context(), other, dgst); !errors.Is(err, replication.ErrNotSameBackend) {
		t.Fatalf("CopyBlob from another endpoint: got %v, want ErrNotSameBackend", err)
	}
	if _, err := d.Stat(t.Context(), dgst); !errors.Is(err, replication.ErrBlobNotFound) {
		t.Fatalf("refused copy changed the store: Stat = %v", err)
	}
}

// TestS3StoreDown puts the store behind a fault proxy: a store that fails,
// hangs or drops connections gives errors that do not look like a missing
// blob or upload, leaves uploads as they were, and works again once back.
func TestS3StoreDown(t *testing.T) {
	srv := s3test.Start(t)
	srv.CreateBucket(t, "flaky")
	proxy := s3test.NewFaultProxy(t, srv.Endpoint())
	d := newS3(t, srv, "flaky", "", func(c *replication.S3Config) {
		c.Endpoint = proxy.Addr()
		c.MaxRetries = 1 // fail fast: the test is about the error, not the retries
	})
	ctx := t.Context()
	content := s3Random(7, 7<<20)
	dgst := s3Push(t, d, content)
	id, err := d.StartUpload(ctx)
	if err != nil {
		t.Fatal(err)
	}
	s3Write(t, d, id, 0, content[:1000])

	notMissing := func(t *testing.T, op string, err error) {
		t.Helper()
		switch {
		case err == nil:
			t.Errorf("%s succeeded through a broken store", op)
		case errors.Is(err, replication.ErrBlobNotFound), errors.Is(err, replication.ErrUploadNotFound):
			t.Errorf("%s: a broken store reported %v, which says the data is gone", op, err)
		}
	}
	checkDown := func(t *testing.T, ctx context.Context) {
		_, err := d.Stat(ctx, dgst)
		notMissing(t, "Stat", err)
		rc, err := d.Open(ctx, dgst, 0)
		if err == nil {
			_, err = io.ReadAll(rc)
			rc.Close()
		}
		notMissing(t, "Open", err)
		_, err = d.UploadSize(ctx, id)
		notMissing(t, "UploadSize", err)
		_, err = d.WriteUpload(ctx, id, 1000, bytes.NewReader(content[1000:]))
		notMissing(t, "WriteUpload", err)
		_, err = d.StartUpload(ctx)
		notMissing(t, "StartUpload", err)
	}
	for _, mode := range []s3test.Mode{s3test.Fail, s3test.Cut, s3test.Stall} {
		t.Run(mode.String(), func(t *testing.T) {
			proxy.SetMode(mode)
			ctx := t.Context()
			if mode == s3test.Stall {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, 300*time.Millisecond)
				defer cancel()
			}
			checkDown(t, ctx)
			proxy.SetMode(s3test.Pass)
			if size, err := d.UploadSize(t.Context(), id); err != nil || size != 1000 {
				t.Fatalf("after the store came back, UploadSize = %d, %v; want 1000 as before", size, err)
			}
			if !bytes.Equal(s3ReadAll(t, d, dgst), content) {
				t.Fatal("blob differs after the store came back")
			}
		})
	}
	if proxy.Failed() == 0 || proxy.CutCount() == 0 {
		t.Fatalf("proxy failed %d and cut %d requests; the test did not exercise it", proxy.Failed(), proxy.CutCount())
	}

	// A connection cut in the middle of a chunk drops the chunk whole.
	t.Run("cut mid-chunk", func(t *testing.T) {
		r := &s3CutAfter{r: bytes.NewReader(content[1000:]), n: 6 << 20, cut: func() { proxy.SetMode(s3test.Cut) }}
		if _, err := d.WriteUpload(ctx, id, 1000, r); err == nil {
			t.Fatal("WriteUpload succeeded although the connection was cut")
		}
		proxy.SetMode(s3test.Pass)
		if size, err := d.UploadSize(ctx, id); err != nil || size != 1000 {
			t.Fatalf("after a cut chunk, UploadSize = %d, %v; want 1000", size, err)
		}
		s3Write(t, d, id, 1000, content[1000:])
		if err := d.CommitUpload(ctx, id, int64(len(content)), dgst); err != nil {
			t.Fatal(err)
		}
	})
}

// TestS3StorageFull maps the store's "full" answers to ErrStorageFull, and
// leaves other refusals alone.
func TestS3StorageFull(t *testing.T) {
	srv := s3test.Start(t)
	srv.CreateBucket(t, "full")
	proxy := s3test.NewFaultProxy(t, srv.Endpoint())
	d := newS3(t, srv, "full", "", func(c *replication.S3Config) { c.Endpoint, c.MaxRetries = proxy.Addr(), 1 })
	ctx := t.Context()
	id, err := d.StartUpload(ctx)
	if err != nil {
		t.Fatal(err)
	}
	proxy.SetFilter(func(r *http.Request) bool { return r.Method == http.MethodPut }) // reads work, writes fail
	for _, tt := range []struct {
		status int
		code   string
		full   bool
	}{
		{http.StatusInsufficientStorage, "XMinioStorageFull", true},
		{http.StatusBadRequest, "XMinioAdminBucketQuotaExceeded", true},
		{http.StatusForbidden, "QuotaExceeded", true},
		{http.StatusBadRequest, "EntityTooLarge", false},
		{http.StatusServiceUnavailable, "ServiceUnavailable", false},
	} {
		proxy.SetFailure(tt.status, tt.code)
		proxy.SetMode(s3test.Fail)
		_, err := d.WriteUpload(ctx, id, 0, bytes.NewReader([]byte("some bytes")))
		proxy.SetMode(s3test.Pass)
		if err == nil || errors.Is(err, replication.ErrStorageFull) != tt.full {
			t.Errorf("%d %s: WriteUpload = %v; want an error, ErrStorageFull: %v", tt.status, tt.code, err, tt.full)
		}
	}
	if size, err := d.UploadSize(ctx, id); err != nil || size != 0 {
		t.Fatalf("after refused writes UploadSize = %d, %v; want 0", size, err)
	}
}

// s3CutAfter reads from r and calls cut once n bytes have been read.
type s3CutAfter struct {
	r   io.Reader
	n   int
	cut func()
}

func (c *s3CutAfter) Read(p []byte) (int, error) {
	if c.n <= 0 && c.cut != nil {
		c.cut()
		c.cut = nil
	}
	n, err := c.r.Read(p[:min(len(p), max(c.n, 1))])
	c.n -= n
	return n, err
}

func TestS3NewErrors(t *testing.T) {
	srv := s3test.Start(t)
	srv.CreateBucket(t, "exists")
	tests := []struct {
		name  string
		tweak func(*replication.S3Config)
		want  []string
	}{
		{"missing bucket", func(c *replication.S3Config) { c.Bucket = "absent" }, []string{`bucket "absent" does not exist`, srv.Endpoint()}},
		{"wrong secret", func(c *replication.S3Config) { c.SecretKey = "not-the-secret" }, []string{"refused the credentials", `"exists"`}},
		{"small parts", func(c *replication.S3Config) { c.PartSize = 1 << 20 }, []string{"part size"}},
		{"no endpoint", func(c *replication.S3Config) { c.Endpoint = "" }, []string{"endpoint is empty"}},
		{"scheme in endpoint", func(c *replication.S3Config) { c.Endpoint = "http://" + srv.Endpoint() }, []string{"without scheme"}},
		{"bad prefix", func(c *replication.S3Config) { c.Prefix = "a//b" }, []string{"prefix"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := s3Config(srv, "exists", "")
			cfg.MaxRetries = 1
			tt.tweak(&cfg)
			_, err := replication.NewS3(t.Context(), cfg)
			if err == nil {
				t.Fatal("NewS3 succeeded")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			if strings.Contains(err.Error(), srv.SecretKey()) || strings.Contains(err.Error(), "not-the-secret") {
				t.Errorf("error %q contains the secret", err)
			}
		})
	}
}

// TestS3BoundedMemory streams 200 MiB in 1 MiB chunks: the driver must keep
// about one part buffer per write, never the blob.
func TestS3BoundedMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("200 MiB upload skipped in -short mode")
	}
	srv := s3test.Start(t)
	srv.CreateBucket(t, "memory")
	d := newS3(t, srv, "memory", "")
	ctx := t.Context()
	const size, chunk = 200 << 20, 1 << 20
	id, err := d.StartUpload(ctx)
	if err != nil {
		t.Fatal(err)
	}
	gen := rand.NewChaCha8([32]byte{8})
	buf := make([]byte, chunk)
	h := sha256.New()
	runtime.GC()
	var before, ms runtime.MemStats
	runtime.ReadMemStats(&before)
	var peak uint64
	for off := int64(0); off < size; off += chunk {
		gen.Read(buf)
		h.Write(buf)
		s3Write(t, d, id, off, buf)
		if off%(16<<20) == 0 {
			runtime.ReadMemStats(&ms)
			peak = max(peak, ms.HeapInuse)
		}
	}
	dgst := digest.NewDigest(digest.SHA256, h)
	if err := d.CommitUpload(ctx, id, size, dgst); err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&ms)
	peak = max(peak, ms.HeapInuse)
	allocated := ms.TotalAlloc - before.TotalAlloc
	t.Logf("heap in use: %d MiB before, peak %d MiB; allocated %d MiB in all", before.HeapInuse>>20, peak>>20, allocated>>20)
	if limit := before.HeapInuse + 64<<20; peak > limit {
		t.Errorf("heap in use peaked at %d MiB, more than 64 MiB above the %d MiB before the upload", peak>>20, before.HeapInuse>>20)
	}
	if allocated > 2*size {
		t.Errorf("allocated %d MiB to store a %d MiB blob", allocated>>20, size>>20)
	}
	rc, err := d.Open(ctx, dgst, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	rh := sha256.New()
	if n, err := io.Copy(rh, rc); err != nil || n != size || digest.NewDigest(digest.SHA256, rh) != dgst {
		t.Fatalf("read back %d bytes, %v; digest match %v", n, err, digest.NewDigest(digest.SHA256, rh) == dgst)
	}
}
