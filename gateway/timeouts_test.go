package gateway

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// A client that stops sending mid-body loses its request after the idle
// timeout instead of holding the connection; its session survives.
func TestStalledBodyIsCut(t *testing.T) {
	h := newHarness(t)
	srv := httptest.NewServer(WithBodyIdleTimeout(h.gw.Handler(), 50*time.Millisecond))
	t.Cleanup(srv.Close)
	loc := h.startUpload(t, "app")

	conn, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	fmt.Fprintf(conn, "PATCH %s HTTP/1.1\r\nHost: registry.test\r\nContent-Length: 100\r\n\r\n0123456789", loc)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("no response to a stalled body: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("stalled body: status %d, want 400", resp.StatusCode)
	}
	h.do(t, "GET", loc, nil).wantSession(t, http.StatusNoContent, "0-0")
	h.patch(t, loc, 0, randomBytes(100)).wantSession(t, http.StatusAccepted, "0-99")
}
