package gateway

import (
	"hash"
	"io"
	"sync"
)

// pipelinedHash reads a request body in large pieces and hashes each piece
// on another goroutine while the caller writes it to the store, so hashing
// overlaps the network and disk instead of adding to them.
type pipelinedHash struct {
	src  io.Reader
	free chan []byte
	work chan []byte
	done sync.WaitGroup

	cur  []byte // the piece being handed out
	pos  int
	err  error
	stop sync.Once
}

const (
	hashPieceSize = 256 << 10
	hashPieces    = 4
)

// newPipelinedHash hashes into h everything read from src. Call Wait before
// reading h.
func newPipelinedHash(src io.Reader, h hash.Hash) *pipelinedHash {
	p := &pipelinedHash{src: src, free: make(chan []byte, hashPieces), work: make(chan []byte, hashPieces)}
	for range hashPieces {
		p.free <- make([]byte, hashPieceSize)
	}
	p.done.Add(1)
	go func() {
		defer p.done.Done()
		for piece := range p.work {
			h.Write(piece)
			p.free <- piece[:cap(piece)]
		}
	}()
	return p
}

// Read hands out the current piece, filling the next one from src when it
// is used up. A piece goes to the hasher when it is filled; it comes back
// to the free list only after it is hashed and no longer handed out.
func (p *pipelinedHash) Read(b []byte) (int, error) {
	if p.pos == len(p.cur) {
		if p.err != nil {
			return 0, p.err
		}
		buf := <-p.free
		n, err := fill(p.src, buf)
		p.cur, p.pos, p.err = buf[:n], 0, err
		if n > 0 {
			p.work <- p.cur
		} else {
			p.free <- buf
		}
		if n == 0 {
			return 0, p.err
		}
	}
	n := copy(b, p.cur[p.pos:])
	p.pos += n
	return n, nil
}

// Wait stops the hasher once every piece read so far is hashed.
func (p *pipelinedHash) Wait() {
	p.stop.Do(func() { close(p.work) })
	p.done.Wait()
}

// fill reads into buf until it is full or src fails, and keeps src's own
// error (a truncated body must stay distinguishable from its end).
func fill(src io.Reader, buf []byte) (int, error) {
	n := 0
	for n < len(buf) {
		m, err := src.Read(buf[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}
