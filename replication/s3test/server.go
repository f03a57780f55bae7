package s3test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// Region is the S3 region the server answers for.
const Region = "us-east-1"

// startTimeout bounds how long a server may take to answer its first request.
const startTimeout = 30 * time.Second

// Server is a running S3 server (versitygw, or MinIO under
// MERIDIAN_S3_SERVER=minio) serving a temporary directory.
type Server struct {
	tb     testing.TB
	kind   string // "versitygw" or "minio"
	bin    string
	root   string // temporary directory: data/ and the server's log
	addr   string // 127.0.0.1:port, kept across Restart
	access string
	secret string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
}

// Kind is the S3 server the tests run: "versitygw" unless
// MERIDIAN_S3_SERVER=minio.
func Kind() string {
	if os.Getenv("MERIDIAN_S3_SERVER") == "minio" {
		return "minio"
	}
	return "versitygw"
}

// Binary returns the path of the server binary Kind names ($MERIDIAN_VERSITYGW
// or $MERIDIAN_MINIO, then bin/tools, then $PATH), or false if there is none.
func Binary() (string, bool) {
	kind := Kind()
	if p := os.Getenv("MERIDIAN_" + strings.ToUpper(kind)); p != "" {
		return p, true
	}
	if root, err := moduleRoot(); err == nil {
		p := filepath.Join(root, "bin", "tools", kind)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
			return p, true
		}
	}
	if p, err := exec.LookPath(kind); err == nil {
		return p, true
	}
	return "", false
}

// Start runs a fresh versitygw for tb and stops it in tb.Cleanup. Without a
// binary it skips tb (fails it under MERIDIAN_REQUIRE_S3=1).
func Start(tb testing.TB) *Server {
	tb.Helper()
	bin, ok := Binary()
	if !ok {
		msg := "versitygw not found (set MERIDIAN_VERSITYGW, or run `make test`, which installs it into bin/tools)"
		if Kind() == "minio" {
			msg = "minio not found (set MERIDIAN_MINIO, or run `make test-minio`, which installs it into bin/tools)"
		}
		if os.Getenv("MERIDIAN_REQUIRE_S3") == "1" {
			tb.Fatal(msg + "; MERIDIAN_REQUIRE_S3=1 makes this a failure")
		}
		tb.Skip(msg)
	}
	s := &Server{
		tb:     tb,
		kind:   Kind(),
		bin:    bin,
		root:   tb.TempDir(),
		access: "meridian-test",
		secret: randomHex(20),
	}
	if err := os.Mkdir(s.Dir(), 0o755); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(s.Stop)
	// The port is chosen before versitygw binds it, so another process may
	// take it in between: try a few.
	var err error
	for range 3 {
		if s.addr, err = freePort(); err != nil {
			break
		}
		if err = s.start(); err == nil {
			return s
		}
	}
	tb.Fatalf("s3test: starting %s: %v", s.kind, err)
	return nil
}

// Endpoint is the server's host:port.
func (s *Server) Endpoint() string { return s.addr }

// AccessKey is the root user's access key.
func (s *Server) AccessKey() string { return s.access }

// SecretKey is the root user's secret key.
func (s *Server) SecretKey() string { return s.secret }

// Dir is the directory the server serves: one subdirectory per bucket.
func (s *Server) Dir() string { return filepath.Join(s.root, "data") }

// URL is a store URL (s3://…) for bucket on this server, credentials
// included.
func (s *Server) URL(bucket string) string {
	u := url.URL{
		Scheme:   "s3",
		User:     url.UserPassword(s.access, s.secret),
		Host:     s.addr,
		Path:     "/" + bucket,
		RawQuery: "secure=false",
	}
	return u.String()
}

// Client returns a minio-go client with the root credentials, for tests that
// inspect the server directly.
func (s *Server) Client(tb testing.TB) *minio.Client {
	tb.Helper()
	c, err := minio.New(s.addr, &minio.Options{
		Creds:        credentials.NewStaticV4(s.access, s.secret, ""),
		Region:       Region,
		BucketLookup: minio.BucketLookupPath,
	})
	if err != nil {
		tb.Fatalf("s3test: client: %v", err)
	}
	return c
}

// CreateBucket creates bucket name.
func (s *Server) CreateBucket(tb testing.TB, name string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.Client(tb).MakeBucket(ctx, name, minio.MakeBucketOptions{Region: Region}); err != nil {
		tb.Fatalf("s3test: create bucket %q: %v", name, err)
	}
}

// Stop kills the server (as a crash would) and waits for it to exit. It is
// idempotent; the data directory stays for Restart.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return
	}
	s.cmd.Process.Kill()
	<-s.done
	s.cmd = nil
}

// Restart starts the server again on the same address and directory.
func (s *Server) Restart() {
	s.tb.Helper()
	s.Stop()
	// The port was ours a moment ago; the kernel may need a moment to let
	// it go, so retry briefly.
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := s.start()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			s.tb.Fatalf("s3test: restarting %s on %s: %v", s.kind, s.addr, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// start runs the server on s.addr and waits until it answers HTTP.
func (s *Server) start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	logPath := filepath.Join(s.root, s.kind+".log")
	logFile, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logFile.Close() // the child has its own descriptor
	var cmd *exec.Cmd
	switch s.kind {
	case "minio":
		cmd = exec.Command(s.bin, "server", "--address", s.addr, "--quiet", s.Dir())
		cmd.Env = append(os.Environ(), "MINIO_ROOT_USER="+s.access, "MINIO_ROOT_PASSWORD="+s.secret,
			"MINIO_BROWSER=off", "MINIO_UPDATE=off")
	default:
		cmd = exec.Command(s.bin, "--port", s.addr, "--quiet", "posix", s.Dir())
		cmd.Env = append(os.Environ(), "ROOT_ACCESS_KEY="+s.access, "ROOT_SECRET_KEY="+s.secret)
	}
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = sysProcAttr()
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		close(done)
	}()
	if err := waitHTTP(s.kind, s.addr, done); err != nil {
		cmd.Process.Kill()
		<-done
		return fmt.Errorf("%w; log:\n%s", err, tail(logPath, 2048))
	}
	s.cmd, s.done = cmd, done
	return nil
}

// waitHTTP polls addr until it answers HTTP (MinIO: its readiness probe), the process exits
// (done closes) or startTimeout passes.
func waitHTTP(kind, addr string, done <-chan struct{}) error {
	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(startTimeout)
	// MinIO answers 503 while it initializes; its readiness probe says when
	// it takes requests.
	path := "/"
	if kind == "minio" {
		path = "/minio/health/ready"
	}
	for delay := 10 * time.Millisecond; ; delay = min(2*delay, 200*time.Millisecond) {
		resp, err := client.Get("http://" + addr + path)
		if err == nil {
			resp.Body.Close()
			if kind != "minio" || resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("readiness probe answered %s", resp.Status)
		}
		select {
		case <-done:
			return fmt.Errorf("%s exited during startup", kind)
		case <-time.After(delay):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not answer on %s within %s: %w", kind, addr, startTimeout, err)
		}
	}
}

func freePort() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return "127.0.0.1:" + strconv.Itoa(l.Addr().(*net.TCPAddr).Port), nil
}

// moduleRoot walks up from the working directory to the directory holding
// go.mod.
func moduleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// tail returns at most the last n bytes of file path.
func tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(bytes.TrimSpace(b))
}
