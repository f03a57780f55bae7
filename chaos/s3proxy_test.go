package chaos

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func newTestS3Proxy(t *testing.T) (*S3Proxy, *http.Client) {
	t.Helper()
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "host="+r.Host+" path="+r.URL.Path)
	}))
	t.Cleanup(backend.Close)
	p, err := NewS3Proxy("127.0.0.1:0", strings.TrimPrefix(backend.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p, &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{}}
}

func get(t *testing.T, c *http.Client, url string) (int, string) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestS3ProxyModes(t *testing.T) {
	p, c := newTestS3Proxy(t)
	base := "http://" + p.Addr()
	if code, body := get(t, c, base+"/bucket/key"); code != 200 || body != "host="+p.Addr()+" path=/bucket/key" {
		t.Fatalf("pass: %d %q", code, body)
	}

	p.SetMode(S3Error)
	code, body := get(t, c, base+"/bucket/key")
	if code != 503 || !strings.Contains(body, "<Code>ServiceUnavailable</Code>") {
		t.Fatalf("error mode: %d %q", code, body)
	}

	// Stall: held until the mode changes, then answered in the new mode.
	p.SetMode(S3Stall)
	type result struct {
		code int
		at   time.Time
	}
	got := make(chan result, 1)
	go func() {
		code, _ := get(t, c, base+"/bucket/stalled")
		got <- result{code, time.Now()}
	}()
	select {
	case r := <-got:
		t.Fatalf("stalled request answered %d", r.code)
	case <-time.After(300 * time.Millisecond):
	}
	released := time.Now()
	p.SetMode(S3Pass)
	select {
	case r := <-got:
		if r.code != 200 || r.at.Before(released) {
			t.Fatalf("released request: %d", r.code)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("stalled request not released")
	}

	// A stalled request whose client gives up ends.
	p.SetMode(S3Stall)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/bucket/gone", nil)
	if _, err := c.Do(req); err == nil {
		t.Fatal("stalled request answered")
	}
	if s := p.Stats(); s.Stalled < 2 || s.Failed != 1 || s.Forwarded < 2 {
		t.Fatalf("stats %+v", s)
	}
}

// TestS3ProxyCloseEndsStalls: Close does not wait for stalled requests.
func TestS3ProxyCloseEndsStalls(t *testing.T) {
	p, c := newTestS3Proxy(t)
	p.SetMode(S3Stall)
	errc := make(chan error, 1)
	go func() {
		_, err := c.Get("http://" + p.Addr() + "/bucket/key")
		errc <- err
	}()
	time.Sleep(200 * time.Millisecond)
	done := make(chan struct{})
	go func() { p.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close blocked on a stalled request")
	}
	select {
	case err := <-errc:
		if err == nil {
			t.Fatal("stalled request answered after Close")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("stalled request still pending after Close")
	}
}

// TestS3ProxyServerDown: with the server gone, the client's connection
// drops (as a refused connection would), and recovers when it returns.
func TestS3ProxyServerDown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	p, err := NewS3Proxy("127.0.0.1:0", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	c := &http.Client{Timeout: 10 * time.Second}
	if _, err := c.Get("http://" + p.Addr() + "/b"); err == nil {
		t.Fatal("request to a stopped server answered")
	}
	ln, err = net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("port taken meanwhile: %v", err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "back") })}
	go srv.Serve(ln)
	defer srv.Close()
	if code, body := get(t, c, "http://"+p.Addr()+"/b"); code != 200 || body != "back" {
		t.Fatalf("after restart: %d %q", code, body)
	}
}
