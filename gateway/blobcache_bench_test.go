package gateway

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/meridian-registry/meridian/replication"
)

// opaqueStore hides the Filesystem driver's type, so the cache wraps it.
type opaqueStore struct{ replication.Driver }

// BenchmarkBlobCacheColdRead reads a fresh 64 MiB blob from a filesystem
// store through the cache (each read fills it: the cold path, with its
// write, hash and follower) and straight from the store.
func BenchmarkBlobCacheColdRead(b *testing.B) {
	for _, cached := range []bool{false, true} {
		name := "direct"
		if cached {
			name = "cold-fill"
		}
		b.Run(name, func(b *testing.B) {
			fs, err := replication.NewFilesystem(b.TempDir())
			if err != nil {
				b.Fatal(err)
			}
			var store replication.Driver = opaqueStore{fs}
			var c *blobCache
			if cached {
				if c, err = newBlobCache(BlobCacheConfig{MaxBytes: 256 << 20, Dir: b.TempDir(), FillOnFirstRead: true}, slog.New(slog.DiscardHandler), nil); err != nil {
					b.Fatal(err)
				}
				defer c.close()
				store = c.wrap("local", store)
			}
			content := bytes.Repeat([]byte("meridian"), 8<<20)
			d := digest.FromBytes(content)
			ctx := context.Background()
			id, _ := fs.StartUpload(ctx)
			fs.WriteUpload(ctx, id, 0, bytes.NewReader(content))
			if err := fs.CommitUpload(ctx, id, int64(len(content)), d); err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(len(content)))
			b.ResetTimer()
			for range b.N {
				if c != nil {
					c.forget(d)
				}
				rc, err := store.Open(ctx, d, 0)
				if err != nil {
					b.Fatal(err)
				}
				n, err := io.Copy(io.Discard, rc)
				rc.Close()
				if err != nil || n != int64(len(content)) {
					b.Fatalf("%d bytes, %v", n, err)
				}
			}
		})
	}
}
