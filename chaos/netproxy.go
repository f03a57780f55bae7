package chaos

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// ClientSource is the source of a connection that no known process holds:
// test clients, the meridian CLI.
const ClientSource = "client"

// AnyID in a rule matches every source or every destination, clients
// included.
const AnyID = "*"

// Network is the set of TCP fault proxies in front of the nodes' gRPC and
// Raft ports, and the link rules they apply.
//
// Every connection arrives from 127.0.0.1, so a proxy tells who connected
// by looking up the accepted connection in the kernel's socket table: the
// line of /proc/net/tcp whose local address is the peer's address and
// whose remote address is the proxy's gives the peer socket's inode, and
// the known process (node or gateway) holding "socket:[inode]" among its
// /proc/<pid>/fd entries is the source. Anything else is ClientSource.
// Nothing is cached: a restarted process is found by its new pid, and the
// lookup runs once per accepted connection (connections between members
// are long-lived).
//
// A rule applies to connections by who opened them (From) and whose proxy
// they go through (To): Block holds new connections without forwarding
// anything (like a firewall DROP: the dialer sees a connection that never
// answers) and stalls existing ones in both directions; Delay adds latency
// to every chunk in both directions, in order. Removing a rule releases
// what it held: held connections are then forwarded (what their client
// sent meanwhile arrives late, as after a healed partition) and stalled
// ones resume. A process never blocks or delays its own connections.
type Network struct {
	known func() map[string]int // id -> pid of the processes to recognize

	mu      sync.Mutex
	rules   map[int]linkRule
	nextID  int
	changed chan struct{} // closed and replaced whenever rules change
	proxies []*Proxy
	stats   map[[2]string]int // accepted connections by (from, to)
	unknown []string          // why recent sources were not identified
	closed  bool

	identifyNanos atomic.Int64
	identifyCount atomic.Int64
}

type linkRule struct {
	from, to string
	block    bool
	delay    time.Duration
}

// NewNetwork returns a network that recognizes the processes known
// returns (id -> pid; called on every accepted connection).
func NewNetwork(known func() map[string]int) *Network {
	if known == nil {
		known = func() map[string]int { return nil }
	}
	return &Network{known: known, rules: map[int]linkRule{}, changed: make(chan struct{}), stats: map[[2]string]int{}}
}

// addRule installs r and returns the function that removes it (idempotent).
func (n *Network) addRule(rs ...linkRule) (undo func()) {
	n.mu.Lock()
	defer n.mu.Unlock()
	var ids []int
	for _, r := range rs {
		n.nextID++
		n.rules[n.nextID] = r
		ids = append(ids, n.nextID)
	}
	n.notifyLocked()
	var once sync.Once
	return func() {
		once.Do(func() {
			n.mu.Lock()
			defer n.mu.Unlock()
			for _, id := range ids {
				delete(n.rules, id)
			}
			n.notifyLocked()
		})
	}
}

func (n *Network) notifyLocked() {
	close(n.changed)
	n.changed = make(chan struct{})
}

// Block holds every connection that from opens to to (AnyID matches all).
func (n *Network) Block(from, to string) (undo func()) {
	return n.addRule(linkRule{from: from, to: to, block: true})
}

// Delay adds d to both directions of every connection from opens to to.
// Delays of several matching rules add up.
func (n *Network) Delay(from, to string, d time.Duration) (undo func()) {
	return n.addRule(linkRule{from: from, to: to, delay: d})
}

// Partition blocks every connection between a member of a and a member of
// b, whoever opens it.
func (n *Network) Partition(a, b []string) (undo func()) {
	var rs []linkRule
	for _, x := range a {
		for _, y := range b {
			rs = append(rs, linkRule{from: x, to: y, block: true}, linkRule{from: y, to: x, block: true})
		}
	}
	return n.addRule(rs...)
}

// Isolate blocks every connection to and from id.
func (n *Network) Isolate(id string) (undo func()) {
	return n.addRule(linkRule{from: id, to: AnyID, block: true}, linkRule{from: AnyID, to: id, block: true})
}

// AddLatency adds d to every link of id, both ways.
func (n *Network) AddLatency(id string, d time.Duration) (undo func()) {
	return n.addRule(linkRule{from: id, to: AnyID, delay: d}, linkRule{from: AnyID, to: id, delay: d})
}

// Heal removes every rule.
func (n *Network) Heal() {
	n.mu.Lock()
	defer n.mu.Unlock()
	clear(n.rules)
	n.notifyLocked()
}

// HealAll is Heal.
func (n *Network) HealAll() { n.Heal() }

// Rules describes the rules in force, for logs.
func (n *Network) Rules() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	var out []string
	for _, r := range n.rules {
		if r.block {
			out = append(out, fmt.Sprintf("block %s->%s", r.from, r.to))
		} else {
			out = append(out, fmt.Sprintf("delay %s->%s %s", r.from, r.to, r.delay))
		}
	}
	sort.Strings(out)
	return out
}

// link returns what applies to connections from opens to to now, and a
// channel closed at the next rule change.
func (n *Network) link(from, to string) (blocked bool, delay time.Duration, changed <-chan struct{}) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if from == to {
		return false, 0, n.changed
	}
	for _, r := range n.rules {
		if (r.from == AnyID || r.from == from) && (r.to == AnyID || r.to == to) {
			blocked = blocked || r.block
			delay += r.delay
		}
	}
	return blocked, delay, n.changed
}

// Accepted counts the connections the proxies accepted, by "from->to".
func (n *Network) Accepted() map[string]int {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := map[string]int{}
	for k, v := range n.stats {
		out[k[0]+"->"+k[1]] = v
	}
	return out
}

// IdentifyCost is the mean time one source identification took, and how
// many there were.
func (n *Network) IdentifyCost() (time.Duration, int64) {
	c := n.identifyCount.Load()
	if c == 0 {
		return 0, 0
	}
	return time.Duration(n.identifyNanos.Load() / c), c
}

// Close closes every proxy and every connection through them.
func (n *Network) Close() error {
	n.mu.Lock()
	n.closed = true
	proxies := n.proxies
	n.proxies = nil
	n.mu.Unlock()
	for _, p := range proxies {
		p.Close()
	}
	return nil
}

// Identify names the known process that holds the local end of c, a
// connection accepted on loopback, or returns ClientSource.
func (n *Network) Identify(c net.Conn) string {
	start := time.Now()
	defer func() {
		n.identifyNanos.Add(int64(time.Since(start)))
		n.identifyCount.Add(1)
	}()
	peer, ok1 := c.RemoteAddr().(*net.TCPAddr)
	local, ok2 := c.LocalAddr().(*net.TCPAddr)
	if !ok1 || !ok2 {
		return ClientSource
	}
	inode, err := socketInode(peer, local)
	if err != nil || inode == "" {
		n.noteUnknown(fmt.Sprintf("%s: no socket found (%v)", peer, err))
		return ClientSource
	}
	known := n.known()
	if id := findSocketHolder(known, "socket:["+inode+"]"); id != "" {
		return id
	}
	// Not found: maybe a process (re)started between the two lookups. Look
	// once more with fresh pids before taking it for a client.
	time.Sleep(20 * time.Millisecond)
	known = n.known()
	if id := findSocketHolder(known, "socket:["+inode+"]"); id != "" {
		return id
	}
	n.noteUnknown(fmt.Sprintf("%s: socket %s held by none of %v", peer, inode, known))
	return ClientSource
}

// noteUnknown keeps the last few reasons a source was not identified.
func (n *Network) noteUnknown(why string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if len(n.unknown) >= 32 {
		n.unknown = n.unknown[1:]
	}
	n.unknown = append(n.unknown, time.Now().Format("15:04:05.000")+" "+why)
}

// Unidentified returns why recent connections were taken for clients.
func (n *Network) Unidentified() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Clone(n.unknown)
}

// socketInode finds the inode of the socket whose local address is local
// and whose remote address is remote: first with the kernel's sock_diag
// exact lookup (what ss uses; tens of microseconds), else in
// /proc/net/tcp (or tcp6), whose reading walks the kernel's whole socket
// hash table (a millisecond or more).
func socketInode(local, remote *net.TCPAddr) (string, error) {
	if inode, err := diagInode(local, remote); err == nil {
		return inode, nil
	}
	var firstErr error
	for _, table := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		want4 := local.IP.To4() != nil && remote.IP.To4() != nil
		if table == "/proc/net/tcp" && !want4 {
			continue
		}
		inode, err := scanTCPTable(table, local, remote)
		if err != nil {
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		if inode != "" {
			return inode, nil
		}
	}
	return "", firstErr
}

// scanTCPTable reads one of /proc/net/tcp{,6}: each line is
// "sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt
// uid timeout inode …", addresses as the kernel's in-memory words in hex.
func scanTCPTable(path string, local, remote *net.TCPAddr) (string, error) {
	v6 := strings.HasSuffix(path, "6")
	wantLocal, wantRemote := procAddr(local, v6), procAddr(remote, v6)
	if wantLocal == "" || wantRemote == "" {
		return "", nil
	}
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	wl, wr := []byte(wantLocal), []byte(wantRemote)
	for sc.Scan() {
		fields := bytes.Fields(sc.Bytes())
		if len(fields) < 10 {
			continue
		}
		if bytes.Equal(fields[1], wl) && bytes.Equal(fields[2], wr) {
			return string(fields[9]), nil
		}
	}
	return "", sc.Err()
}

// procAddr formats addr as /proc/net/tcp{,6} shows it: the address as
// 32-bit words in native byte order, each as %08X, then ":%04X" port.
func procAddr(addr *net.TCPAddr, v6 bool) string {
	var ip []byte
	if v6 {
		ip = addr.IP.To16()
	} else {
		ip = addr.IP.To4()
	}
	if ip == nil {
		return ""
	}
	var sb strings.Builder
	for i := 0; i < len(ip); i += 4 {
		fmt.Fprintf(&sb, "%08X", binary.NativeEndian.Uint32(ip[i:i+4]))
	}
	fmt.Fprintf(&sb, ":%04X", addr.Port)
	return sb.String()
}

// findSocketHolder returns the id of the process among known whose file
// descriptors include link ("socket:[inode]"), or "".
func findSocketHolder(known map[string]int, link string) string {
	ids := make([]string, 0, len(known))
	for id := range known {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		pid := known[id]
		if pid <= 0 {
			continue
		}
		dir := "/proc/" + strconv.Itoa(pid) + "/fd"
		d, err := os.Open(dir)
		if err != nil {
			continue
		}
		names, _ := d.Readdirnames(-1)
		d.Close()
		for _, name := range names {
			if target, err := os.Readlink(dir + "/" + name); err == nil && target == link {
				return id
			}
		}
	}
	return ""
}

// Proxy is one TCP fault proxy: it listens on its own address and forwards
// to target, the listener of the process To.
type Proxy struct {
	net    *Network
	To     string
	target string
	ln     net.Listener

	mu     sync.Mutex
	conns  map[*proxyConn]struct{}
	closed chan struct{}
	once   sync.Once
	wg     sync.WaitGroup
}

// AddProxy starts a proxy on listen (host:port; port 0 picks one) in front
// of target, the listener of process to.
func (n *Network) AddProxy(to, listen, target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, fmt.Errorf("chaos: proxy for %s: %w", to, err)
	}
	p := &Proxy{net: n, To: to, target: target, ln: ln, conns: map[*proxyConn]struct{}{}, closed: make(chan struct{})}
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		ln.Close()
		return nil, errors.New("chaos: network closed")
	}
	n.proxies = append(n.proxies, p)
	n.mu.Unlock()
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr is the proxy's listening address, the one to advertise.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Target is the address the proxy forwards to.
func (p *Proxy) Target() string { return p.target }

// Close stops accepting and closes every connection through the proxy.
func (p *Proxy) Close() error {
	p.once.Do(func() {
		close(p.closed)
		p.ln.Close()
		p.mu.Lock()
		for c := range p.conns {
			c.close()
		}
		p.mu.Unlock()
	})
	p.wg.Wait()
	return nil
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			select {
			case <-p.closed:
				return
			default:
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			time.Sleep(10 * time.Millisecond)
			continue
		}
		pc := &proxyConn{p: p, client: c, done: make(chan struct{})}
		p.mu.Lock()
		select {
		case <-p.closed:
			p.mu.Unlock()
			c.Close()
			return
		default:
		}
		p.conns[pc] = struct{}{}
		p.wg.Add(1)
		p.mu.Unlock()
		go pc.run()
	}
}

// proxyConn is one client connection and its upstream.
type proxyConn struct {
	p        *Proxy
	client   net.Conn
	from     string
	mu       sync.Mutex
	upstream net.Conn
	done     chan struct{}
	once     sync.Once
}

func (c *proxyConn) close() {
	c.once.Do(func() {
		close(c.done)
		c.client.Close()
		c.mu.Lock()
		if c.upstream != nil {
			c.upstream.Close()
		}
		c.mu.Unlock()
	})
}

func (c *proxyConn) run() {
	p := c.p
	defer func() {
		c.close()
		p.mu.Lock()
		delete(p.conns, c)
		p.mu.Unlock()
		p.wg.Done()
	}()
	c.from = p.net.Identify(c.client)
	p.net.mu.Lock()
	p.net.stats[[2]string{c.from, p.To}]++
	p.net.mu.Unlock()
	// A blocked link holds the new connection: accepted, never answered.
	if !c.waitUnblocked() {
		return
	}
	up, err := net.DialTimeout("tcp", p.target, 5*time.Second)
	if err != nil {
		return // the target is down: the client sees its connection close
	}
	c.mu.Lock()
	c.upstream = up
	c.mu.Unlock()
	select {
	case <-c.done: // closed while dialing: close() did not see up
		up.Close()
		return
	default:
	}
	var wg sync.WaitGroup
	var eofs atomic.Int32
	halfDone := func() {
		if eofs.Add(1) == 2 {
			c.close()
		}
	}
	wg.Add(2)
	go func() { defer wg.Done(); c.pump(c.client, up, halfDone) }()
	go func() { defer wg.Done(); c.pump(up, c.client, halfDone) }()
	wg.Wait()
}

// waitUnblocked waits while the connection's link is blocked; false when
// the connection closed meanwhile.
func (c *proxyConn) waitUnblocked() bool {
	for {
		blocked, _, changed := c.p.net.link(c.from, c.p.To)
		if !blocked {
			return true
		}
		select {
		case <-changed:
		case <-c.done:
			return false
		}
	}
}

type delayedChunk struct {
	b   []byte
	due time.Time
}

// pump copies src to dst through a delay line: each chunk read is stamped
// with the link's delay at that moment and written once due (and not
// blocked), in order. At EOF it half-closes dst and calls eof; on any
// other error it closes the connection.
func (c *proxyConn) pump(src, dst net.Conn, eof func()) {
	ch := make(chan delayedChunk, 256)
	go func() {
		defer close(ch)
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			if n > 0 {
				_, d, _ := c.p.net.link(c.from, c.p.To)
				ck := delayedChunk{b: bytes.Clone(buf[:n])}
				if d > 0 {
					ck.due = time.Now().Add(d)
				}
				select {
				case ch <- ck:
				case <-c.done:
					return
				}
			}
			if err != nil {
				if !errors.Is(err, io.EOF) {
					c.close()
				}
				return
			}
		}
	}()
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for ck := range ch {
		if wait := time.Until(ck.due); !ck.due.IsZero() && wait > 0 {
			if timer == nil {
				timer = time.NewTimer(wait)
			} else {
				timer.Reset(wait)
			}
			select {
			case <-timer.C:
			case <-c.done:
				return
			}
		}
		if !c.waitUnblocked() {
			return
		}
		if _, err := dst.Write(ck.b); err != nil {
			c.close()
			return
		}
	}
	select {
	case <-c.done:
		return
	default:
	}
	if tc, ok := dst.(*net.TCPConn); ok {
		tc.CloseWrite()
	}
	eof()
}

// diagInode asks sock_diag (NETLINK_INET_DIAG) for the TCP socket with
// exactly this local and remote address and returns its inode. It fails
// when the kernel has no inet_diag or no such socket.
func diagInode(local, remote *net.TCPAddr) (string, error) {
	family := syscall.AF_INET
	lip, rip := local.IP.To4(), remote.IP.To4()
	if lip == nil || rip == nil {
		family, lip, rip = syscall.AF_INET6, local.IP.To16(), remote.IP.To16()
		if lip == nil || rip == nil {
			return "", errors.New("not an IP address")
		}
	}
	fd, err := syscall.Socket(syscall.AF_NETLINK, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, syscall.NETLINK_INET_DIAG)
	if err != nil {
		return "", err
	}
	defer syscall.Close(fd)
	tv := syscall.Timeval{Sec: 1}
	if err := syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv); err != nil {
		return "", err
	}
	// nlmsghdr (16 bytes) + inet_diag_req_v2 (56 bytes).
	const sockDiagByFamily = 20
	req := make([]byte, 16+56)
	ne := binary.NativeEndian
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], sockDiagByFamily)
	ne.PutUint16(req[6:], syscall.NLM_F_REQUEST)
	ne.PutUint32(req[8:], 1) // seq
	r := req[16:]
	r[0], r[1] = byte(family), syscall.IPPROTO_TCP
	ne.PutUint32(r[4:], 0xFFFFFFFF) // every state
	id := r[8:]                     // inet_diag_sockid
	binary.BigEndian.PutUint16(id[0:], uint16(local.Port))
	binary.BigEndian.PutUint16(id[2:], uint16(remote.Port))
	copy(id[4:20], lip)
	copy(id[20:36], rip)
	ne.PutUint32(id[40:], 0xFFFFFFFF) // INET_DIAG_NOCOOKIE
	ne.PutUint32(id[44:], 0xFFFFFFFF)
	if err := syscall.Sendto(fd, req, 0, &syscall.SockaddrNetlink{Family: syscall.AF_NETLINK}); err != nil {
		return "", err
	}
	buf := make([]byte, 8192)
	n, _, err := syscall.Recvfrom(fd, buf, 0)
	if err != nil {
		return "", err
	}
	buf = buf[:n]
	if len(buf) < 16 {
		return "", errors.New("short sock_diag answer")
	}
	switch typ := ne.Uint16(buf[4:]); typ {
	case sockDiagByFamily:
		// inet_diag_msg: family, state, timer, retrans, sockid (48),
		// expires, rqueue, wqueue, uid, inode.
		msg := buf[16:]
		if len(msg) < 72 {
			return "", errors.New("short inet_diag_msg")
		}
		return strconv.FormatUint(uint64(ne.Uint32(msg[68:])), 10), nil
	case syscall.NLMSG_ERROR:
		if len(buf) >= 20 {
			if errno := int32(ne.Uint32(buf[16:])); errno != 0 {
				return "", syscall.Errno(-errno)
			}
		}
		return "", errors.New("sock_diag error")
	default:
		return "", fmt.Errorf("unexpected sock_diag message type %d", typ)
	}
}
