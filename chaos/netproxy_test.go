package chaos

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestChaosHelperProcess is not a test: the tests run the test binary as a
// child process with CHAOS_HELPER set, and this is what the child does.
//
//	dial ADDR   connect to ADDR, then echo lines from stdin to the
//	            connection and the connection's answers to stdout
//	ready FILE  write FILE as a ready file with this pid, then sleep
func TestChaosHelperProcess(t *testing.T) {
	mode := os.Getenv("CHAOS_HELPER")
	if mode == "" {
		t.Skip("helper process for other tests")
	}
	arg := os.Getenv("CHAOS_HELPER_ARG")
	switch mode {
	case "dial":
		c, err := net.Dial("tcp", arg)
		if err != nil {
			fmt.Println("dial error:", err)
			os.Exit(1)
		}
		fmt.Println("connected")
		go io.Copy(os.Stdout, c)
		io.Copy(c, os.Stdin)
		time.Sleep(time.Hour)
	case "ready":
		fmt.Println("helper starting")
		time.Sleep(200 * time.Millisecond)
		os.WriteFile(arg, fmt.Appendf(nil, `{"node_id":"helper","http_addr":"127.0.0.1:1","pid":%d}`, os.Getpid()), 0o644)
		fmt.Println("helper ready")
		time.Sleep(time.Hour)
	case "exit":
		fmt.Println("helper exits")
		os.Exit(3)
	}
	os.Exit(0)
}

// helperProc returns a Proc running this test binary in helper mode.
func helperProc(t *testing.T, name, mode, arg string) *Proc {
	t.Helper()
	return &Proc{
		Name:    name,
		Argv:    []string{os.Args[0], "-test.run=^TestChaosHelperProcess$", "-test.v=false"},
		Env:     []string{"CHAOS_HELPER=" + mode, "CHAOS_HELPER_ARG=" + arg},
		LogPath: t.TempDir() + "/" + name + ".log",
	}
}

// echoServer accepts connections and echoes what they send.
func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

func newTestNetwork(t *testing.T, known func() map[string]int) (*Network, *Proxy) {
	t.Helper()
	n := NewNetwork(known)
	t.Cleanup(func() { n.Close() })
	p, err := n.AddProxy("srv", "127.0.0.1:0", echoServer(t))
	if err != nil {
		t.Fatal(err)
	}
	return n, p
}

func self() map[string]int { return map[string]int{"self": os.Getpid()} }

// roundTrip writes msg and waits up to timeout for its echo.
func roundTrip(c net.Conn, r *bufio.Reader, msg string, timeout time.Duration) (string, error) {
	if _, err := io.WriteString(c, msg+"\n"); err != nil {
		return "", err
	}
	c.SetReadDeadline(time.Now().Add(timeout))
	defer c.SetReadDeadline(time.Time{})
	line, err := r.ReadString('\n')
	return strings.TrimSuffix(line, "\n"), err
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

func TestProcAddr(t *testing.T) {
	a := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 0x1F90}
	want := "0100007F:1F90" // as little-endian hosts show 127.0.0.1:8080
	if isBigEndian() {
		want = "7F000001:1F90"
	}
	if got := procAddr(a, false); got != want {
		t.Fatalf("procAddr = %q, want %q", got, want)
	}
	if got := procAddr(a, true); !strings.HasSuffix(got, strings.TrimSuffix(want, ":1F90")+":1F90") || len(got) != 32+5 {
		t.Fatalf("procAddr v6 = %q", got)
	}
}

func isBigEndian() bool {
	switch runtime.GOARCH {
	case "s390x", "ppc64", "mips", "mips64":
		return true
	}
	return false
}

func TestIdentifyTestProcessAndClients(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("source identification reads /proc")
	}
	n, p := newTestNetwork(t, self)
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got, err := roundTrip(c, bufio.NewReader(c), "hello", 5*time.Second); err != nil || got != "hello" {
		t.Fatalf("echo through the proxy: %q, %v", got, err)
	}
	if got := n.Accepted()["self->srv"]; got != 1 {
		t.Fatalf("accepted = %v, want one connection from self", n.Accepted())
	}

	// The same process, unknown: a client.
	n2, p2 := newTestNetwork(t, func() map[string]int { return map[string]int{"other": 1} })
	c2, err := net.Dial("tcp", p2.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if got, err := roundTrip(c2, bufio.NewReader(c2), "x", 5*time.Second); err != nil || got != "x" {
		t.Fatalf("echo: %q, %v", got, err)
	}
	if got := n2.Accepted()["client->srv"]; got != 1 {
		t.Fatalf("accepted = %v, want one connection from a client", n2.Accepted())
	}
	cost, count := n.IdentifyCost()
	t.Logf("source identification: %v per connection (%d)", cost, count)
}

// TestIdentifyChildProcess: a child process among known pids is named,
// and a rule for it applies to its connection only.
func TestIdentifyChildProcess(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("source identification reads /proc")
	}
	var mu sync.Mutex
	known := map[string]int{}
	n, p := newTestNetwork(t, func() map[string]int {
		mu.Lock()
		defer mu.Unlock()
		return maps(known)
	})
	undo := n.Block("child", "srv") // applies to the child, not to us
	defer undo()

	cmd := exec.Command(os.Args[0], "-test.run=^TestChaosHelperProcess$")
	cmd.Env = append(os.Environ(), "CHAOS_HELPER=dial", "CHAOS_HELPER_ARG="+p.Addr())
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	mu.Lock()
	known["child"] = cmd.Process.Pid
	mu.Unlock()
	lines := make(chan string, 10)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	expect := func(want string, within time.Duration) {
		t.Helper()
		select {
		case l := <-lines:
			if l != want {
				t.Fatalf("child said %q, want %q", l, want)
			}
		case <-time.After(within):
			t.Fatalf("child did not say %q within %v", want, within)
		}
	}
	expect("connected", 10*time.Second)
	io.WriteString(stdin, "ping\n")
	select {
	case l := <-lines:
		t.Fatalf("blocked child got an answer: %q", l)
	case <-time.After(500 * time.Millisecond):
	}
	// The test process is not blocked.
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got, err := roundTrip(c, bufio.NewReader(c), "me", 5*time.Second); err != nil || got != "me" {
		t.Fatalf("unblocked client: %q, %v", got, err)
	}
	if n.Accepted()["child->srv"] != 1 {
		t.Fatalf("accepted = %v, want child->srv", n.Accepted())
	}
	// Healing releases the held connection: what the child sent arrives.
	undo()
	expect("ping", 5*time.Second)
	io.WriteString(stdin, "pong\n")
	expect("pong", 5*time.Second)
}

func maps(m map[string]int) map[string]int {
	out := map[string]int{}
	for k, v := range m {
		out[k] = v
	}
	return out
}

func TestBlockStallsExistingConnectionsAndHealResumes(t *testing.T) {
	n, p := newTestNetwork(t, self)
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	if got, err := roundTrip(c, r, "one", 5*time.Second); err != nil || got != "one" {
		t.Fatalf("echo: %q, %v", got, err)
	}
	undo := n.Partition([]string{"self"}, []string{"srv"})
	if _, err := roundTrip(c, r, "two", 400*time.Millisecond); !isTimeout(err) {
		t.Fatalf("partitioned connection answered (err %v)", err)
	}
	// A new connection is accepted but held.
	c2, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	r2 := bufio.NewReader(c2)
	if _, err := roundTrip(c2, r2, "new", 400*time.Millisecond); !isTimeout(err) {
		t.Fatalf("held connection answered (err %v)", err)
	}
	if rules := n.Rules(); len(rules) != 2 {
		t.Fatalf("rules = %v", rules)
	}
	undo()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if line, err := r.ReadString('\n'); err != nil || line != "two\n" {
		t.Fatalf("after healing: %q, %v", line, err)
	}
	c2.SetReadDeadline(time.Now().Add(5 * time.Second))
	if line, err := r2.ReadString('\n'); err != nil || line != "new\n" {
		t.Fatalf("held connection after healing: %q, %v", line, err)
	}

	// Isolate and Heal.
	n.Isolate("srv")
	if _, err := roundTrip(c, r, "three", 400*time.Millisecond); !isTimeout(err) {
		t.Fatalf("isolated connection answered (err %v)", err)
	}
	n.Heal()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if line, err := r.ReadString('\n'); err != nil || line != "three\n" {
		t.Fatalf("after Heal: %q, %v", line, err)
	}
}

func TestDelayAddsLatencyBothWaysInOrder(t *testing.T) {
	n, p := newTestNetwork(t, self)
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	roundTrip(c, r, "warm", 5*time.Second)

	const d = 100 * time.Millisecond
	undo := n.AddLatency("srv", d)
	start := time.Now()
	if got, err := roundTrip(c, r, "slow", 5*time.Second); err != nil || got != "slow" {
		t.Fatalf("echo: %q, %v", got, err)
	}
	rtt := time.Since(start)
	if rtt < 2*d || rtt > 2*d+time.Second {
		t.Fatalf("round trip %v with %v each way", rtt, d)
	}
	// Delays of matching rules add up.
	undo2 := n.Delay("self", "srv", d)
	start = time.Now()
	roundTrip(c, r, "slower", 5*time.Second)
	if rtt := time.Since(start); rtt < 4*d {
		t.Fatalf("round trip %v with 2x%v each way", rtt, d)
	}
	undo2()

	// Bulk data: in order, intact, and not throttled to a trickle.
	payload := make([]byte, 32<<20)
	rand.NewChaCha8([32]byte{1}).Read(payload)
	want := sha256.Sum256(payload)
	done := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		done <- err
	}()
	start = time.Now()
	h := sha256.New()
	c.SetReadDeadline(time.Now().Add(60 * time.Second))
	if _, err := io.CopyN(h, r, int64(len(payload))); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := h.Sum(nil); !bytes.Equal(got, want[:]) {
		t.Fatal("bulk data changed through the delay line")
	}
	mibs := float64(len(payload)) / (1 << 20) / took.Seconds()
	t.Logf("32 MiB echoed with %v each way in %v (%.0f MiB/s)", d, took.Round(time.Millisecond), mibs)
	if mibs < 10 {
		t.Fatalf("throughput %.1f MiB/s through a %v delay line", mibs, d)
	}

	undo()
	start = time.Now()
	roundTrip(c, r, "fast", 5*time.Second)
	if rtt := time.Since(start); rtt > d {
		t.Fatalf("round trip %v after healing", rtt)
	}
}

func TestLinkRules(t *testing.T) {
	n := NewNetwork(nil)
	undo := n.Partition([]string{"a"}, []string{"b", "c"})
	for _, tc := range []struct {
		from, to string
		blocked  bool
	}{{"a", "b", true}, {"b", "a", true}, {"c", "a", true}, {"b", "c", false}, {"client", "a", false}, {"a", "a", false}} {
		if got, _, _ := n.link(tc.from, tc.to); got != tc.blocked {
			t.Errorf("partition: %s->%s blocked = %v, want %v", tc.from, tc.to, got, tc.blocked)
		}
	}
	undo()
	undoIso := n.Isolate("b")
	for _, tc := range []struct {
		from, to string
		blocked  bool
	}{{"a", "b", true}, {"b", "c", true}, {"client", "b", true}, {"a", "c", false}, {"b", "b", false}} {
		if got, _, _ := n.link(tc.from, tc.to); got != tc.blocked {
			t.Errorf("isolate: %s->%s blocked = %v, want %v", tc.from, tc.to, got, tc.blocked)
		}
	}
	undoLat := n.AddLatency("c", 50*time.Millisecond)
	undoIso()
	if _, d, _ := n.link("a", "c"); d != 50*time.Millisecond {
		t.Errorf("latency a->c = %v", d)
	}
	if _, d, _ := n.link("c", "a"); d != 50*time.Millisecond {
		t.Errorf("latency c->a = %v", d)
	}
	if _, d, _ := n.link("a", "b"); d != 0 {
		t.Errorf("latency a->b = %v", d)
	}
	undoLat()
	undoLat() // idempotent
	if r := n.Rules(); len(r) != 0 {
		t.Fatalf("rules left: %v", r)
	}
}

// BenchmarkIdentify measures one source identification with the test
// process known.
func BenchmarkIdentify(b *testing.B) {
	if runtime.GOOS != "linux" {
		b.Skip("reads /proc")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	s, err := ln.Accept()
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	n := NewNetwork(self)
	b.ResetTimer()
	for range b.N {
		if id := n.Identify(s); id != "self" {
			b.Fatalf("identified %q", id)
		}
	}
}

// TestDiagMatchesProcNetTCP: the sock_diag lookup and /proc/net/tcp agree.
func TestDiagMatchesProcNetTCP(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("linux only")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	peer, local := s.RemoteAddr().(*net.TCPAddr), s.LocalAddr().(*net.TCPAddr)
	fromProc, err := scanTCPTable("/proc/net/tcp", peer, local)
	if err != nil || fromProc == "" {
		t.Fatalf("/proc/net/tcp: %q, %v", fromProc, err)
	}
	fromDiag, err := diagInode(peer, local)
	if err != nil {
		t.Skipf("sock_diag unavailable: %v", err)
	}
	if fromDiag != fromProc {
		t.Fatalf("sock_diag says inode %s, /proc/net/tcp %s", fromDiag, fromProc)
	}
	start := time.Now()
	for range 100 {
		scanTCPTable("/proc/net/tcp", peer, local)
	}
	procCost := time.Since(start) / 100
	start = time.Now()
	for range 100 {
		diagInode(peer, local)
	}
	t.Logf("inode lookup: sock_diag %v, /proc/net/tcp %v", time.Since(start)/100, procCost)
	// A socket that does not exist.
	if _, err := diagInode(&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1}, local); err == nil {
		t.Fatal("sock_diag found a socket that does not exist")
	}
}
