package replication

// ReadBuffersInUse is how many of the S3 driver's read buffers are taken,
// so tests can check that readers give them back.
func (s *S3) ReadBuffersInUse() int { return len(s.reads.slots) }
