package s3test_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/meridian-registry/meridian/replication/s3test"
)

// TestServerRestart writes an object, stops the server (requests then
// fail), and restarts it on the same address with the object still there.
func TestServerRestart(t *testing.T) {
	srv := s3test.Start(t)
	srv.CreateBucket(t, "restart")
	if fi, err := os.Stat(srv.Dir() + "/restart"); err != nil || !fi.IsDir() {
		t.Fatalf("bucket directory under Dir(): %v", err)
	}
	c := srv.Client(t)
	ctx := t.Context()
	if _, err := c.PutObject(ctx, "restart", "k", strings.NewReader("v"), 1, minio.PutObjectOptions{PartSize: 5 << 20}); err != nil {
		t.Fatal(err)
	}
	srv.Stop()
	short, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, err := c.StatObject(short, "restart", "k", minio.StatObjectOptions{}); err == nil {
		t.Fatal("StatObject succeeded on a stopped server")
	}
	srv.Restart()
	if info, err := c.StatObject(ctx, "restart", "k", minio.StatObjectOptions{}); err != nil || info.Size != 1 {
		t.Fatalf("after Restart: StatObject = %d, %v", info.Size, err)
	}
	if !strings.HasPrefix(srv.URL("restart"), "s3://"+srv.AccessKey()+":") {
		t.Fatalf("URL %s does not carry the credentials", srv.URL("restart"))
	}
}

func TestFaultProxy(t *testing.T) {
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Host", r.Host)
		io.Copy(w, r.Body) // echo, streamed
	}))
	defer backend.Close()
	p := s3test.NewFaultProxy(t, strings.TrimPrefix(backend.URL, "http://"))
	client := &http.Client{Timeout: 5 * time.Second}
	post := func(ctx context.Context) (*http.Response, error) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+p.Addr()+"/x", bytes.NewReader([]byte("body")))
		return client.Do(req)
	}

	resp, err := post(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "body" || resp.Header.Get("X-Host") != p.Addr() {
		t.Fatalf("pass: body %q, Host seen by the target %q; want the body echoed and Host %s", b, resp.Header.Get("X-Host"), p.Addr())
	}

	p.SetMode(s3test.Fail)
	p.SetFailure(http.StatusInternalServerError, "InternalError")
	if resp, err := post(t.Context()); err != nil {
		t.Fatal(err)
	} else {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusInternalServerError || !strings.Contains(string(b), "<Code>InternalError</Code>") {
			t.Fatalf("fail: %s %s; want 500 and an InternalError body", resp.Status, b)
		}
	}

	p.SetMode(s3test.Cut)
	if resp, err := post(t.Context()); err == nil {
		resp.Body.Close()
		t.Fatal("cut: request succeeded")
	}

	p.SetMode(s3test.Stall)
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	if _, err := post(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("stall: got %v, want the client's deadline", err)
	}
	// A stalled request proceeds when the mode changes.
	done := make(chan error, 1)
	go func() {
		resp, err := post(t.Context())
		if err == nil {
			resp.Body.Close()
		}
		done <- err
	}()
	deadline := time.Now().Add(5 * time.Second)
	for p.Requests() < 5 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	p.SetMode(s3test.Pass)
	if err := <-done; err != nil {
		t.Fatalf("stalled request after Pass: %v", err)
	}
	// The request whose client gave up during the stall may have been
	// forwarded too (see Stall), hence 2 or 3.
	if fw := p.Forwarded(); p.Requests() != 5 || fw < 2 || fw > 3 || p.Failed() != 1 || p.CutCount() != 1 {
		t.Fatalf("counters: %d requests, %d forwarded, %d failed, %d cut; want 5, 2 or 3, 1, 1",
			p.Requests(), fw, p.Failed(), p.CutCount())
	}
}
