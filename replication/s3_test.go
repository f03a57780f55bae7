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
	"slices"
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
// smallest size S3 allows, so that a few MiB cross part boundaries, copy
// pieces small enough that a 20 MiB copy runs in parallel pieces, and read
// parts of 1 MiB, so that reads of a few MiB are parallel ranged GETs.
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
		ReadPartSize: 1 << 20,
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

// s3Object returns the object at key, which must exist.
func s3Object(t *testing.T, c *minio.Client, bucket, key string) minio.ObjectInfo {
	t.Helper()
	info, err := c.StatObject(t.Context(), bucket, key, minio.StatObjectOptions{})
	if err != nil {
		t.Fatalf("stat %s/%s: %v", bucket, key, err)
	}
	return info
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
// arrived, straight into the upload's data object, and a commit leaves
// nothing under uploads/, the data object in place and a small link to it.
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
	dataKey := "p/data/" + id
	// The exact key: MinIO lists multipart uploads of one object only.
	if mpus := s3ListMultipart(t, c, "layout", dataKey); len(mpus) != 1 || mpus[0].Key != dataKey {
		t.Fatalf("multipart uploads after 7 MiB: %+v; want one at %s", mpus, dataKey)
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
	linkKey := "p/blobs/sha256/" + dgst.Encoded()
	if keys := s3ListKeys(t, c, "layout", "p/blobs/"); len(keys) != 1 || keys[0] != linkKey {
		t.Fatalf("blobs: %v; want %s", keys, linkKey)
	}
	if keys := s3ListKeys(t, c, "layout", "p/data/"); len(keys) != 1 || keys[0] != dataKey {
		t.Fatalf("data objects: %v; want %s", keys, dataKey)
	}
	if link := s3Object(t, c, "layout", linkKey); link.Size > 1024 {
		t.Fatalf("the link is %d bytes, want a small object", link.Size)
	}
	if data := s3Object(t, c, "layout", dataKey); data.Size != int64(len(content)) {
		t.Fatalf("the data object is %d bytes, want %d", data.Size, len(content))
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
// uploads of stale uploads, those no state records (a crashed write or an
// interrupted copy), and keeps a live upload's.
func TestS3PurgeAbortsMultipart(t *testing.T) {
	if s3test.Kind() == "minio" {
		// MinIO lists multipart uploads only for an exact object name, so
		// leftovers that no state records cannot be found by listing;
		// the README asks for a bucket lifecycle rule there.
		t.Skip("MinIO does not list multipart uploads by prefix")
	}
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
		"store/data/0123456789abcdef0123456789abcdef", // state never written
		"store/data/" + strings.Repeat("ab", 16),      // copy cut short
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
	for _, prefix := range []string{"store/uploads/" + stale, "store/data/" + stale} {
		if keys := s3ListKeys(t, c, "purge", prefix); len(keys) != 0 {
			t.Fatalf("objects of the purged upload remain: %v", keys)
		}
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
	if _, err := d.PresignGet(t.Context(), digest.FromString("absent"), time.Minute); !errors.Is(err, replication.ErrBlobNotFound) {
		t.Fatalf("PresignGet of a missing blob: got %v, want ErrBlobNotFound", err)
	}
	// A URL handed out before the blob was deleted stops working.
	if err := d.Delete(t.Context(), dgst); err != nil {
		t.Fatal(err)
	}
	resp, err = http.Get(u.String())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("GET presigned URL of a deleted blob: %s, want 404", resp.Status)
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
		if err := b.CopyBlob(ctx, a, dgst); err != nil { // already there: nothing to do
			t.Fatalf("CopyBlob of a blob already copied: %v", err)
		}
	}
	// The copies are in the new store's own layout: a link and a data
	// object each, nothing left under uploads/.
	c := srv.Client(t)
	for prefix, want := range map[string]int{"meridian/blobs/": 2, "meridian/data/": 2, "meridian/uploads/": 0} {
		if keys := s3ListKeys(t, c, "region-b", prefix); len(keys) != want {
			t.Errorf("%s after two copies: %v; want %d objects", prefix, keys, want)
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

// s3Requests records the requests a FaultProxy receives.
type s3Requests struct {
	mu   sync.Mutex
	reqs []s3Request
}

type s3Request struct {
	method, path string
	copySource   string // x-amz-copy-source: the request copies an object server-side
	length       int64
}

func (r *s3Requests) observe(req *http.Request) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.reqs = append(r.reqs, s3Request{req.Method, req.URL.Path, req.Header.Get("X-Amz-Copy-Source"), req.ContentLength})
}

// take returns the requests recorded since the last call.
func (r *s3Requests) take() []s3Request {
	r.mu.Lock()
	defer r.mu.Unlock()
	reqs := r.reqs
	r.reqs = nil
	return reqs
}

// TestS3CommitDoesNotCopy checks that a commit costs O(1) in the blob's
// size: the store sees no copy, read or upload of the blob's bytes (only a
// server-side copy of a tail under 5 MiB), and the blob's key holds a small
// link to the data object the upload wrote.
func TestS3CommitDoesNotCopy(t *testing.T) {
	srv := s3test.Start(t)
	srv.CreateBucket(t, "commit")
	proxy := s3test.NewFaultProxy(t, srv.Endpoint())
	var seen s3Requests
	proxy.SetObserver(seen.observe)
	c := srv.Client(t)
	tests := []struct {
		name       string
		size       int
		readFirst  bool // hash sha512 by reading the upload back before the commit
		tailCopies int  // at commit
	}{
		{"parts only", 30 << 20, false, 0},
		{"parts and a tail", 30<<20 + 3<<20 + 7, false, 1},
		{"a tail only", 3 << 20, false, 1},
		{"read before commit", 30<<20 + 1234, true, 0},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			prefix := fmt.Sprint("case", i)
			d := newS3(t, srv, "commit", prefix, func(c *replication.S3Config) { c.Endpoint = proxy.Addr() })
			ctx := t.Context()
			content := s3Random(uint64(40+i), tt.size)
			id, err := d.StartUpload(ctx)
			if err != nil {
				t.Fatal(err)
			}
			const chunk = 1 << 20
			for off := 0; off < len(content); off += chunk {
				s3Write(t, d, id, int64(off), content[off:min(off+chunk, len(content))])
			}
			dgst := digest.FromBytes(content)
			if tt.readFirst {
				dgst = digest.SHA512.FromBytes(content)
				rc, err := d.OpenUpload(ctx, id)
				if err != nil {
					t.Fatal(err)
				}
				got, err := io.ReadAll(rc)
				rc.Close()
				if err != nil || !bytes.Equal(got, content) {
					t.Fatalf("OpenUpload read %d bytes, %v; want the %d written", len(got), err, len(content))
				}
			}
			for _, r := range seen.take() {
				if r.copySource != "" && !strings.Contains(r.copySource, "/tail.") {
					t.Errorf("writing and reading the upload copied %s, not a tail", r.copySource)
				}
			}

			if err := d.CommitUpload(ctx, id, int64(len(content)), dgst); err != nil {
				t.Fatalf("CommitUpload: %v", err)
			}
			reqs := seen.take()
			copies, sent := 0, int64(0)
			for _, r := range reqs {
				switch {
				case r.copySource != "":
					copies++
					if !strings.Contains(r.copySource, "/tail.") {
						t.Errorf("commit copied %s, not a tail", r.copySource)
					}
				case r.method == http.MethodGet && strings.Contains(r.path, "/data/"):
					t.Errorf("commit read the data: GET %s", r.path)
				}
				sent += max(r.length, 0)
			}
			t.Logf("commit of %d bytes: %d requests, %d tail copies, %d bytes sent", len(content), len(reqs), copies, sent)
			if copies != tt.tailCopies {
				t.Errorf("commit copied %d tails, want %d", copies, tt.tailCopies)
			}
			if sent > 64<<10 {
				t.Errorf("commit sent %d bytes to the store", sent)
			}

			linkKey := prefix + "/blobs/" + dgst.Algorithm().String() + "/" + dgst.Encoded()
			if link := s3Object(t, c, "commit", linkKey); link.Size > 1024 {
				t.Errorf("the link is %d bytes, want a small object", link.Size)
			}
			dataKey := prefix + "/data/" + id
			if keys := s3ListKeys(t, c, "commit", prefix+"/data/"); len(keys) != 1 || keys[0] != dataKey {
				t.Fatalf("data objects %v; want %s", keys, dataKey)
			}
			if data := s3Object(t, c, "commit", dataKey); data.Size != int64(len(content)) {
				t.Errorf("the data object holds %d bytes, want %d", data.Size, len(content))
			}
			if keys := s3ListKeys(t, c, "commit", prefix+"/uploads/"); len(keys) != 0 {
				t.Errorf("objects left under uploads/: %v", keys)
			}
			if !bytes.Equal(s3ReadAll(t, d, dgst), content) {
				t.Fatal("blob differs")
			}
		})
	}
}

// TestS3ConcurrentCommitSameDigest commits one content from several uploads
// in two driver instances (processes) at once: every commit succeeds, and
// exactly one upload's data object remains, linked.
func TestS3ConcurrentCommitSameDigest(t *testing.T) {
	srv := s3test.Start(t)
	srv.CreateBucket(t, "same")
	c := srv.Client(t)
	for _, size := range []int{256 << 10, 11<<20 + 5} { // a tail; parts and a tail
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			prefix := fmt.Sprint("size", size)
			drivers := []*replication.S3{newS3(t, srv, "same", prefix), newS3(t, srv, "same", prefix)}
			ctx := t.Context()
			content := s3Random(50, size)
			dgst := digest.FromBytes(content)
			const uploads = 6
			ids := make([]string, uploads)
			for i := range ids {
				id, err := drivers[i%2].StartUpload(ctx)
				if err != nil {
					t.Fatal(err)
				}
				s3Write(t, drivers[i%2], id, 0, content)
				ids[i] = id
			}
			errs := make([]error, uploads)
			var wg sync.WaitGroup
			for i, id := range ids {
				wg.Go(func() { errs[i] = drivers[i%2].CommitUpload(ctx, id, int64(size), dgst) })
			}
			wg.Wait()
			for i, err := range errs {
				if err != nil {
					t.Errorf("commit %d: %v", i, err)
				}
			}
			data := s3ListKeys(t, c, "same", prefix+"/data/")
			if len(data) != 1 || !slices.Contains(ids, strings.TrimPrefix(data[0], prefix+"/data/")) {
				t.Fatalf("data objects after %d commits of one digest: %v; want one upload's", uploads, data)
			}
			if keys := s3ListKeys(t, c, "same", prefix+"/uploads/"); len(keys) != 0 {
				t.Errorf("objects left under uploads/: %v", keys)
			}
			if mpus := s3ListMultipart(t, c, "same", prefix+"/"); len(mpus) != 0 {
				t.Errorf("multipart uploads left: %+v", mpus)
			}
			for _, d := range drivers {
				if !bytes.Equal(s3ReadAll(t, d, dgst), content) {
					t.Fatal("blob differs")
				}
			}
		})
	}
}

// TestS3PurgeInterrupted interrupts commits, a delete and a copy where they
// may leave a data object unlinked, or linked with its intent still
// recorded, by failing the next request as a crash would end the operation
// there. PurgeUploads then removes the unlinked data and never the linked,
// and a retried commit completes.
func TestS3PurgeInterrupted(t *testing.T) {
	srv := s3test.Start(t)
	srv.CreateBucket(t, "crash")
	proxy := s3test.NewFaultProxy(t, srv.Endpoint())
	c := srv.Client(t)
	newDriver := func(t *testing.T, prefix string) *replication.S3 {
		return newS3(t, srv, "crash", prefix, func(c *replication.S3Config) { c.Endpoint, c.MaxRetries = proxy.Addr(), 1 })
	}
	// failing fails the requests f accepts until the returned func is called.
	failing := func(f func(*http.Request) bool) (restore func()) {
		proxy.SetFilter(f)
		proxy.SetMode(s3test.Fail)
		return func() {
			proxy.SetMode(s3test.Pass)
			proxy.SetFilter(nil)
		}
	}
	to := func(method, pathPart string) func(*http.Request) bool {
		return func(r *http.Request) bool { return r.Method == method && strings.Contains(r.URL.Path, pathPart) }
	}
	start := func(t *testing.T, d *replication.S3, content []byte) string {
		t.Helper()
		id, err := d.StartUpload(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		s3Write(t, d, id, 0, content)
		return id
	}
	purgeAll := func(t *testing.T, d *replication.S3, want int) {
		t.Helper()
		if n, err := d.PurgeUploads(t.Context(), time.Now().Add(time.Hour)); err != nil || n != want {
			t.Fatalf("PurgeUploads = %d, %v; want %d", n, err, want)
		}
	}
	dataKeys := func(t *testing.T, prefix string) []string {
		t.Helper()
		return s3ListKeys(t, c, "crash", prefix+"/data/")
	}

	t.Run("commit", func(t *testing.T) {
		d := newDriver(t, "commit")
		ctx := t.Context()
		committed := s3Random(60, 6<<20+5)
		committedDgst := s3Push(t, d, committed)

		// Completed into its data object, but never recorded as such.
		unrecorded := s3Random(61, 6<<20)
		id1 := start(t, d, unrecorded)
		restore := failing(to(http.MethodPut, "/uploads/"+id1+"/state"))
		err := d.CommitUpload(ctx, id1, int64(len(unrecorded)), digest.FromBytes(unrecorded))
		restore()
		if err == nil {
			t.Fatal("CommitUpload succeeded although its state could not be written")
		}

		// Recorded with its intent; the link never written.
		unlinked := s3Random(62, 7<<20)
		id2 := start(t, d, unlinked)
		restore = failing(to(http.MethodPut, "/blobs/"))
		err = d.CommitUpload(ctx, id2, int64(len(unlinked)), digest.FromBytes(unlinked))
		restore()
		if err == nil {
			t.Fatal("CommitUpload succeeded although the link could not be written")
		}
		if _, err := d.Stat(ctx, digest.FromBytes(unlinked)); !errors.Is(err, replication.ErrBlobNotFound) {
			t.Fatalf("Stat of a blob whose link was never written: %v, want ErrBlobNotFound", err)
		}
		if _, err := d.UploadSize(ctx, id2); !errors.Is(err, replication.ErrUploadNotFound) {
			t.Fatalf("UploadSize of an upload whose commit began: %v, want ErrUploadNotFound", err)
		}

		// Linked; the state, intent included, never removed.
		linked := s3Random(63, 5<<20+9)
		linkedDgst := digest.FromBytes(linked)
		id3 := start(t, d, linked)
		restore = failing(to(http.MethodDelete, "/uploads/"+id3+"/state"))
		err = d.CommitUpload(ctx, id3, int64(len(linked)), linkedDgst)
		restore()
		if err == nil {
			t.Fatal("CommitUpload succeeded although its state could not be removed")
		}

		if keys := dataKeys(t, "commit"); len(keys) != 4 {
			t.Fatalf("data objects before the purge: %v, want 4", keys)
		}
		purgeAll(t, d, 3)
		if keys := dataKeys(t, "commit"); len(keys) != 2 || !slices.Contains(keys, "commit/data/"+id3) {
			t.Fatalf("data objects after the purge: %v; want the committed blob's and commit/data/%s", keys, id3)
		}
		if keys := s3ListKeys(t, c, "crash", "commit/uploads/"); len(keys) != 0 {
			t.Fatalf("objects left under uploads/: %v", keys)
		}
		if !bytes.Equal(s3ReadAll(t, d, committedDgst), committed) || !bytes.Equal(s3ReadAll(t, d, linkedDgst), linked) {
			t.Fatal("a committed blob differs after the purge")
		}
	})

	t.Run("commit retried", func(t *testing.T) {
		d := newDriver(t, "retry")
		ctx := t.Context()
		content := s3Random(64, 6<<20)
		dgst := digest.FromBytes(content)
		id := start(t, d, content)
		restore := failing(to(http.MethodPut, "/blobs/"))
		err := d.CommitUpload(ctx, id, int64(len(content)), dgst)
		restore()
		if err == nil {
			t.Fatal("CommitUpload succeeded although the link could not be written")
		}
		other := digest.SHA512.FromBytes(content)
		if err := d.CommitUpload(ctx, id, int64(len(content)), other); !errors.Is(err, replication.ErrUploadNotFound) {
			t.Fatalf("retry as another digest: got %v, want ErrUploadNotFound", err)
		}
		if err := d.CommitUpload(ctx, id, int64(len(content)), dgst); err != nil {
			t.Fatalf("retried CommitUpload: %v", err)
		}
		if !bytes.Equal(s3ReadAll(t, d, dgst), content) {
			t.Fatal("blob differs")
		}
		if keys := s3ListKeys(t, c, "crash", "retry/uploads/"); len(keys) != 0 {
			t.Fatalf("objects left under uploads/: %v", keys)
		}
	})

	t.Run("delete", func(t *testing.T) {
		d := newDriver(t, "delete")
		ctx := t.Context()
		dgst := s3Push(t, d, s3Random(65, 1000))
		restore := failing(to(http.MethodDelete, "/data/"))
		err := d.Delete(ctx, dgst)
		restore()
		if err != nil {
			t.Fatalf("Delete whose data could not be removed: %v; want success, the blob being gone", err)
		}
		if _, err := d.Stat(ctx, dgst); !errors.Is(err, replication.ErrBlobNotFound) {
			t.Fatalf("Stat after Delete: %v, want ErrBlobNotFound", err)
		}
		if keys := dataKeys(t, "delete"); len(keys) != 1 {
			t.Fatalf("data objects before the purge: %v, want the deleted blob's", keys)
		}
		purgeAll(t, d, 1)
		if keys := dataKeys(t, "delete"); len(keys) != 0 {
			t.Fatalf("data objects after the purge: %v, want none", keys)
		}
	})

	t.Run("copy", func(t *testing.T) {
		src, dst := newDriver(t, "copy-src"), newDriver(t, "copy-dst")
		ctx := t.Context()
		content := s3Random(66, 2000)
		dgst := s3Push(t, src, content)
		broken := func(r *http.Request) bool {
			return to(http.MethodPut, "/copy-dst/blobs/")(r) || to(http.MethodDelete, "/copy-dst/data/")(r)
		}
		restore := failing(broken)
		err := dst.CopyBlob(ctx, src, dgst)
		restore()
		if err == nil {
			t.Fatal("CopyBlob succeeded although the link could not be written")
		}
		if keys := dataKeys(t, "copy-dst"); len(keys) != 1 {
			t.Fatalf("data objects before the purge: %v, want the copy's", keys)
		}
		purgeAll(t, dst, 1)
		if keys := dataKeys(t, "copy-dst"); len(keys) != 0 {
			t.Fatalf("data objects after the purge: %v, want none", keys)
		}
		if err := dst.CopyBlob(ctx, src, dgst); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(s3ReadAll(t, dst, dgst), content) {
			t.Fatal("copy differs")
		}
	})
}

// TestEnsureBucket: a new cluster's stores are set up by creating each
// region's bucket once; running it again changes nothing, the store then
// opens, and wrong credentials are an error rather than "exists".
func TestEnsureBucket(t *testing.T) {
	srv := s3test.Start(t)
	cfg := replication.StoreConfig{Region: "us-east", URL: srv.URL("fresh")}
	if _, err := replication.OpenStore(t.Context(), cfg); err == nil {
		t.Fatal("OpenStore of a missing bucket succeeded")
	}
	for i, want := range []bool{true, false} {
		created, err := replication.EnsureBucket(t.Context(), cfg)
		if err != nil {
			t.Fatalf("EnsureBucket (run %d): %v", i+1, err)
		}
		if created != want {
			t.Fatalf("EnsureBucket (run %d) created=%v, want %v", i+1, created, want)
		}
	}
	if _, err := replication.OpenStore(t.Context(), cfg); err != nil {
		t.Fatalf("OpenStore after EnsureBucket: %v", err)
	}
	bad := replication.StoreConfig{Region: "us-east", URL: srv.URL("other"), AccessKey: "nobody", SecretKey: "not-the-secret"}
	if _, err := replication.EnsureBucket(t.Context(), bad); err == nil {
		t.Fatal("EnsureBucket with wrong credentials succeeded")
	}
	if created, err := replication.EnsureBucket(t.Context(), replication.StoreConfig{Region: "local", URL: "file://" + t.TempDir()}); err != nil || created {
		t.Fatalf("EnsureBucket of a file store: created=%v err=%v, want nothing to do", created, err)
	}
}
