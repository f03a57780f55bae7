package chaos

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Proc is a child process the harness runs, stops, kills, pauses and
// restarts. It runs in its own process group (a Ctrl-C reaches only the
// harness) with Pdeathsig SIGKILL, so nothing outlives the harness. Its
// output is appended to LogPath; every start writes a marker line first.
//
// A Proc knows whether an exit was asked for (Kill, Stop): other exits are
// reported to OnExit, since a process that dies on its own is a finding.
type Proc struct {
	Name    string
	Argv    []string
	Env     []string // added to the harness's environment minus MERIDIAN_*
	LogPath string
	// ReadyFile, when set, is removed before each start; WaitReady waits for
	// the process to write it.
	ReadyFile string
	// OnExit, when set, is called (in its own goroutine) with every exit the
	// harness did not cause.
	OnExit func(ProcExit)

	mu       sync.Mutex
	cmd      *exec.Cmd
	pid      int
	exited   chan struct{} // closed when the current process has exited
	waitErr  error
	paused   bool
	expected bool // the current process was told to exit
	starts   int
}

// ProcExit describes a process that exited without the harness asking.
type ProcExit struct {
	Name string    `json:"name"`
	PID  int       `json:"pid"`
	At   time.Time `json:"at"`
	Err  string    `json:"err"`
	Log  string    `json:"log_tail,omitempty"`
}

// ReadyInfo is what `meridian serve` and `meridian gateway` write to their
// --ready-file once they serve.
type ReadyInfo struct {
	NodeID     string `json:"node_id"`    // serve
	GatewayID  string `json:"gateway_id"` // gateway
	ClusterID  string `json:"cluster_id"`
	Region     string `json:"region"`
	HTTPAddr   string `json:"http_addr"`
	GRPCAddr   string `json:"grpc_addr"` // serve: the advertised gRPC address
	RaftAddr   string `json:"raft_addr"`
	GossipAddr string `json:"gossip_addr"`
	DataDir    string `json:"data_dir"`
	PID        int    `json:"pid"`
}

var errNotRunning = errors.New("not running")

// Start starts the process. It fails if it is already running.
func (p *Proc) Start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil {
		return fmt.Errorf("%s: already running (pid %d)", p.Name, p.pid)
	}
	if p.ReadyFile != "" {
		if err := os.Remove(p.ReadyFile); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("%s: %w", p.Name, err)
		}
	}
	logFile, err := os.OpenFile(p.LogPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("%s: %w", p.Name, err)
	}
	defer logFile.Close() // the child keeps its own descriptor
	p.starts++
	what := "start"
	if p.starts > 1 {
		what = fmt.Sprintf("restart #%d", p.starts-1)
	}
	fmt.Fprintf(logFile, "\n===== chaos: %s of %s at %s: %s\n", what, p.Name,
		time.Now().Format(time.RFC3339Nano), strings.Join(p.Argv, " "))
	cmd := exec.Command(p.Argv[0], p.Argv[1:]...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.Env = append(harnessEnv(), p.Env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", p.Name, err)
	}
	exited := make(chan struct{})
	p.cmd, p.pid, p.exited, p.paused, p.expected, p.waitErr = cmd, cmd.Process.Pid, exited, false, false, nil
	go p.wait(cmd, exited)
	return nil
}

// wait reaps cmd and reports an exit nobody asked for.
func (p *Proc) wait(cmd *exec.Cmd, exited chan struct{}) {
	err := cmd.Wait()
	p.mu.Lock()
	expected := p.expected
	pid := cmd.Process.Pid
	if p.cmd == cmd {
		p.cmd, p.pid, p.paused = nil, 0, false
	}
	p.waitErr = err
	onExit := p.OnExit
	p.mu.Unlock()
	close(exited)
	if !expected && onExit != nil {
		msg := "exit status 0"
		if err != nil {
			msg = err.Error()
		}
		go onExit(ProcExit{Name: p.Name, PID: pid, At: time.Now(), Err: msg, Log: p.LogTail(4096)})
	}
}

// harnessEnv is the harness's environment without MERIDIAN_* settings, so
// children run with what their flags and config files say.
func harnessEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "MERIDIAN_") {
			env = append(env, kv)
		}
	}
	return env
}

// PID is the running process's id, 0 when it is not running.
func (p *Proc) PID() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pid
}

// Running reports whether the process runs (paused counts as running).
func (p *Proc) Running() bool { return p.PID() != 0 }

// Paused reports whether the process is stopped by SIGSTOP.
func (p *Proc) Paused() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.paused
}

// Starts is how many times the process was started.
func (p *Proc) Starts() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.starts
}

// Exited returns a channel closed when the current process exits (an
// already closed one when none runs).
func (p *Proc) Exited() <-chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		c := make(chan struct{})
		close(c)
		return c
	}
	return p.exited
}

// signal sends sig to the process group of the running process; expect
// marks the coming exit as asked for.
func (p *Proc) signal(sig syscall.Signal, expect bool) (<-chan struct{}, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return nil, errNotRunning
	}
	if expect {
		p.expected = true
	}
	if err := syscall.Kill(-p.pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		return nil, fmt.Errorf("%s: signal %v: %w", p.Name, sig, err)
	}
	switch sig {
	case syscall.SIGSTOP:
		p.paused = true
	case syscall.SIGCONT, syscall.SIGKILL:
		p.paused = false
	}
	return p.exited, nil
}

// Kill sends SIGKILL (kill -9) to the process group and waits for the exit.
// Killing a process that is not running is not an error.
func (p *Proc) Kill() error {
	exited, err := p.signal(syscall.SIGKILL, true)
	if errors.Is(err, errNotRunning) {
		return nil
	}
	if err != nil {
		return err
	}
	select {
	case <-exited:
		return nil
	case <-time.After(30 * time.Second):
		return fmt.Errorf("%s: still running 30 s after SIGKILL", p.Name)
	}
}

// Stop sends SIGTERM (and SIGCONT, in case it is paused), waits up to
// timeout for the exit, then kills it.
func (p *Proc) Stop(timeout time.Duration) error {
	exited, err := p.signal(syscall.SIGTERM, true)
	if errors.Is(err, errNotRunning) {
		return nil
	}
	if err != nil {
		return err
	}
	p.signal(syscall.SIGCONT, true)
	select {
	case <-exited:
		return nil
	case <-time.After(timeout):
		if err := p.Kill(); err != nil {
			return err
		}
		return fmt.Errorf("%s: did not stop within %s of SIGTERM; killed", p.Name, timeout)
	}
}

// Pause stops the process group with SIGSTOP.
func (p *Proc) Pause() error {
	_, err := p.signal(syscall.SIGSTOP, false)
	return err
}

// Resume continues a paused process group with SIGCONT. Resuming a process
// that is not running is not an error.
func (p *Proc) Resume() error {
	_, err := p.signal(syscall.SIGCONT, false)
	if errors.Is(err, errNotRunning) {
		return nil
	}
	return err
}

// Restart kills the process if it runs and starts it again.
func (p *Proc) Restart() error {
	if err := p.Kill(); err != nil {
		return err
	}
	return p.Start()
}

// WaitReady waits until the running process has written its ready file
// (with its own pid), for at most timeout. It fails at once if the
// process exits.
func (p *Proc) WaitReady(ctx context.Context, timeout time.Duration) (ReadyInfo, error) {
	p.mu.Lock()
	pid, exited := p.pid, p.exited
	p.mu.Unlock()
	if pid == 0 {
		return ReadyInfo{}, fmt.Errorf("%s: %w", p.Name, errNotRunning)
	}
	var info ReadyInfo
	var lastErr error
	err := pollUntil(ctx, timeout, 25*time.Millisecond, exited, func() bool {
		b, err := os.ReadFile(p.ReadyFile)
		if err != nil {
			lastErr = err
			return false
		}
		info = ReadyInfo{}
		if err := json.Unmarshal(b, &info); err != nil {
			lastErr = err
			return false
		}
		if info.PID != pid {
			lastErr = fmt.Errorf("ready file is from pid %d, not %d", info.PID, pid)
			return false
		}
		return true
	})
	if err != nil {
		if errors.Is(err, errExited) {
			p.mu.Lock()
			werr := p.waitErr
			p.mu.Unlock()
			return info, fmt.Errorf("%s exited before it was ready (%v)%s", p.Name, werr, p.logTailSection())
		}
		return info, fmt.Errorf("%s: waiting for %s: %w (last: %v)%s", p.Name, p.ReadyFile, err, lastErr, p.logTailSection())
	}
	return info, nil
}

var errExited = errors.New("process exited")

// pollUntil calls check every interval until it returns true, ctx ends,
// timeout passes (context.DeadlineExceeded) or exited closes (errExited).
func pollUntil(ctx context.Context, timeout, interval time.Duration, exited <-chan struct{}, check func() bool) error {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		if check() {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-deadline.C:
			return context.DeadlineExceeded
		case <-exited:
			if check() {
				return nil
			}
			return errExited
		case <-t.C:
		}
	}
}

// LogTail returns at most the last n bytes of the process's log.
func (p *Proc) LogTail(n int) string {
	f, err := os.Open(p.LogPath)
	if err != nil {
		return ""
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return ""
	}
	off := max(0, fi.Size()-int64(n))
	b := make([]byte, fi.Size()-off)
	nr, _ := f.ReadAt(b, off)
	return strings.TrimSpace(string(b[:nr]))
}

func (p *Proc) logTailSection() string {
	t := p.LogTail(2048)
	if t == "" {
		return ""
	}
	return fmt.Sprintf("\n--- %s (%s) ---\n%s", p.Name, p.LogPath, t)
}
