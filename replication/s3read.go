package replication

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/minio/minio-go/v7"
)

// Parallel reads of large blobs.
//
// One GET streams an object at the rate one connection and one server
// thread give. A blob larger than a read part is read instead as ranged GETs
// of ReadPartSize bytes, several in flight, each filling a buffer that the
// reader hands out in order. The read-ahead starts at one part and doubles
// as the caller consumes parts, so a short ranged read costs little more
// than one part. The buffers come from a budget shared by all readers of a
// driver (ReadBuffers); a reader that finds the budget spent streams one
// GET as before, so a crowd of slow clients cannot hold memory beyond it
// or starve each other.

const (
	// DefaultS3ReadPartSize is S3Config.ReadPartSize when left zero.
	DefaultS3ReadPartSize = 8 << 20
	// DefaultS3ReadBuffers is S3Config.ReadBuffers when left zero.
	DefaultS3ReadBuffers = 16
	// s3ReadAhead is the most parts one reader has in flight.
	s3ReadAhead = 4
)

// readBudget hands out read buffers of one size, at most cap(slots) at once.
type readBudget struct {
	size  int
	slots chan struct{}
	pool  sync.Pool // *[]byte of size
}

func newReadBudget(size, buffers int) *readBudget {
	b := &readBudget{size: size, slots: make(chan struct{}, buffers)}
	b.pool.New = func() any {
		p := make([]byte, size)
		return &p
	}
	return b
}

// take reserves up to n buffers without waiting and returns them.
func (b *readBudget) take(n int) []*[]byte {
	var bufs []*[]byte
	for range n {
		select {
		case b.slots <- struct{}{}:
			bufs = append(bufs, b.pool.Get().(*[]byte))
		default:
			return bufs
		}
	}
	return bufs
}

// give returns buffers that take handed out.
func (b *readBudget) give(bufs []*[]byte) {
	for _, p := range bufs {
		b.pool.Put(p)
		<-b.slots
	}
}

// fetchFunc reads exactly len(p) bytes of the object at off into p. It
// stops when ctx ends.
type fetchFunc func(ctx context.Context, off int64, p []byte) error

// partReader reads [off, end) of an object as parts fetched in parallel.
// Read and WriteTo may not be called concurrently with each other (as any
// io.Reader); Close may be called at any time, once or more, and makes a
// Read waiting for a part return.
type partReader struct {
	mu     sync.Mutex // held by Read and WriteTo, and by Close to release the buffers
	ctx    context.Context
	cancel context.CancelFunc
	fetch  fetchFunc
	fail   func(error) error // wraps a fetch's error for the caller
	budget *readBudget
	owned  []*[]byte // every buffer taken from budget, returned by Close

	next, end int64     // the next part to schedule starts at next
	free      []*[]byte // owned buffers holding no part
	queue     []*part   // scheduled parts, in order
	ahead     int       // how many parts may be in flight now
	cur       *part     // the part being read from
	pos       int       // read position in cur
	err       error     // sticky: io.EOF or the first failure

	wg        sync.WaitGroup
	closeOnce sync.Once
}

// part is one ranged GET into buf[:n].
type part struct {
	buf  *[]byte
	off  int64
	n    int
	done chan struct{}
	err  error // set before done closes
}

// newPartReader starts reading [off, end) with the buffers bufs (at least
// one, taken from budget, which gets them back on Close). fetch's errors
// reach the caller through fail.
func newPartReader(ctx context.Context, fetch fetchFunc, fail func(error) error, budget *readBudget, bufs []*[]byte, off, end int64) *partReader {
	ctx, cancel := context.WithCancel(ctx)
	r := &partReader{ctx: ctx, cancel: cancel, fetch: fetch, fail: fail, budget: budget,
		owned: bufs, free: append([]*[]byte(nil), bufs...), next: off, end: end, ahead: 1}
	r.schedule()
	return r
}

// schedule starts fetching parts while buffers are free and the read-ahead
// allows.
func (r *partReader) schedule() {
	for r.next < r.end && len(r.free) > 0 && len(r.queue) < r.ahead {
		buf := r.free[len(r.free)-1]
		r.free = r.free[:len(r.free)-1]
		p := &part{buf: buf, off: r.next, n: int(min(int64(len(*buf)), r.end-r.next)), done: make(chan struct{})}
		r.next += int64(p.n)
		r.queue = append(r.queue, p)
		r.wg.Go(func() {
			defer close(p.done)
			p.err = r.fetch(r.ctx, p.off, (*p.buf)[:p.n])
		})
	}
}

// advance makes the next part current, waiting for its bytes. It returns
// io.EOF after the last part, or the part's error.
func (r *partReader) advance() error {
	if r.cur != nil {
		r.free = append(r.free, r.cur.buf)
		r.cur = nil
		r.ahead = min(2*r.ahead, s3ReadAhead)
	}
	r.schedule()
	if len(r.queue) == 0 {
		return io.EOF
	}
	p := r.queue[0]
	r.queue = r.queue[1:]
	<-p.done // fetch returns once r.ctx ends, so Close never waits on a slow store
	if p.err != nil {
		if r.ctx.Err() != nil {
			return errPartsClosed
		}
		return r.fail(p.err)
	}
	r.cur, r.pos = p, 0
	r.schedule() // the part just taken freed a place in the queue
	return nil
}

// start waits for the first part, so that a blob that cannot be read fails
// its Open rather than its first Read.
func (r *partReader) start() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.advance(); err != nil && err != io.EOF {
		r.err = err
		return err
	}
	return nil
}

var errPartsClosed = errors.New("replication: read from a closed blob reader")

// Read implements io.Reader.
func (r *partReader) Read(b []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for r.err == nil {
		if r.cur != nil && r.pos < r.cur.n {
			n := copy(b, (*r.cur.buf)[r.pos:r.cur.n])
			r.pos += n
			return n, nil
		}
		r.err = r.advance()
	}
	return 0, r.err
}

// WriteTo implements io.WriterTo: each part goes to w in one Write, with
// no copy through a small buffer.
func (r *partReader) WriteTo(w io.Writer) (int64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var total int64
	for r.err == nil {
		if r.cur != nil && r.pos < r.cur.n {
			n, err := w.Write((*r.cur.buf)[r.pos:r.cur.n])
			r.pos += n
			total += int64(n)
			if err != nil {
				return total, err
			}
			continue
		}
		r.err = r.advance()
	}
	if r.err == io.EOF {
		return total, nil
	}
	return total, r.err
}

// Close cancels the parts in flight, waits for them to stop, and returns
// the buffers to the budget.
func (r *partReader) Close() error {
	r.closeOnce.Do(func() {
		r.cancel() // first, so that a Read waiting for a part lets go of mu
		r.mu.Lock()
		defer r.mu.Unlock()
		r.wg.Wait()
		if r.err == nil {
			r.err = errPartsClosed
		}
		r.budget.give(r.owned)
		r.owned, r.free, r.queue, r.cur = nil, nil, nil, nil
	})
	return nil
}

// fetchRange is a fetchFunc reading object key with ranged GETs.
func (s *S3) fetchRange(key string) fetchFunc {
	return func(ctx context.Context, off int64, p []byte) error {
		var opts minio.GetObjectOptions
		if err := opts.SetRange(off, off+int64(len(p))-1); err != nil {
			return err
		}
		body, _, _, err := s.core.GetObject(ctx, s.cfg.Bucket, key, opts)
		if err != nil {
			return err
		}
		defer body.Close()
		n, err := fill(body, p)
		if n == len(p) {
			return nil // the last bytes may come with io.EOF
		}
		if errors.Is(err, io.EOF) {
			return fmt.Errorf("the store sent %d of the %d bytes at offset %d: %w", n, len(p), off, io.ErrUnexpectedEOF)
		}
		return err
	}
}

// ReadBuffersInUse is how many of the driver's read buffers readers hold.
func (s *S3) ReadBuffersInUse() int { return len(s.reads.slots) }
