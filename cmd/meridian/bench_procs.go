package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// startTimeout bounds how long a server may take to answer after its start.
const startTimeout = 60 * time.Second

// process is a server the bench started. It runs in its own process group,
// so a Ctrl-C reaches only the bench, which stops it in order; if the bench
// dies, the kernel kills it (Pdeathsig).
type process struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	exited  chan struct{} // closed when the process has exited
	waitErr error

	stopOnce sync.Once
	stopErr  error
}

// startProcess starts argv with its output in logPath.
func startProcess(name, logPath string, env []string, argv ...string) (*process, error) {
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logFile.Close() // the child keeps its own descriptor
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.Env = append(cleanEnv(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, logPath: logPath, exited: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

// cleanEnv is the bench's environment without MERIDIAN_* settings, so that
// the node runs with its defaults whatever the caller's shell exports.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "MERIDIAN_") {
			env = append(env, kv)
		}
	}
	return env
}

// stop sends SIGTERM, waits up to 15 s for the process to exit, then kills
// it. It is safe to call more than once.
func (p *process) stop() error {
	p.stopOnce.Do(func() {
		select {
		case <-p.exited:
			p.stopErr = fmt.Errorf("%s exited early: %v%s", p.name, p.waitErr, p.logTail())
			return
		default:
		}
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(15 * time.Second):
			p.cmd.Process.Kill()
			<-p.exited
			p.stopErr = fmt.Errorf("%s did not stop within 15 s of SIGTERM; killed", p.name)
		}
	})
	return p.stopErr
}

// logTail returns the end of the process's output, for error messages.
func (p *process) logTail() string {
	b, err := os.ReadFile(p.logPath)
	if err != nil || len(b) == 0 {
		return ""
	}
	if len(b) > 2048 {
		b = b[len(b)-2048:]
	}
	return fmt.Sprintf("\n--- %s output (%s) ---\n%s", p.name, p.logPath, strings.TrimSpace(string(b)))
}

// meridianNode is a node the bench started and how to reach it.
type meridianNode struct {
	proc      *process
	base      string // http://HOST:PORT
	grpcAddr  string
	clusterID string // the service of its tokens
	password  string // of the first admin, benchAdmin
}

// benchAdmin is the first user of a new node.
const benchAdmin = "admin"

// startMeridian runs `meridian serve` on 127.0.0.1:0 ports with its data in
// dir and a first admin whose password it makes up, reads its addresses
// from the ready file and waits for /readyz.
func startMeridian(ctx context.Context, serveCmd, env []string, dir string) (*meridianNode, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	// A fresh password each run: the node listens on loopback only, but the
	// data dir may be kept (--keep) and nothing else should log in.
	secret := make([]byte, 16)
	if _, err := rand.Read(secret); err != nil {
		return nil, err
	}
	password := hex.EncodeToString(secret)
	pwFile := filepath.Join(dir, "admin-password")
	if err := os.WriteFile(pwFile, []byte(password+"\n"), 0o600); err != nil {
		return nil, err
	}
	ready := filepath.Join(dir, "ready.json")
	argv := append(slices.Clone(serveCmd),
		"--data-dir", filepath.Join(dir, "data"), "--node-id", "bench", "--region", "local",
		"--http-addr", "127.0.0.1:0", "--raft-addr", "127.0.0.1:0",
		"--admin-password-file", pwFile,
		"--ready-file", ready, "--log-level", "warn")
	// Every other listener (gRPC, gossip, …) on a free port too, through the
	// env twins of the flags: a node without such a listener ignores them.
	env = append(slices.Clone(env), "MERIDIAN_GRPC_ADDR=127.0.0.1:0", "MERIDIAN_GOSSIP_ADDR=127.0.0.1:0")
	p, err := startProcess("meridian", filepath.Join(dir, "meridian.log"), env, argv...)
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*meridianNode, error) {
		p.stop()
		return nil, fmt.Errorf("%w%s", err, p.logTail())
	}
	var info struct {
		HTTPAddr  string `json:"http_addr"`
		GRPCAddr  string `json:"grpc_addr"`
		ClusterID string `json:"cluster_id"`
	}
	err = poll(ctx, p, "the ready file", func() error {
		b, err := os.ReadFile(ready)
		if err != nil {
			return err
		}
		return json.Unmarshal(b, &info)
	})
	if err != nil {
		return fail(err)
	}
	n := &meridianNode{proc: p, base: "http://" + info.HTTPAddr, grpcAddr: info.GRPCAddr, clusterID: info.ClusterID, password: password}
	if err := waitHTTP(ctx, p, n.base+"/readyz", http.StatusOK); err != nil {
		return fail(err)
	}
	return n, nil
}

// startNginx serves docroot with nginx (sendfile on) on a free loopback port,
// from a generated config in prefix.
func startNginx(ctx context.Context, bin, prefix, docroot string) (*process, string, error) {
	if err := os.MkdirAll(prefix, 0o755); err != nil {
		return nil, "", err
	}
	addr, err := freeAddr()
	if err != nil {
		return nil, "", err
	}
	user := ""
	if os.Geteuid() == 0 {
		// Workers would otherwise run as nobody and could not enter the
		// bench's 0700 temp dir.
		user = "user root;\n"
	}
	conf := fmt.Sprintf(`daemon off;
%sworker_processes auto;
pid %[2]s/nginx.pid;
error_log %[2]s/error.log error;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path %[2]s/client_body;
    proxy_temp_path %[2]s/proxy;
    fastcgi_temp_path %[2]s/fastcgi;
    uwsgi_temp_path %[2]s/uwsgi;
    scgi_temp_path %[2]s/scgi;
    server {
        listen %[3]s;
        root %[4]s;
    }
}
`, user, prefix, addr, docroot)
	confPath := filepath.Join(prefix, "nginx.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		return nil, "", err
	}
	p, err := startProcess("nginx", filepath.Join(prefix, "nginx.log"), nil,
		bin, "-p", prefix, "-c", confPath, "-e", filepath.Join(prefix, "error.log"))
	if err != nil {
		return nil, "", err
	}
	if err := waitHTTP(ctx, p, "http://"+addr+"/", 0); err != nil {
		p.stop()
		tail, _ := os.ReadFile(filepath.Join(prefix, "error.log"))
		return nil, "", fmt.Errorf("%w%s\n%s", err, p.logTail(), tail)
	}
	return p, addr, nil
}

// startDistribution runs CNCF Distribution with filesystem storage in dir.
func startDistribution(ctx context.Context, bin, dir string) (*process, string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, "", err
	}
	addr, err := freeAddr()
	if err != nil {
		return nil, "", err
	}
	// The storage cache is the one Distribution's sample configs ship with.
	conf := fmt.Sprintf(`version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: %s
`, filepath.Join(dir, "storage"), addr)
	confPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		return nil, "", err
	}
	// Distribution traces every request and by default exports the spans to
	// an OTLP collector on localhost, which is not there: export nothing.
	p, err := startProcess("distribution", filepath.Join(dir, "registry.log"),
		[]string{"OTEL_TRACES_EXPORTER=none"}, bin, "serve", confPath)
	if err != nil {
		return nil, "", err
	}
	base := "http://" + addr
	if err := waitHTTP(ctx, p, base+"/v2/", http.StatusOK); err != nil {
		p.stop()
		return nil, "", fmt.Errorf("%w%s", err, p.logTail())
	}
	return p, base, nil
}

// startGoFileServer serves docroot with net/http's FileServer in this
// process, the fallback when nginx is not installed.
func startGoFileServer(docroot string) (addr string, stop func() error, err error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	srv := &http.Server{Handler: http.FileServer(http.Dir(docroot)), ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	var once sync.Once
	return ln.Addr().String(), func() error {
		once.Do(func() { srv.Close() })
		return nil
	}, nil
}

// freeAddr returns a loopback address with a port that was free a moment
// ago, for servers that cannot report the port they bound.
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// waitHTTP polls url until it answers with status (0: with anything).
func waitHTTP(ctx context.Context, p *process, url string, status int) error {
	c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}
	return poll(ctx, p, url, func() error {
		req, err := http.NewRequestWithContext(ctx, http.MethodHead, url, nil)
		if err != nil {
			return err
		}
		resp, err := c.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if status != 0 && resp.StatusCode != status {
			return fmt.Errorf("%s answers %s", url, resp.Status)
		}
		return nil
	})
}

// poll calls check every 20 ms until it succeeds, the process exits, ctx
// ends or startTimeout passes.
func poll(ctx context.Context, p *process, what string, check func() error) error {
	return pollFor(ctx, p, what, startTimeout, check)
}

// pollFor is poll with a timeout of its own.
func pollFor(ctx context.Context, p *process, what string, timeout time.Duration, check func() error) error {
	deadline := time.Now().Add(timeout)
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		err := check()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: waiting for %s: %w", p.name, what, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-p.exited:
			return fmt.Errorf("%s exited while waiting for %s: %w", p.name, what, errors.Join(p.waitErr, err))
		case <-t.C:
		}
	}
}

// cpuTime returns the CPU time (user + system) the process has used, from
// /proc (0 where there is none).
func (p *process) cpuTime() time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		return 0
	}
	// Fields after the parenthesized command name: state is the first,
	// utime and stime the 12th and 13th, in USER_HZ (100 on Linux) ticks.
	i := bytes.LastIndexByte(b, ')')
	f := strings.Fields(string(b[i+1:]))
	if i < 0 || len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(utime+stime) * 10 * time.Millisecond
}

// processCPU is the CPU time this process has used.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
