package drivertest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/meridian-registry/meridian/replication"
)

// Run runs the conformance suite as subtests of t.
func Run(t *testing.T, newDriver func(t *testing.T) replication.Driver) {
	tests := []struct {
		name string
		fn   func(t *testing.T, d replication.Driver)
	}{
		{"MissingBlob", testMissingBlob},
		{"SingleWrite", testSingleWrite},
		{"OpenOffsets", testOpenOffsets},
		{"EmptyBlob", testEmptyBlob},
		{"SHA512", testSHA512},
		{"ChunkedUpload", testChunkedUpload},
		{"EarlierOffsetRefused", testEarlierOffsetRefused},
		{"OffsetBeyondSize", testOffsetBeyondSize},
		{"ReaderErrorRollsBack", testReaderErrorRollsBack},
		{"ConcurrentWritesSameOffset", testConcurrentWritesSameOffset},
		{"OpenUpload", testOpenUpload},
		{"InvisibleBeforeCommit", testInvisibleBeforeCommit},
		{"GoneAfterCommit", testGoneAfterCommit},
		{"GoneAfterCancel", testGoneAfterCancel},
		{"CommitShort", testCommitShort},
		{"CommitSizeMismatch", testCommitSizeMismatch},
		{"CommitSameDigestTwice", testCommitSameDigestTwice},
		{"CommitReplacesWrongBytes", testCommitReplacesWrongBytes},
		{"CommitCancelledContext", testCommitCancelledContext},
		{"UploadIDs", testUploadIDs},
		{"MalformedUploadIDs", testMalformedUploadIDs},
		{"InvalidDigest", testInvalidDigest},
		{"DeleteThenStat", testDeleteThenStat},
		{"ConcurrentUploads", testConcurrentUploads},
		{"ConcurrentCommitSameDigest", testConcurrentCommitSameDigest},
		{"ConcurrentCommitSameDigestAcrossParts", testConcurrentCommitSameDigestAcrossParts},
		{"PurgeUploads", testPurgeUploads},
		{"PurgeKeepsBlobs", testPurgeKeepsBlobs},
		{"LargeBlob", testLargeBlob},
		{"SmallChunksAcrossParts", testSmallChunksAcrossParts},
		{"OddChunksAcrossParts", testOddChunksAcrossParts},
		{"OpenUploadBetweenWrites", testOpenUploadBetweenWrites},
		{"ReaderErrorAfterParts", testReaderErrorAfterParts},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.fn(t, newDriver(t))
		})
	}
}

func testMissingBlob(t *testing.T, d replication.Driver) {
	ctx := t.Context()
	dgst := digest.FromString("never stored")
	if _, err := d.Stat(ctx, dgst); !errors.Is(err, replication.ErrBlobNotFound) {
		t.Errorf("Stat: got %v, want ErrBlobNotFound", err)
	}
	if rc, err := d.Open(ctx, dgst, 0); !errors.Is(err, replication.ErrBlobNotFound) {
		closeIfOpen(rc)
		t.Errorf("Open: got %v, want ErrBlobNotFound", err)
	}
	if err := d.Delete(ctx, dgst); !errors.Is(err, replication.ErrBlobNotFound) {
		t.Errorf("Delete: got %v, want ErrBlobNotFound", err)
	}
}

func testSingleWrite(t *testing.T, d replication.Driver) {
	content := randomBytes(1, 100_000)
	dgst := pushBlob(t, d, content)
	if size, err := d.Stat(t.Context(), dgst); err != nil || size != int64(len(content)) {
		t.Fatalf("Stat = %d, %v; want %d", size, err, len(content))
	}
	if got := readBlob(t, d, dgst, 0); !bytes.Equal(got, content) {
		t.Fatalf("read back %d bytes that differ from the %d written", len(got), len(content))
	}
}

func testOpenOffsets(t *testing.T, d replication.Driver) {
	content := randomBytes(2, 10_000)
	dgst := pushBlob(t, d, content)
	for _, off := range []int64{1, 4096, 9_999, 10_000} {
		if got := readBlob(t, d, dgst, off); !bytes.Equal(got, content[off:]) {
			t.Errorf("Open at %d: read %d bytes, want content[%d:] (%d bytes)", off, len(got), off, len(content)-int(off))
		}
	}
	for _, off := range []int64{10_001, 1 << 40, -1} {
		rc, err := d.Open(t.Context(), dgst, off)
		if err == nil {
			rc.Close()
			t.Errorf("Open at %d of a 10000-byte blob succeeded, want an error", off)
		}
	}
}

func testEmptyBlob(t *testing.T, d replication.Driver) {
	dgst := pushBlob(t, d, nil)
	if size, err := d.Stat(t.Context(), dgst); err != nil || size != 0 {
		t.Fatalf("Stat = %d, %v; want 0", size, err)
	}
	if got := readBlob(t, d, dgst, 0); len(got) != 0 {
		t.Fatalf("read %d bytes from an empty blob", len(got))
	}
}

func testSHA512(t *testing.T, d replication.Driver) {
	content := randomBytes(3, 5000)
	id, n := startWrite(t, d, content)
	dgst := digest.SHA512.FromBytes(content)
	if err := d.CommitUpload(t.Context(), id, n, dgst); err != nil {
		t.Fatalf("CommitUpload(%s): %v", dgst, err)
	}
	if got := readBlob(t, d, dgst, 0); !bytes.Equal(got, content) {
		t.Fatal("sha512 blob read back differs")
	}
}

func testChunkedUpload(t *testing.T, d replication.Driver) {
	ctx := t.Context()
	content := randomBytes(4, 300_000)
	id := startUpload(t, d)
	rng := rand.New(rand.NewPCG(4, 4))
	var off int64
	for off < int64(len(content)) {
		end := min(off+1+rng.Int64N(8192), int64(len(content)))
		n, err := d.WriteUpload(ctx, id, off, bytes.NewReader(content[off:end]))
		if err != nil || n != end-off {
			t.Fatalf("WriteUpload at %d = %d, %v; want %d", off, n, err, end-off)
		}
		off = end
		if size, err := d.UploadSize(ctx, id); err != nil || size != off {
			t.Fatalf("UploadSize = %d, %v; want %d", size, err, off)
		}
	}
	dgst := digest.FromBytes(content)
	if err := d.CommitUpload(ctx, id, off, dgst); err != nil {
		t.Fatalf("CommitUpload: %v", err)
	}
	if got := readBlob(t, d, dgst, 0); !bytes.Equal(got, content) {
		t.Fatal("chunked blob read back differs")
	}
}

// Bytes once written are never rewritten: a write at an earlier offset, even
// of the very same bytes, is refused and changes nothing. (Callers resume
// from a hash over the first offset bytes, which a rewrite would falsify.)
func testEarlierOffsetRefused(t *testing.T, d replication.Driver) {
	ctx := t.Context()
	content := randomBytes(5, 30_000)
	id := startUpload(t, d)
	write(t, d, id, 0, content[:10_000])
	write(t, d, id, 10_000, content[10_000:20_000])
	for _, w := range []struct {
		name string
		off  int64
		p    []byte
	}{
		{"same chunk again", 10_000, content[10_000:20_000]},
		{"other bytes at the last offset", 10_000, randomBytes(55, 15_000)},
		{"other bytes at the start", 0, randomBytes(56, 20_000)},
		{"one byte inside", 19_999, []byte("x")},
		{"empty at the start", 0, nil},
	} {
		n, err := d.WriteUpload(ctx, id, w.off, bytes.NewReader(w.p))
		if !errors.Is(err, replication.ErrUploadOffset) || n != 0 {
			t.Errorf("%s (write at %d into a 20000-byte upload) = %d, %v; want 0, ErrUploadOffset", w.name, w.off, n, err)
		}
	}
	if got := readUpload(t, d, id); !bytes.Equal(got, content[:20_000]) {
		t.Fatalf("refused writes changed the upload: it holds %d bytes that differ from the 20000 written", len(got))
	}
	write(t, d, id, 20_000, content[20_000:])
	dgst := digest.FromBytes(content)
	if err := d.CommitUpload(ctx, id, int64(len(content)), dgst); err != nil {
		t.Fatalf("CommitUpload: %v", err)
	}
	if got := readBlob(t, d, dgst, 0); !bytes.Equal(got, content) {
		t.Fatal("blob differs after refused rewrites")
	}
}

func testOffsetBeyondSize(t *testing.T, d replication.Driver) {
	ctx := t.Context()
	id := startUpload(t, d)
	if _, err := d.WriteUpload(ctx, id, 1, bytes.NewReader([]byte("x"))); !errors.Is(err, replication.ErrUploadOffset) {
		t.Errorf("write at 1 into an empty upload: got %v, want ErrUploadOffset", err)
	}
	write(t, d, id, 0, []byte("hello"))
	for _, off := range []int64{6, 1 << 40, -1} {
		if _, err := d.WriteUpload(ctx, id, off, bytes.NewReader([]byte("x"))); !errors.Is(err, replication.ErrUploadOffset) {
			t.Errorf("write at %d into a 5-byte upload: got %v, want ErrUploadOffset", off, err)
		}
	}
	if size := uploadSize(t, d, id); size != 5 {
		t.Errorf("rejected writes changed the upload: it holds %d bytes, want 5", size)
	}
}

var errBrokenReader = errors.New("drivertest: reader broke")

// A chunk whose reader fails midway is dropped whole, whether or not some of
// it reached the store, and the same chunk can be sent again at the same
// offset.
func testReaderErrorRollsBack(t *testing.T, d replication.Driver) {
	for _, failAfter := range []int{0, 1000, 3<<20 + 17} { // none, less and more than any write buffer
		t.Run(fmt.Sprintf("after %d bytes", failAfter), func(t *testing.T) {
			ctx := t.Context()
			content := randomBytes(6, 4000+failAfter)
			id := startUpload(t, d)
			write(t, d, id, 0, content[:2000])
			r := io.MultiReader(bytes.NewReader(content[2000:2000+failAfter]), errReader{errBrokenReader})
			n, err := d.WriteUpload(ctx, id, 2000, r)
			if !errors.Is(err, errBrokenReader) {
				t.Fatalf("WriteUpload with a failing reader: got %v, want the reader's error", err)
			}
			if n != 0 {
				t.Errorf("WriteUpload with a failing reader reported %d bytes written, want 0", n)
			}
			if got := readUpload(t, d, id); !bytes.Equal(got, content[:2000]) {
				t.Fatalf("after a failed chunk the upload holds %d bytes, want the 2000 it held before", len(got))
			}
			write(t, d, id, 2000, content[2000:]) // the retry, at the same offset
			dgst := digest.FromBytes(content)
			if err := d.CommitUpload(ctx, id, int64(len(content)), dgst); err != nil {
				t.Fatalf("CommitUpload: %v", err)
			}
			if got := readBlob(t, d, dgst, 0); !bytes.Equal(got, content) {
				t.Fatal("blob retried after a reader error differs")
			}
		})
	}
}

// Of concurrent writes at the same offset exactly one lands; the others see
// its bytes and are refused, so no interleaving of two chunks can exist.
func testConcurrentWritesSameOffset(t *testing.T, d replication.Driver) {
	const writers = 8
	ctx := t.Context()
	id := startUpload(t, d)
	head := randomBytes(20, 100)
	write(t, d, id, 0, head)
	chunks := make([][]byte, writers)
	errs := make([]error, writers)
	for i := range chunks {
		chunks[i] = randomBytes(uint64(200+i), 256<<10)
	}
	var wg sync.WaitGroup
	for i := range writers {
		wg.Go(func() {
			n, err := d.WriteUpload(ctx, id, int64(len(head)), bytes.NewReader(chunks[i]))
			if err == nil && n != int64(len(chunks[i])) {
				err = fmt.Errorf("wrote %d of %d bytes", n, len(chunks[i]))
			}
			errs[i] = err
		})
	}
	wg.Wait()
	winner := -1
	for i, err := range errs {
		switch {
		case err == nil && winner >= 0:
			t.Errorf("writers %d and %d both wrote at offset %d", winner, i, len(head))
		case err == nil:
			winner = i
		case !errors.Is(err, replication.ErrUploadOffset):
			t.Errorf("writer %d: got %v, want success or ErrUploadOffset", i, err)
		}
	}
	if winner < 0 {
		t.Fatal("no concurrent write succeeded")
	}
	if got := readUpload(t, d, id); !bytes.Equal(got, append(head, chunks[winner]...)) {
		t.Fatalf("upload holds %d bytes, want its head and exactly the winning chunk", len(got))
	}
}

func testOpenUpload(t *testing.T, d replication.Driver) {
	content := randomBytes(7, 20_000)
	id, _ := startWrite(t, d, content)
	rc, err := d.OpenUpload(t.Context(), id)
	if err != nil {
		t.Fatalf("OpenUpload: %v", err)
	}
	defer rc.Close()
	got, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("reading upload: %v", err)
	}
	if !bytes.Equal(got, content) {
		t.Fatalf("OpenUpload read %d bytes that differ from the %d written", len(got), len(content))
	}
}

func testInvisibleBeforeCommit(t *testing.T, d replication.Driver) {
	ctx := t.Context()
	content := randomBytes(8, 1000)
	dgst := digest.FromBytes(content)
	id, n := startWrite(t, d, content)
	if _, err := d.Stat(ctx, dgst); !errors.Is(err, replication.ErrBlobNotFound) {
		t.Fatalf("Stat before commit: got %v, want ErrBlobNotFound", err)
	}
	if rc, err := d.Open(ctx, dgst, 0); !errors.Is(err, replication.ErrBlobNotFound) {
		closeIfOpen(rc)
		t.Fatalf("Open before commit: got %v, want ErrBlobNotFound", err)
	}
	if err := d.CommitUpload(ctx, id, n, dgst); err != nil {
		t.Fatalf("CommitUpload: %v", err)
	}
	if size, err := d.Stat(ctx, dgst); err != nil || size != n {
		t.Fatalf("Stat after commit = %d, %v; want %d", size, err, n)
	}
}

func testGoneAfterCommit(t *testing.T, d replication.Driver) {
	content := randomBytes(9, 1000)
	id, n := startWrite(t, d, content)
	if err := d.CommitUpload(t.Context(), id, n, digest.FromBytes(content)); err != nil {
		t.Fatalf("CommitUpload: %v", err)
	}
	assertUploadGone(t, d, id)
}

func testGoneAfterCancel(t *testing.T, d replication.Driver) {
	content := randomBytes(10, 1000)
	id, _ := startWrite(t, d, content)
	if err := d.CancelUpload(t.Context(), id); err != nil {
		t.Fatalf("CancelUpload: %v", err)
	}
	assertUploadGone(t, d, id)
	if _, err := d.Stat(t.Context(), digest.FromBytes(content)); !errors.Is(err, replication.ErrBlobNotFound) {
		t.Fatalf("Stat of a cancelled upload's digest: got %v, want ErrBlobNotFound", err)
	}
}

func testCommitShort(t *testing.T, d replication.Driver) {
	ctx := t.Context()
	content := randomBytes(11, 2000)
	id, _ := startWrite(t, d, content[:1000])
	dgst := digest.FromBytes(content)
	if err := d.CommitUpload(ctx, id, 2000, dgst); !errors.Is(err, replication.ErrUploadOffset) {
		t.Fatalf("commit of 2000 bytes from a 1000-byte upload: got %v, want ErrUploadOffset", err)
	}
	if _, err := d.Stat(ctx, dgst); !errors.Is(err, replication.ErrBlobNotFound) {
		t.Fatalf("failed commit made the blob visible: Stat = %v", err)
	}
	// The upload survives the failed commit and can be finished.
	write(t, d, id, 1000, content[1000:])
	if err := d.CommitUpload(ctx, id, 2000, dgst); err != nil {
		t.Fatalf("CommitUpload after completing the upload: %v", err)
	}
	if got := readBlob(t, d, dgst, 0); !bytes.Equal(got, content) {
		t.Fatal("blob differs")
	}
}

// A commit must cover exactly the bytes the upload holds: one for fewer is
// refused rather than truncating, and leaves the upload to be committed
// whole.
func testCommitSizeMismatch(t *testing.T, d replication.Driver) {
	ctx := t.Context()
	content := randomBytes(12, 3000)
	id, n := startWrite(t, d, content)
	for _, size := range []int64{0, 1234, n - 1, n + 1, -1} {
		dgst := digest.FromBytes(content[:max(0, min(size, n))])
		if err := d.CommitUpload(ctx, id, size, dgst); !errors.Is(err, replication.ErrUploadOffset) {
			t.Errorf("commit of %d bytes from a %d-byte upload: got %v, want ErrUploadOffset", size, n, err)
		}
		if _, err := d.Stat(ctx, dgst); !errors.Is(err, replication.ErrBlobNotFound) {
			t.Errorf("refused commit of %d bytes made its digest visible: Stat = %v", size, err)
		}
	}
	if got := readUpload(t, d, id); !bytes.Equal(got, content) {
		t.Fatalf("refused commits changed the upload: it holds %d bytes, want the %d written", len(got), n)
	}
	dgst := digest.FromBytes(content)
	if err := d.CommitUpload(ctx, id, n, dgst); err != nil {
		t.Fatalf("CommitUpload of the whole upload: %v", err)
	}
	if got := readBlob(t, d, dgst, 0); !bytes.Equal(got, content) {
		t.Fatal("blob differs")
	}
}

func testCommitSameDigestTwice(t *testing.T, d replication.Driver) {
	content := randomBytes(13, 50_000)
	first := pushBlob(t, d, content)
	second := pushBlob(t, d, content)
	if first != second {
		t.Fatalf("digests differ: %s, %s", first, second)
	}
	if got := readBlob(t, d, first, 0); !bytes.Equal(got, content) {
		t.Fatal("blob committed twice differs")
	}
}

// A driver commits under whatever digest its caller names (the gateway has
// hashed the bytes); if a blob with wrong bytes already sits under a digest
// (planted by a caller that lied, or rotted on disk), the next commit of
// the real bytes must replace them, not keep them because the name exists.
func testCommitReplacesWrongBytes(t *testing.T, d replication.Driver) {
	good := randomBytes(21, 70_000)
	evil := randomBytes(22, len(good)) // same size: a size check alone passes
	dgst := digest.FromBytes(good)
	id, _ := startWrite(t, d, evil)
	if err := d.CommitUpload(t.Context(), id, int64(len(evil)), dgst); err != nil {
		t.Fatalf("planting: CommitUpload: %v", err)
	}
	if got := readBlob(t, d, dgst, 0); !bytes.Equal(got, evil) {
		t.Fatal("the planted bytes did not land; the test would prove nothing")
	}
	id, _ = startWrite(t, d, good)
	if err := d.CommitUpload(t.Context(), id, int64(len(good)), dgst); err != nil {
		t.Fatalf("honest CommitUpload: %v", err)
	}
	if got := readBlob(t, d, dgst, 0); !bytes.Equal(got, good) {
		t.Fatal("after an honest commit the blob still holds the planted bytes")
	}
}

func testCommitCancelledContext(t *testing.T, d replication.Driver) {
	content := randomBytes(14, 1000)
	dgst := digest.FromBytes(content)
	id, n := startWrite(t, d, content)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := d.CommitUpload(ctx, id, n, dgst); err == nil {
		t.Fatal("CommitUpload with a cancelled context succeeded")
	}
	if _, err := d.Stat(t.Context(), dgst); !errors.Is(err, replication.ErrBlobNotFound) {
		t.Fatalf("commit with a cancelled context made the blob visible: Stat = %v", err)
	}
	if _, err := d.StartUpload(ctx); err == nil {
		t.Fatal("StartUpload with a cancelled context succeeded")
	}
}

func testUploadIDs(t *testing.T, d replication.Driver) {
	seen := map[string]bool{}
	for range 50 {
		id := startUpload(t, d)
		if seen[id] {
			t.Fatalf("StartUpload returned %q twice", id)
		}
		seen[id] = true
		if id == "" || url.PathEscape(id) != id || url.QueryEscape(id) != id {
			t.Fatalf("upload id %q is not URL-safe", id)
		}
		if len(id) < 22 { // 128 bits need 22 base64 or 32 hex characters
			t.Fatalf("upload id %q is too short to carry 128 random bits", id)
		}
		if size := uploadSize(t, d, id); size != 0 {
			t.Fatalf("new upload holds %d bytes", size)
		}
	}
}

func testMalformedUploadIDs(t *testing.T, d replication.Driver) {
	valid := startUpload(t, d)
	ids := []string{
		"", "../../etc/passwd", "a/b", "..", ".", "/", "/etc/passwd",
		"../" + valid, "./" + valid, valid + "/", valid + "/x", valid[:len(valid)-1],
		valid + "0", "%2e%2e%2f", "a\x00b", string(bytes.Repeat([]byte("x"), 4096)),
	}
	for _, id := range ids {
		assertUploadGone(t, d, id)
	}
	// None of that may have touched the valid upload.
	if size := uploadSize(t, d, valid); size != 0 {
		t.Fatalf("valid upload holds %d bytes after malformed ids were used", size)
	}
}

func testInvalidDigest(t *testing.T, d replication.Driver) {
	ctx := t.Context()
	content := []byte("some bytes")
	id, n := startWrite(t, d, content)
	sum := sha256.Sum256(content)
	hex := fmt.Sprintf("%x", sum)
	invalid := []digest.Digest{
		"",
		"sha256",
		"sha256:",
		digest.Digest("sha256:" + hex[:63]),
		digest.Digest("sha256:" + hex + "0"),
		digest.Digest("sha256:" + string(bytes.ToUpper([]byte(hex)))),
		digest.Digest("sha256:../../../../" + hex[12:]),
		digest.Digest("md5:" + hex[:32]),
		digest.Digest("sha384:" + hex + hex[:32]), // well formed, not supported
		digest.Digest(hex),
	}
	for _, dgst := range invalid {
		if _, err := d.Stat(ctx, dgst); !errors.Is(err, replication.ErrInvalidDigest) {
			t.Errorf("Stat(%q): got %v, want ErrInvalidDigest", dgst, err)
		}
		if rc, err := d.Open(ctx, dgst, 0); !errors.Is(err, replication.ErrInvalidDigest) {
			closeIfOpen(rc)
			t.Errorf("Open(%q): got %v, want ErrInvalidDigest", dgst, err)
		}
		if err := d.Delete(ctx, dgst); !errors.Is(err, replication.ErrInvalidDigest) {
			t.Errorf("Delete(%q): got %v, want ErrInvalidDigest", dgst, err)
		}
		if err := d.CommitUpload(ctx, id, n, dgst); !errors.Is(err, replication.ErrInvalidDigest) {
			t.Errorf("CommitUpload(%q): got %v, want ErrInvalidDigest", dgst, err)
		}
	}
	// A commit refused for its digest leaves the upload in place.
	if err := d.CommitUpload(ctx, id, n, digest.FromBytes(content)); err != nil {
		t.Fatalf("CommitUpload with the right digest after invalid ones: %v", err)
	}
}

func testDeleteThenStat(t *testing.T, d replication.Driver) {
	ctx := t.Context()
	content := randomBytes(15, 4000)
	dgst := pushBlob(t, d, content)
	if err := d.Delete(ctx, dgst); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if _, err := d.Stat(ctx, dgst); !errors.Is(err, replication.ErrBlobNotFound) {
		t.Fatalf("Stat after Delete: got %v, want ErrBlobNotFound", err)
	}
	if rc, err := d.Open(ctx, dgst, 0); !errors.Is(err, replication.ErrBlobNotFound) {
		closeIfOpen(rc)
		t.Fatalf("Open after Delete: got %v, want ErrBlobNotFound", err)
	}
	if err := d.Delete(ctx, dgst); !errors.Is(err, replication.ErrBlobNotFound) {
		t.Fatalf("second Delete: got %v, want ErrBlobNotFound", err)
	}
	// The digest can be pushed again.
	pushBlob(t, d, content)
	if got := readBlob(t, d, dgst, 0); !bytes.Equal(got, content) {
		t.Fatal("blob pushed again after Delete differs")
	}
}

func testConcurrentUploads(t *testing.T, d replication.Driver) {
	const workers = 16
	contents := make([][]byte, workers)
	for i := range contents {
		contents[i] = randomBytes(uint64(100+i), 64<<10+i*1000)
	}
	var wg sync.WaitGroup
	for i := range workers {
		wg.Go(func() {
			if err := pushChunked(t.Context(), d, contents[i], 4096+i); err != nil {
				t.Errorf("worker %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	for i, content := range contents {
		if got := readBlob(t, d, digest.FromBytes(content), 0); !bytes.Equal(got, content) {
			t.Errorf("blob of worker %d differs", i)
		}
	}
}

func testConcurrentCommitSameDigest(t *testing.T, d replication.Driver) {
	const workers = 8
	content := randomBytes(16, 256<<10)
	var wg sync.WaitGroup
	for i := range workers {
		wg.Go(func() {
			if err := pushChunked(t.Context(), d, content, 32<<10); err != nil {
				t.Errorf("worker %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	if got := readBlob(t, d, digest.FromBytes(content), 0); !bytes.Equal(got, content) {
		t.Fatal("blob committed concurrently differs")
	}
}

// testConcurrentCommitSameDigestAcrossParts races commits of a blob of
// several 5 MiB parts, each upload ending in a partial part.
func testConcurrentCommitSameDigestAcrossParts(t *testing.T, d replication.Driver) {
	const workers = 4
	content := randomBytes(17, 11<<20+4321)
	var wg sync.WaitGroup
	for i := range workers {
		wg.Go(func() {
			if err := pushChunked(t.Context(), d, content, 3<<20); err != nil {
				t.Errorf("worker %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	dgst := digest.FromBytes(content)
	if size, err := d.Stat(t.Context(), dgst); err != nil || size != int64(len(content)) {
		t.Fatalf("Stat = %d, %v; want %d", size, err, len(content))
	}
	if got := readBlob(t, d, dgst, 0); !bytes.Equal(got, content) {
		t.Fatal("blob committed concurrently differs")
	}
}

// testPurgeKeepsBlobs purges with a cutoff after everything was written:
// every upload goes, no committed blob does.
func testPurgeKeepsBlobs(t *testing.T, d replication.Driver) {
	ctx := t.Context()
	contents := [][]byte{nil, randomBytes(18, 1000), randomBytes(19, 6<<20+7)}
	var dgsts []digest.Digest
	for _, content := range contents {
		dgsts = append(dgsts, pushBlob(t, d, content))
	}
	open := startUpload(t, d)
	write(t, d, open, 0, randomBytes(20, 6<<20))
	if n, err := d.PurgeUploads(ctx, time.Now().Add(time.Hour)); err != nil || n != 1 {
		t.Fatalf("PurgeUploads(an hour from now) = %d, %v; want 1 (the open upload)", n, err)
	}
	assertUploadGone(t, d, open)
	for i, dgst := range dgsts {
		if got := readBlob(t, d, dgst, 0); !bytes.Equal(got, contents[i]) {
			t.Errorf("blob of %d bytes after the purge: %d bytes that differ", len(contents[i]), len(got))
		}
	}
}

// purgeClockSlack covers the coarsest modification time a store may keep
// (S3 keeps whole seconds, Linux file times lag the clock by a tick).
const purgeClockSlack = 1100 * time.Millisecond

func testPurgeUploads(t *testing.T, d replication.Driver) {
	ctx := t.Context()
	stale := startUpload(t, d)
	write(t, d, stale, 0, []byte("stale"))
	touched := startUpload(t, d)
	write(t, d, touched, 0, []byte("old start"))
	cutoff := time.Now()
	// The test needs time to pass: uploads written from now on must carry
	// a modification time at or after cutoff in the store's resolution.
	time.Sleep(purgeClockSlack)
	write(t, d, touched, 9, []byte(", written again"))
	fresh := startUpload(t, d)
	write(t, d, fresh, 0, []byte("fresh"))

	if n, err := d.PurgeUploads(ctx, cutoff.Add(-time.Hour)); err != nil || n != 0 {
		t.Fatalf("PurgeUploads(an hour before every write) = %d, %v; want 0", n, err)
	}
	n, err := d.PurgeUploads(ctx, cutoff)
	if err != nil || n != 1 {
		t.Fatalf("PurgeUploads(cutoff) = %d, %v; want 1 (the stale upload)", n, err)
	}
	assertUploadGone(t, d, stale)
	if size := uploadSize(t, d, touched); size != 24 {
		t.Fatalf("upload written after the cutoff holds %d bytes, want 24", size)
	}
	if size := uploadSize(t, d, fresh); size != 5 {
		t.Fatalf("fresh upload holds %d bytes, want 5", size)
	}
	if n, err := d.PurgeUploads(ctx, time.Now().Add(time.Hour)); err != nil || n != 2 {
		t.Fatalf("PurgeUploads(an hour from now) = %d, %v; want 2", n, err)
	}
	assertUploadGone(t, d, touched)
	assertUploadGone(t, d, fresh)
}

// testLargeBlob streams 64 MiB from a generator, never holding it in memory,
// and compares digests of what was written and what is read back.
func testLargeBlob(t *testing.T, d replication.Driver) {
	if testing.Short() {
		t.Skip("64 MiB blob skipped in -short mode")
	}
	ctx := t.Context()
	const size = 64 << 20
	id := startUpload(t, d)
	h := digest.SHA256.Digester()
	src := io.TeeReader(io.LimitReader(&generator{rng: rand.NewChaCha8([32]byte{17})}, size), h.Hash())
	n, err := d.WriteUpload(ctx, id, 0, src)
	if err != nil || n != size {
		t.Fatalf("WriteUpload = %d, %v; want %d", n, err, size)
	}
	dgst := h.Digest()
	if err := d.CommitUpload(ctx, id, size, dgst); err != nil {
		t.Fatalf("CommitUpload: %v", err)
	}
	if got, err := d.Stat(ctx, dgst); err != nil || got != size {
		t.Fatalf("Stat = %d, %v; want %d", got, err, size)
	}
	for _, off := range []int64{0, size/2 + 12345} {
		rc, err := d.Open(ctx, dgst, off)
		if err != nil {
			t.Fatalf("Open at %d: %v", off, err)
		}
		rh := sha256.New()
		got, err := io.Copy(rh, rc)
		rc.Close()
		if err != nil || got != size-off {
			t.Fatalf("reading from %d: %d bytes, %v; want %d", off, got, err, size-off)
		}
		if off == 0 && digest.NewDigest(digest.SHA256, rh) != dgst {
			t.Fatal("64 MiB blob read back has a different sha256")
		}
	}
}

// The tests below write blobs of several times 5 MiB, the smallest part an
// S3 multipart upload accepts (and the part size S3 drivers are tested
// with), in chunks that start, end and straddle part boundaries.

// testSmallChunksAcrossParts writes 12 MiB in chunks of 64 KiB to 3 MiB, as
// a client sending small PATCH requests does, and reads the upload back
// midway.
func testSmallChunksAcrossParts(t *testing.T, d replication.Driver) {
	content := randomBytes(30, 12<<20+12345)
	id := startUpload(t, d)
	rng := rand.New(rand.NewPCG(30, 30))
	checked := 0
	for off := 0; off < len(content); {
		end := min(off+64<<10+rng.IntN(3<<20-64<<10), len(content))
		write(t, d, id, int64(off), content[off:end])
		off = end
		if size := uploadSize(t, d, id); size != int64(off) {
			t.Fatalf("UploadSize = %d after writing %d bytes", size, off)
		}
		if off >= (checked+1)*(5<<20) { // once past each 5 MiB boundary
			checked++
			if got := readUpload(t, d, id); !bytes.Equal(got, content[:off]) {
				t.Fatalf("upload read after %d bytes: %d bytes that differ", off, len(got))
			}
		}
	}
	commitAndCheck(t, d, id, content)
}

// testOddChunksAcrossParts writes 25 MiB in chunks of 1 byte, 5 MiB minus
// one, 5 MiB, 5 MiB plus one and other odd sizes.
func testOddChunksAcrossParts(t *testing.T, d replication.Driver) {
	sizes := []int{1, 5<<20 - 1, 5 << 20, 5<<20 + 1, 7<<20 + 3, 3<<20 + 5, 17, 1}
	total := 0
	for _, n := range sizes {
		total += n
	}
	content := randomBytes(31, total)
	id := startUpload(t, d)
	off := 0
	for _, n := range sizes {
		write(t, d, id, int64(off), content[off:off+n])
		off += n
	}
	if size := uploadSize(t, d, id); size != int64(total) {
		t.Fatalf("UploadSize = %d, want %d", size, total)
	}
	dgst := commitAndCheck(t, d, id, content)
	for _, off := range []int64{5<<20 - 1, 5 << 20, 10<<20 + 1, 15 << 20, int64(total) - 1} {
		if got := readBlob(t, d, dgst, off); !bytes.Equal(got, content[off:]) {
			t.Errorf("Open at %d: %d bytes that differ from content[%d:]", off, len(got), off)
		}
	}
}

// testOpenUploadBetweenWrites reads the upload (as a gateway hashing sha512
// does) between writes that each cross part boundaries: reading must not
// change what later writes and the commit see.
func testOpenUploadBetweenWrites(t *testing.T, d replication.Driver) {
	ctx := t.Context()
	content := randomBytes(32, 13<<20+100)
	id := startUpload(t, d)
	marks := []int{6 << 20, 6<<20 + 10, 13 << 20, len(content)}
	off := 0
	for _, end := range marks {
		write(t, d, id, int64(off), content[off:end])
		off = end
		if got := readUpload(t, d, id); !bytes.Equal(got, content[:off]) {
			t.Fatalf("upload read at %d: %d bytes that differ", off, len(got))
		}
	}
	// A failed chunk after a read leaves the upload as it was.
	r := io.MultiReader(bytes.NewReader(randomBytes(33, 6<<20)), errReader{errBrokenReader})
	if _, err := d.WriteUpload(ctx, id, int64(off), r); !errors.Is(err, errBrokenReader) {
		t.Fatalf("WriteUpload with a failing reader: got %v", err)
	}
	if got := readUpload(t, d, id); !bytes.Equal(got, content) {
		t.Fatalf("after a failed chunk the upload holds %d bytes that differ", len(got))
	}
	dgst := digest.SHA512.FromBytes(content)
	if err := d.CommitUpload(ctx, id, int64(len(content)), dgst); err != nil {
		t.Fatalf("CommitUpload: %v", err)
	}
	if got := readBlob(t, d, dgst, 0); !bytes.Equal(got, content) {
		t.Fatal("blob read back differs")
	}
}

// testReaderErrorAfterParts fails a chunk after more than two 5 MiB parts of
// it may have been stored.
func testReaderErrorAfterParts(t *testing.T, d replication.Driver) {
	ctx := t.Context()
	content := randomBytes(34, 2000+11<<20+5+3000)
	id := startUpload(t, d)
	write(t, d, id, 0, content[:2000])
	r := io.MultiReader(bytes.NewReader(content[2000:2000+11<<20+5]), errReader{errBrokenReader})
	if n, err := d.WriteUpload(ctx, id, 2000, r); !errors.Is(err, errBrokenReader) || n != 0 {
		t.Fatalf("WriteUpload with a reader failing after 11 MiB = %d, %v; want 0 and the reader's error", n, err)
	}
	if size := uploadSize(t, d, id); size != 2000 {
		t.Fatalf("after a failed chunk the upload holds %d bytes, want 2000", size)
	}
	write(t, d, id, 2000, content[2000:])
	commitAndCheck(t, d, id, content)
}

// commitAndCheck commits upload id as content's sha256 digest and checks the
// blob reads back as content.
func commitAndCheck(t *testing.T, d replication.Driver, id string, content []byte) digest.Digest {
	t.Helper()
	dgst := digest.FromBytes(content)
	if err := d.CommitUpload(t.Context(), id, int64(len(content)), dgst); err != nil {
		t.Fatalf("CommitUpload: %v", err)
	}
	if size, err := d.Stat(t.Context(), dgst); err != nil || size != int64(len(content)) {
		t.Fatalf("Stat = %d, %v; want %d", size, err, len(content))
	}
	if got := readBlob(t, d, dgst, 0); !bytes.Equal(got, content) {
		t.Fatalf("blob read back: %d bytes that differ from the %d written", len(got), len(content))
	}
	return dgst
}

// generator is an endless pseudo-random reader, so a large blob never exists
// in memory.
type generator struct{ rng *rand.ChaCha8 }

func (g *generator) Read(p []byte) (int, error) {
	return g.rng.Read(p)
}

type errReader struct{ err error }

func (r errReader) Read([]byte) (int, error) { return 0, r.err }

func randomBytes(seed uint64, n int) []byte {
	var key [32]byte
	key[0], key[1] = byte(seed), byte(seed>>8)
	b := make([]byte, n)
	rand.NewChaCha8(key).Read(b)
	return b
}

func startUpload(t *testing.T, d replication.Driver) string {
	t.Helper()
	id, err := d.StartUpload(t.Context())
	if err != nil {
		t.Fatalf("StartUpload: %v", err)
	}
	return id
}

func write(t *testing.T, d replication.Driver, id string, offset int64, p []byte) {
	t.Helper()
	n, err := d.WriteUpload(t.Context(), id, offset, bytes.NewReader(p))
	if err != nil || n != int64(len(p)) {
		t.Fatalf("WriteUpload(%d bytes at %d) = %d, %v", len(p), offset, n, err)
	}
}

func uploadSize(t *testing.T, d replication.Driver, id string) int64 {
	t.Helper()
	size, err := d.UploadSize(t.Context(), id)
	if err != nil {
		t.Fatalf("UploadSize: %v", err)
	}
	return size
}

// startWrite starts an upload and writes content into it in one request.
func startWrite(t *testing.T, d replication.Driver, content []byte) (string, int64) {
	t.Helper()
	id := startUpload(t, d)
	write(t, d, id, 0, content)
	return id, int64(len(content))
}

// pushBlob uploads content in one write, commits it under its sha256 digest
// and returns the digest.
func pushBlob(t *testing.T, d replication.Driver, content []byte) digest.Digest {
	t.Helper()
	id, n := startWrite(t, d, content)
	dgst := digest.FromBytes(content)
	if err := d.CommitUpload(t.Context(), id, n, dgst); err != nil {
		t.Fatalf("CommitUpload: %v", err)
	}
	return dgst
}

// pushChunked is pushBlob in chunks of chunk bytes, usable from goroutines.
func pushChunked(ctx context.Context, d replication.Driver, content []byte, chunk int) error {
	id, err := d.StartUpload(ctx)
	if err != nil {
		return fmt.Errorf("StartUpload: %w", err)
	}
	for off := 0; off < len(content); off += chunk {
		end := min(off+chunk, len(content))
		n, err := d.WriteUpload(ctx, id, int64(off), bytes.NewReader(content[off:end]))
		if err != nil || n != int64(end-off) {
			return fmt.Errorf("WriteUpload at %d = %d, %v", off, n, err)
		}
	}
	if err := d.CommitUpload(ctx, id, int64(len(content)), digest.FromBytes(content)); err != nil {
		return fmt.Errorf("CommitUpload: %w", err)
	}
	return nil
}

func readBlob(t *testing.T, d replication.Driver, dgst digest.Digest, offset int64) []byte {
	t.Helper()
	rc, err := d.Open(t.Context(), dgst, offset)
	if err != nil {
		t.Fatalf("Open(%s, %d): %v", dgst, offset, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("reading %s from %d: %v", dgst, offset, err)
	}
	return b
}

// readUpload returns everything upload id holds.
func readUpload(t *testing.T, d replication.Driver, id string) []byte {
	t.Helper()
	rc, err := d.OpenUpload(t.Context(), id)
	if err != nil {
		t.Fatalf("OpenUpload: %v", err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("reading upload: %v", err)
	}
	return b
}

// assertUploadGone checks that every upload operation on id reports
// ErrUploadNotFound.
func assertUploadGone(t *testing.T, d replication.Driver, id string) {
	t.Helper()
	ctx := t.Context()
	if _, err := d.WriteUpload(ctx, id, 0, bytes.NewReader([]byte("x"))); !errors.Is(err, replication.ErrUploadNotFound) {
		t.Errorf("WriteUpload(%.40q): got %v, want ErrUploadNotFound", id, err)
	}
	if _, err := d.UploadSize(ctx, id); !errors.Is(err, replication.ErrUploadNotFound) {
		t.Errorf("UploadSize(%.40q): got %v, want ErrUploadNotFound", id, err)
	}
	if rc, err := d.OpenUpload(ctx, id); !errors.Is(err, replication.ErrUploadNotFound) {
		closeIfOpen(rc)
		t.Errorf("OpenUpload(%.40q): got %v, want ErrUploadNotFound", id, err)
	}
	if err := d.CommitUpload(ctx, id, 0, digest.FromString("")); !errors.Is(err, replication.ErrUploadNotFound) {
		t.Errorf("CommitUpload(%.40q): got %v, want ErrUploadNotFound", id, err)
	}
	if err := d.CancelUpload(ctx, id); !errors.Is(err, replication.ErrUploadNotFound) {
		t.Errorf("CancelUpload(%.40q): got %v, want ErrUploadNotFound", id, err)
	}
}

func closeIfOpen(rc io.ReadCloser) {
	if rc != nil {
		rc.Close()
	}
}
