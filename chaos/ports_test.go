package chaos

import (
	"net"
	"strconv"
	"testing"
)

// TestPortPicker: ports are distinct, bindable for TCP and UDP, and below
// the ephemeral range, where other processes' outgoing connections and
// port-0 listeners cannot take them between a kill and a restart.
func TestPortPicker(t *testing.T) {
	p := &portPicker{used: map[int]bool{}}
	seen := map[string]bool{}
	for i := range 50 {
		addr := p.tcp()
		if i%2 == 0 {
			addr = p.tcpudp()
		}
		_, portText, err := net.SplitHostPort(addr)
		if err != nil {
			t.Fatal(err)
		}
		port, err := strconv.Atoi(portText)
		if err != nil || port < portLow || port >= portHigh || seen[addr] {
			t.Fatalf("picked %s (seen before: %v)", addr, seen[addr])
		}
		seen[addr] = true
		if !portFree(port, i%2 == 0) {
			t.Fatalf("picked %s, which cannot be bound", addr)
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if portFree(ln.Addr().(*net.TCPAddr).Port, false) {
		t.Fatal("a port in use was reported free")
	}
}
