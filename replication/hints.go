package replication

// ChunkHinter is implemented by drivers that work best with upload chunks of
// at least some size; the gateway advertises it as OCI-Chunk-Min-Length.
// Smaller chunks still work.
type ChunkHinter interface {
	MinChunkLength() int64
}

// MinChunkLength is S3's minimum multipart part size: a chunk below it is
// parked and read back once when the next chunk arrives.
func (s *S3) MinChunkLength() int64 { return S3MinPartSize }
