package chaos

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// newTestS3Proxy starts a proxy in front of a backend that echoes what
// it received; hits counts the requests the backend served.
func newTestS3Proxy(t *testing.T) (p *S3Proxy, c *http.Client, hits *atomic.Int64) {
	t.Helper()
	hits = new(atomic.Int64)
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		io.WriteString(w, "host="+r.Host+" path="+r.URL.Path)
	}))
	t.Cleanup(backend.Close)
	p, err := NewS3Proxy("127.0.0.1:0", strings.TrimPrefix(backend.URL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p, &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{}}, hits
}

// fetch GETs url; safe from any goroutine.
func fetch(ctx context.Context, c *http.Client, url string) (int, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

func get(t *testing.T, c *http.Client, url string) (int, string) {
	t.Helper()
	code, body, err := fetch(context.Background(), c, url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return code, body
}

// waitStalled polls until the proxy has held n requests in all.
func waitStalled(t *testing.T, p *S3Proxy, n int64) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for p.Stats().Stalled < n {
		if time.Now().After(deadline) {
			t.Fatalf("the proxy never held request %d: stats %+v", n, p.Stats())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

type fetchResult struct {
	code int
	err  error
}

// TestS3ProxyModes: pass forwards, error answers 503 without reaching the
// server, stall holds a request away from the server until the mode
// changes, and a held request whose client gives up never reaches it.
func TestS3ProxyModes(t *testing.T) {
	p, c, hits := newTestS3Proxy(t)
	base := "http://" + p.Addr()
	if code, body := get(t, c, base+"/bucket/key"); code != 200 || body != "host="+p.Addr()+" path=/bucket/key" {
		t.Fatalf("pass: %d %q", code, body)
	}

	p.SetMode(S3Error)
	code, body := get(t, c, base+"/bucket/key")
	if code != 503 || !strings.Contains(body, "<Code>ServiceUnavailable</Code>") {
		t.Fatalf("error mode: %d %q", code, body)
	}
	if n := hits.Load(); n != 1 {
		t.Fatalf("error mode reached the server: %d hits", n)
	}

	// Stall: held (the proxy counts it, the server has not seen it) until
	// the mode changes, then answered in the new mode.
	p.SetMode(S3Stall)
	got := make(chan fetchResult, 1)
	go func() {
		code, _, err := fetch(context.Background(), c, base+"/bucket/stalled")
		got <- fetchResult{code, err}
	}()
	waitStalled(t, p, 1)
	if n := hits.Load(); n != 1 {
		t.Fatalf("a stalled request reached the server: %d hits", n)
	}
	p.SetMode(S3Pass)
	if r := <-got; r.err != nil || r.code != 200 || hits.Load() != 2 {
		t.Fatalf("released request: %d %v, %d hits", r.code, r.err, hits.Load())
	}

	// A held request whose client gives up ends there: it is not
	// forwarded when the stall ends.
	p.SetMode(S3Stall)
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		code, _, err := fetch(ctx, c, base+"/bucket/gone")
		got <- fetchResult{code, err}
	}()
	waitStalled(t, p, 2)
	cancel()
	if r := <-got; !errors.Is(r.err, context.Canceled) {
		t.Fatalf("a held request whose client gave up: %d %v", r.code, r.err)
	}
	// The proxy notices the closed connection a moment later; until then
	// a mode change would still forward the request (see S3Stall).
	deadline := time.Now().Add(20 * time.Second)
	for p.Stats().Abandoned < 1 {
		if time.Now().After(deadline) {
			t.Fatalf("the proxy still holds a request its client gave up: %+v", p.Stats())
		}
		time.Sleep(10 * time.Millisecond)
	}
	p.SetMode(S3Pass)
	if code, _ := get(t, c, base+"/bucket/after"); code != 200 {
		t.Fatalf("after the stall: %d", code)
	}
	if n := hits.Load(); n != 3 {
		t.Fatalf("the server saw %d requests, want 3 (the abandoned one must not reach it)", n)
	}
	if s := p.Stats(); s.Stalled != 2 || s.Abandoned != 1 || s.Failed != 1 || s.Forwarded != 3 || s.Requests != 5 {
		t.Fatalf("stats %+v", s)
	}
}

// TestS3ProxyCloseEndsStalls: Close does not wait for stalled requests.
func TestS3ProxyCloseEndsStalls(t *testing.T) {
	p, c, hits := newTestS3Proxy(t)
	p.SetMode(S3Stall)
	got := make(chan fetchResult, 1)
	go func() {
		code, _, err := fetch(context.Background(), c, "http://"+p.Addr()+"/bucket/key")
		got <- fetchResult{code, err}
	}()
	waitStalled(t, p, 1)
	done := make(chan struct{})
	go func() { p.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("Close blocked on a stalled request")
	}
	select {
	case r := <-got:
		if r.err == nil {
			t.Fatalf("stalled request answered %d after Close", r.code)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("stalled request still pending after Close")
	}
	if n := hits.Load(); n != 0 {
		t.Fatalf("the server saw %d requests", n)
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
