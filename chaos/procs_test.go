package chaos

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// procState reads the state letter of pid from /proc/<pid>/stat.
func procState(pid int) string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return ""
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 >= len(s) {
		return ""
	}
	return s[i+2 : i+3]
}

func TestProcLifecycle(t *testing.T) {
	dir := t.TempDir()
	p := helperProc(t, "helper", "ready", filepath.Join(dir, "ready.json"))
	p.ReadyFile = filepath.Join(dir, "ready.json")
	exits := make(chan ProcExit, 4)
	p.OnExit = func(e ProcExit) { exits <- e }
	ctx := context.Background()

	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	info, err := p.WaitReady(ctx, 20*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	pid := p.PID()
	if info.PID != pid || info.NodeID != "helper" {
		t.Fatalf("ready info %+v, pid %d", info, pid)
	}
	if pgid, _ := syscall.Getpgid(pid); pgid != pid {
		t.Fatalf("process group %d, want its own (%d)", pgid, pid)
	}
	if err := p.Start(); err == nil {
		t.Fatal("second Start of a running process succeeded")
	}

	if err := p.Pause(); err != nil {
		t.Fatal(err)
	}
	waitState := func(want string) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for procState(pid) != want {
			if time.Now().After(deadline) {
				t.Fatalf("process state %q, want %q", procState(pid), want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitState("T")
	if !p.Paused() {
		t.Fatal("Paused() = false after Pause")
	}
	if err := p.Resume(); err != nil {
		t.Fatal(err)
	}
	waitState("S")

	// Restart: a new pid, a fresh ready file, the log appended with a marker.
	if err := p.Restart(); err != nil {
		t.Fatal(err)
	}
	if _, err := p.WaitReady(ctx, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	if p.PID() == pid || p.PID() == 0 {
		t.Fatalf("pid after restart %d (was %d)", p.PID(), pid)
	}
	log, _ := os.ReadFile(p.LogPath)
	if strings.Count(string(log), "helper ready") != 2 || !strings.Contains(string(log), "===== chaos: restart #1 of helper") {
		t.Fatalf("log after restart:\n%s", log)
	}

	// Kill -9 of a paused process works and is not reported as a crash.
	p.Pause()
	if err := p.Kill(); err != nil {
		t.Fatal(err)
	}
	if p.Running() {
		t.Fatal("running after Kill")
	}
	select {
	case e := <-exits:
		t.Fatalf("asked-for exit reported: %+v", e)
	case <-time.After(200 * time.Millisecond):
	}

	// An exit nobody asked for is reported, with the log.
	crash := helperProc(t, "crasher", "exit", "")
	crash.OnExit = func(e ProcExit) { exits <- e }
	if err := crash.Start(); err != nil {
		t.Fatal(err)
	}
	select {
	case e := <-exits:
		if e.Name != "crasher" || !strings.Contains(e.Err, "exit status 3") || !strings.Contains(e.Log, "helper exits") {
			t.Fatalf("exit report %+v", e)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("crash not reported")
	}
	// WaitReady fails at once on a process that exits.
	crash.ReadyFile = filepath.Join(dir, "never.json")
	if err := crash.Start(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := crash.WaitReady(ctx, 30*time.Second); err == nil || time.Since(start) > 20*time.Second {
		t.Fatalf("WaitReady on an exiting process: %v after %v", err, time.Since(start))
	}
}
