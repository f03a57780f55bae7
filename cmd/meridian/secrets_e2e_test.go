package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meridian-registry/meridian/node/clustertest/admin"
)

// Passwords, robot secrets and tokens never show up where operators look:
// the node's log, the audit log (changes and refusals), the denied log, the
// CLI's error messages and the metrics. The test uses every kind of secret
// against a real node, fails logins on purpose, then greps all of it.
func TestSecretsStayOutOfLogs(t *testing.T) {
	e2eNeedBinary(t)
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	p := e2eServe(t, data)
	addr := "--addr=" + p.ready.GRPCAddr
	var outputs bytes.Buffer // everything an operator would read
	cli := func(env []string, stdin string, args ...string) (string, error) {
		cmd := exec.Command(e2eBinary, append(args, addr)...)
		cmd.Env = e2eEnv(env...)
		cmd.Stdin = strings.NewReader(stdin)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		outputs.Write(stderr.Bytes())
		return stdout.String(), err
	}
	lastLine := func(s string) string {
		lines := strings.Split(strings.TrimSpace(s), "\n")
		return lines[len(lines)-1]
	}

	const chosen = "alice-chose-this-password"
	const wrong = "not-alices-password-at-all"
	out, err := cli(nil, "", "user", "add", "bob")
	if err != nil {
		t.Fatalf("user add bob: %v", err)
	}
	generated := lastLine(out)
	if _, err := cli(nil, chosen+"\n", "user", "add", "alice", "--password-stdin"); err != nil {
		t.Fatalf("user add alice: %v", err)
	}
	if _, err := cli(nil, "", "access", "grant", "--user", "alice", "--prefix", "sec", "--actions", "pull,push"); err != nil {
		t.Fatal(err)
	}
	out, err = cli(nil, "", "robot", "create", "ci", "--scope", "sec:pull,push")
	if err != nil {
		t.Fatal(err)
	}
	robotSecret := lastLine(out)
	// An admin command with a wrong password fails, without echoing it.
	if _, err := cli([]string{"MERIDIAN_PASSWORD=" + wrong}, "", "user", "list"); err == nil {
		t.Fatal("user list with a wrong admin password succeeded")
	}

	// Tokens: an access token and a refresh token for alice.
	get := func(path, user, pass string) (int, []byte) {
		req, _ := http.NewRequest(http.MethodGet, p.url(path), nil)
		if user != "" {
			req.SetBasicAuth(user, pass)
		}
		resp, err := (&http.Client{}).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, b
	}
	code, body := get("/auth/token?service=meridian&offline_token=true&scope=repository:sec/app:pull,push", "alice", chosen)
	var tok struct {
		Token        string `json:"token"`
		RefreshToken string `json:"refresh_token"`
	}
	if code != http.StatusOK || json.Unmarshal(body, &tok) != nil || tok.Token == "" || tok.RefreshToken == "" {
		t.Fatalf("token: %d %s", code, body)
	}
	// The refresh grant (containerd's), with a wrong refresh token too.
	form := url.Values{"grant_type": {"refresh_token"}, "refresh_token": {tok.RefreshToken}, "service": {"meridian"}, "scope": {"repository:sec/app:pull"}}
	resp, err := (&http.Client{}).PostForm(p.url("/auth/token"), form)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("refresh grant: %v %v", err, resp)
	}
	resp.Body.Close()
	form.Set("refresh_token", tok.Token) // an access token is no refresh token
	if resp, err = (&http.Client{}).PostForm(p.url("/auth/token"), form); err != nil || resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("refresh grant with an access token: %v %v", err, resp)
	}
	resp.Body.Close()

	// Pushes with each credential, and refusals with wrong ones.
	blob := []byte("secret-free blob")
	for _, auth := range []func(*http.Request){
		func(r *http.Request) { r.SetBasicAuth("alice", chosen) },
		func(r *http.Request) { r.SetBasicAuth("robot+ci", robotSecret) },
		func(r *http.Request) { r.Header.Set("Authorization", "Bearer "+tok.Token) },
		func(r *http.Request) { r.SetBasicAuth("alice", wrong) },
		func(r *http.Request) { r.SetBasicAuth("robot+ci", wrong) },
		func(r *http.Request) { r.SetBasicAuth("bob", generated) }, // bob may not push
		func(r *http.Request) { r.Header.Set("Authorization", "Bearer "+tok.Token+"x") },
	} {
		req, _ := http.NewRequest(http.MethodPost, p.url("/v2/sec/app/blobs/uploads/?digest="+sha256Digest(blob)), bytes.NewReader(blob))
		auth(req)
		resp, err := (&http.Client{}).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		outputs.Write(b)
		for k, v := range resp.Header {
			fmt.Fprintf(&outputs, "%s: %s\n", k, v)
		}
	}
	if out, err := cli(nil, "", "audit", "--json", "--denied"); err != nil {
		t.Fatal(err)
	} else {
		if !strings.Contains(out, `"login_failed"`) || !strings.Contains(out, `"put_robot"`) {
			t.Errorf("the audit output lacks the failed logins or the robot:\n%s", out)
		}
		outputs.WriteString(out)
	}
	_, metrics := get("/metrics", "", "")
	outputs.Write(metrics)
	p.stop()
	logs, _ := os.ReadFile(p.logPath)
	outputs.Write(logs)
	denied, _ := os.ReadFile(filepath.Join(data, "denied.log"))
	if len(denied) == 0 {
		t.Error("the denied log is empty")
	}
	outputs.Write(denied)

	for name, secret := range map[string]string{
		"the admin password": admin.AdminPassword, "a generated password": generated, "a chosen password": chosen,
		"a wrong password": wrong, "a robot secret": robotSecret, "an access token": tok.Token, "a refresh token": tok.RefreshToken,
	} {
		if bytes.Contains(outputs.Bytes(), []byte(secret)) {
			t.Errorf("%s appears in the logs, audit or metrics", name)
		}
	}
	t.Logf("searched %d bytes of logs, audit records, errors and metrics", outputs.Len())
}

// A new cluster's first node generates the admin's password into
// DATA_DIR/admin-password, readable by its owner alone, names the file in
// its log (not the password), and keeps it across a restart; the password
// works for the admin API and the registry.
func TestFirstAdminPassword(t *testing.T) {
	e2eNeedBinary(t)
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	var env []string
	for _, kv := range e2eEnv() {
		if !strings.HasPrefix(kv, "MERIDIAN_ADMIN_PASSWORD_FILE=") && !strings.HasPrefix(kv, "MERIDIAN_USERNAME=") && !strings.HasPrefix(kv, "MERIDIAN_PASSWORD=") {
			env = append(env, kv)
		}
	}
	start := func() *e2eProc {
		ready := filepath.Join(dir, "ready.json")
		p := e2eStart(t, ready, env, append([]string{"serve", "--data-dir", data, "--node-id", "first", "--ready-file", ready}, e2eLoopback...)...)
		p.waitReady()
		return p
	}
	p := start()
	file := filepath.Join(data, "admin-password")
	var password string
	p.poll("the admin password file", time.Minute, func() error {
		b, err := os.ReadFile(file)
		if err != nil || len(b) == 0 {
			return fmt.Errorf("%s: %v", file, err)
		}
		password = strings.TrimSpace(string(b))
		return nil
	})
	if st, err := os.Stat(file); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("%s: mode %v, want 0600 (%v)", file, st.Mode().Perm(), err)
	}
	if len(password) < 32 {
		t.Errorf("generated password of %d characters", len(password))
	}
	list := func(pw string) error {
		cmd := exec.Command(e2eBinary, "user", "list", "--addr", p.ready.GRPCAddr)
		cmd.Env = append(slices.Clone(env), "MERIDIAN_USERNAME=admin", "MERIDIAN_PASSWORD="+pw)
		out, err := cmd.CombinedOutput()
		if err == nil && !strings.Contains(string(out), "admin") {
			return fmt.Errorf("user list: %s", out)
		}
		return err
	}
	if err := list(password); err != nil {
		t.Errorf("user list as the first admin: %v", err)
	}
	if err := list("a-wrong-password"); err == nil {
		t.Error("user list with a wrong password succeeded")
	}
	// Without credentials, the admin API refuses with a readable message.
	cmd := exec.Command(e2eBinary, "user", "list", "--addr", p.ready.GRPCAddr)
	cmd.Env = env
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "MERIDIAN_USERNAME") {
		t.Errorf("user list without credentials: %v\n%s", err, out)
	}
	p.stop()
	logs, _ := os.ReadFile(p.logPath)
	if !strings.Contains(string(logs), file) || strings.Contains(string(logs), password) {
		t.Errorf("the log should name %s and not hold the password:\n%s", file, logs)
	}
	// A restart neither creates another admin nor changes the password.
	p = start()
	if b, _ := os.ReadFile(file); strings.TrimSpace(string(b)) != password {
		t.Error("the password file changed across a restart")
	}
	if err := list(password); err != nil {
		t.Errorf("after a restart: %v", err)
	}
	p.stop()
}
