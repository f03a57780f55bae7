package replication_test

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/opencontainers/go-digest"

	"github.com/meridian-registry/meridian/replication"
	"github.com/meridian-registry/meridian/replication/s3test"
)

const (
	copyBenchBlobs    = 10
	copyBenchBlobSize = 10 << 20
	copyBenchPartSize = 16 << 20
)

// BenchmarkCrossRegionCopy compares the replicator's copy between two
// regions with the cheapest copy the same two S3 servers allow. Two
// versitygw servers stand for two regions (two endpoints, so the driver
// cannot copy server-side); ten random 10 MiB blobs are uploaded into
// region A through the S3 driver, and the same bytes as plain objects
// raw/<n>. Each operation then copies every blob A → B twice, interleaved
// and in alternating order so that load from other processes falls on both
// alike:
//
//   - copy-MB/s: replication.Copy, streamed from A's driver into an upload
//     on B's, hashed on the way and committed under its digest;
//   - raw-MB/s: minio-go GetObject of raw/<n> from A piped into PutObject on
//     B (size known, 16 MiB parts), with no hashing and no upload state.
//
// copy/raw is their ratio: the share of the servers' own copy rate the
// replicator achieves. MB are 10^6 bytes.
func BenchmarkCrossRegionCopy(b *testing.B) {
	srcSrv, dstSrv := s3test.Start(b), s3test.Start(b)
	srcSrv.CreateBucket(b, "region-a")
	dstSrv.CreateBucket(b, "region-b")
	src := newBenchS3(b, srcSrv, "region-a")
	dst := newBenchS3(b, dstSrv, "region-b")
	srcRaw, dstRaw := srcSrv.Client(b), dstSrv.Client(b)
	ctx := b.Context()

	digests := make([]digest.Digest, copyBenchBlobs)
	for k := range copyBenchBlobs {
		var err error
		if digests[k], err = uploadBenchBlob(ctx, src, copyBenchStream(k)); err != nil {
			b.Fatal(err)
		}
		if _, err := srcRaw.PutObject(ctx, "region-a", rawKey(k), copyBenchStream(k), copyBenchBlobSize,
			minio.PutObjectOptions{PartSize: copyBenchPartSize}); err != nil {
			b.Fatalf("put %s: %v", rawKey(k), err)
		}
	}

	verified := func(k int) error {
		return replication.Copy(ctx, src, dst, digests[k], copyBenchBlobSize)
	}
	raw := func(k int) error {
		obj, err := srcRaw.GetObject(ctx, "region-a", rawKey(k), minio.GetObjectOptions{})
		if err != nil {
			return err
		}
		defer obj.Close()
		_, err = dstRaw.PutObject(ctx, "region-b", rawKey(k), obj, copyBenchBlobSize,
			minio.PutObjectOptions{PartSize: copyBenchPartSize})
		return err
	}
	var copyTime, rawTime time.Duration
	timed := func(total *time.Duration, what string, k int, f func(int) error) {
		start := time.Now()
		if err := f(k); err != nil {
			b.Fatalf("%s of blob %d: %v", what, k, err)
		}
		*total += time.Since(start)
	}
	for b.Loop() {
		for k := range copyBenchBlobs {
			if k%2 == 0 {
				timed(&copyTime, "replication.Copy", k, verified)
				timed(&rawTime, "raw copy", k, raw)
			} else {
				timed(&rawTime, "raw copy", k, raw)
				timed(&copyTime, "replication.Copy", k, verified)
			}
		}
	}
	mb := float64(b.N*copyBenchBlobs*copyBenchBlobSize) / 1e6
	copyRate, rawRate := mb/copyTime.Seconds(), mb/rawTime.Seconds()
	b.ReportMetric(copyRate, "copy-MB/s")
	b.ReportMetric(rawRate, "raw-MB/s")
	b.ReportMetric(copyRate/rawRate, "copy/raw")
}

// newBenchS3 is an S3 driver on bucket with the production defaults (16 MiB
// parts), unlike the conformance tests' smallest parts.
func newBenchS3(b *testing.B, srv *s3test.Server, bucket string) *replication.S3 {
	b.Helper()
	d, err := replication.NewS3(b.Context(), replication.S3Config{
		Endpoint:  srv.Endpoint(),
		Bucket:    bucket,
		AccessKey: srv.AccessKey(),
		SecretKey: srv.SecretKey(),
		PathStyle: true,
	})
	if err != nil {
		b.Fatalf("NewS3: %v", err)
	}
	return d
}

// uploadBenchBlob stores r's bytes as a blob through d's upload, hashing
// them on the way, and returns the digest.
func uploadBenchBlob(ctx context.Context, d replication.Driver, r io.Reader) (digest.Digest, error) {
	id, err := d.StartUpload(ctx)
	if err != nil {
		return "", err
	}
	dg := digest.SHA256.Digester()
	n, err := d.WriteUpload(ctx, id, 0, io.TeeReader(r, dg.Hash()))
	if err != nil {
		return "", err
	}
	if err := d.CommitUpload(ctx, id, n, dg.Digest()); err != nil {
		return "", err
	}
	return dg.Digest(), nil
}

// copyBenchStream yields blob k's bytes: pseudo-random, the same on every
// call, never held whole in memory.
func copyBenchStream(k int) io.Reader {
	return io.LimitReader(rand.NewChaCha8([32]byte{'c', byte(k)}), copyBenchBlobSize)
}

func rawKey(k int) string { return fmt.Sprintf("raw/%d", k) }
