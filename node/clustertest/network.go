package clustertest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
)

// ErrCut is what a dial across a cut fails with.
var ErrCut = errors.New("clustertest: connection cut")

// network is the table every node's Dial consults: which node owns which
// Raft and gRPC address, which partition group each node is in, and the
// connections open between nodes so a cut can close them.
//
// Nodes in different groups cannot reach each other. Everyone starts in
// group 0; Cut gives a node a group of its own.
type network struct {
	mu        sync.Mutex
	owner     map[string]int // Raft or gRPC address → node index
	group     map[int]int    // node index → partition group (absent: 0)
	nextGroup int
	dead      map[int]bool // killed nodes: nothing reaches them, nothing leaves them
	conns     map[*conn]struct{}
}

func newNetwork() *network {
	return &network{owner: map[string]int{}, group: map[int]int{}, dead: map[int]bool{}, conns: map[*conn]struct{}{}}
}

// setAddrs records the addresses node i now listens on, forgetting its old
// ones, and closes connections to them that cross a cut.
func (nw *network) setAddrs(i int, addrs ...string) {
	nw.mu.Lock()
	for a, owner := range nw.owner {
		if owner == i {
			delete(nw.owner, a)
		}
	}
	for _, a := range addrs {
		nw.owner[a] = i
	}
	doomed := nw.crossingLocked()
	nw.mu.Unlock()
	closeConns(doomed)
}

// blockedLocked reports whether node src may not reach address addr. An
// address no node owns (yet) is reachable, unless src is dead.
func (nw *network) blockedLocked(src int, addr string) bool {
	dst, known := nw.owner[addr]
	if nw.dead[src] || (known && nw.dead[dst]) {
		return true
	}
	return known && src != dst && nw.group[src] != nw.group[dst]
}

// dialer returns node src's Dial function.
func (nw *network) dialer(src int) func(ctx context.Context, addr string) (net.Conn, error) {
	return func(ctx context.Context, addr string) (net.Conn, error) {
		nw.mu.Lock()
		blocked := nw.blockedLocked(src, addr)
		nw.mu.Unlock()
		if blocked {
			return nil, fmt.Errorf("dial %s from node %d: %w", addr, src, ErrCut)
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, err
		}
		nw.mu.Lock()
		defer nw.mu.Unlock()
		if nw.blockedLocked(src, addr) {
			// Cut while dialing.
			c.Close()
			return nil, fmt.Errorf("dial %s from node %d: %w", addr, src, ErrCut)
		}
		// Every connection is tracked, also to an address no node owns yet
		// (a node that is still starting): the owner is looked up when a
		// cut starts, not when the connection was made.
		tc := &conn{Conn: c, nw: nw, src: src, addr: addr}
		nw.conns[tc] = struct{}{}
		return tc, nil
	}
}

// regroup moves nodes to group g and closes every connection that now
// crosses groups.
func (nw *network) regroup(g int, nodes ...int) {
	nw.mu.Lock()
	for _, i := range nodes {
		if g == 0 {
			delete(nw.group, i)
		} else {
			nw.group[i] = g
		}
	}
	doomed := nw.crossingLocked()
	nw.mu.Unlock()
	closeConns(doomed)
}

// kill cuts node i off from every node at once, as its death would: its
// dials and dials to it fail, and the open connections either way close.
func (nw *network) kill(i int) {
	nw.mu.Lock()
	nw.dead[i] = true
	doomed := nw.crossingLocked()
	nw.mu.Unlock()
	closeConns(doomed)
}

// revive lets node i, killed, connect again (before it restarts).
func (nw *network) revive(i int) {
	nw.mu.Lock()
	defer nw.mu.Unlock()
	delete(nw.dead, i)
}

// crossingLocked removes from the table, and returns, the connections that
// cross a cut or touch a dead node.
func (nw *network) crossingLocked() []*conn {
	var doomed []*conn
	for c := range nw.conns {
		if nw.blockedLocked(c.src, c.addr) {
			doomed = append(doomed, c)
			delete(nw.conns, c)
		}
	}
	return doomed
}

func closeConns(cs []*conn) {
	for _, c := range cs {
		c.Conn.Close()
	}
}

// newGroup returns a partition group no node is in yet.
func (nw *network) newGroup() int {
	nw.mu.Lock()
	defer nw.mu.Unlock()
	nw.nextGroup++
	return nw.nextGroup
}

// isCut reports whether node i is outside the main group.
func (nw *network) isCut(i int) bool {
	nw.mu.Lock()
	defer nw.mu.Unlock()
	return nw.group[i] != 0
}

// closeAll closes every tracked connection.
func (nw *network) closeAll() {
	nw.mu.Lock()
	var all []*conn
	for c := range nw.conns {
		all = append(all, c)
	}
	nw.conns = map[*conn]struct{}{}
	nw.mu.Unlock()
	closeConns(all)
}

// conn is a connection a node opened to addr, forgotten by the table once
// closed.
type conn struct {
	net.Conn
	nw   *network
	src  int
	addr string
}

func (c *conn) Close() error {
	c.nw.mu.Lock()
	delete(c.nw.conns, c)
	c.nw.mu.Unlock()
	return c.Conn.Close()
}
