package replication

import (
	"os"
	"syscall"
)

// startWriteback asks the kernel to start writing [off, off+n) of f to disk
// without waiting for it (sync_file_range with SYNC_FILE_RANGE_WRITE). It is
// only a hint: durability still comes from the fsync at commit.
func startWriteback(f *os.File, off, n int64) {
	_ = syscall.SyncFileRange(int(f.Fd()), off, n, 0x2 /* SYNC_FILE_RANGE_WRITE */)
}
