package main

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meridian-registry/meridian/node/clustertest/admin"
)

// e2eClients is a node serving HTTPS with a new cluster CA, and crane and
// oras logged in to it as the harness's admin, in a home of their own.
type e2eClients struct {
	t            *testing.T
	p            *e2eProc
	dir, host    string
	crane, oras  string
	clientEnv    []string
	adminAddrArg string
}

// e2eStartClients skips unless crane and oras are installed.
func e2eStartClients(t *testing.T) *e2eClients {
	t.Helper()
	crane, oras := clientBinary(t, "MERIDIAN_CRANE"), clientBinary(t, "MERIDIAN_ORAS")
	e2eNeedBinary(t)
	dir := t.TempDir()
	p, pkiDir := e2eServeHTTPS(t, dir)
	c := &e2eClients{t: t, p: p, dir: dir, host: p.ready.HTTPAddr, crane: crane, oras: oras,
		clientEnv:    []string{"SSL_CERT_FILE=" + filepath.Join(pkiDir, "ca.crt"), "HOME=" + dir, "DOCKER_CONFIG=" + filepath.Join(dir, "docker")},
		adminAddrArg: "--addr=" + p.ready.GRPCAddr}
	p.poll("HTTPS answers", time.Minute, func() error {
		if out, err := c.run(crane, "catalog", c.host); err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	})
	c.must(crane, "auth", "login", c.host, "-u", admin.AdminUser, "-p", admin.AdminPassword)
	c.must(oras, "login", c.host, "-u", admin.AdminUser, "-p", admin.AdminPassword)
	return c
}

// run runs a client in the test's directory and returns what it printed.
func (c *e2eClients) run(bin string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Dir = c.dir
	cmd.Env = e2eEnv(c.clientEnv...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (c *e2eClients) must(bin string, args ...string) string {
	c.t.Helper()
	out, err := c.run(bin, args...)
	if err != nil {
		c.t.Fatalf("%s %s: %v\n%s", filepath.Base(bin), strings.Join(args, " "), err, out)
	}
	return out
}

// refused runs a client that must fail, saying every one of want.
func (c *e2eClients) refused(want []string, bin string, args ...string) string {
	c.t.Helper()
	out, err := c.run(bin, args...)
	if err == nil {
		c.t.Fatalf("%s %s succeeded, want a refusal:\n%s", filepath.Base(bin), strings.Join(args, " "), out)
	}
	for _, w := range want {
		if !strings.Contains(out, w) {
			c.t.Fatalf("%s %s: %v, output does not say %q:\n%s", filepath.Base(bin), strings.Join(args, " "), err, w, out)
		}
	}
	return out
}

// meridian runs an admin command as the harness's admin and returns its
// standard output.
func (c *e2eClients) meridian(args ...string) string {
	c.t.Helper()
	cmd := exec.Command(e2eBinary, append(args, c.adminAddrArg)...)
	cmd.Env = e2eEnv()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		c.t.Fatalf("meridian %s: %v\n%s%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

// file writes n random bytes to dir/name (random, so that no two files
// share a blob) and returns name.
func (c *e2eClients) file(name string, n int) string {
	c.t.Helper()
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rand.N(256))
	}
	if err := os.WriteFile(filepath.Join(c.dir, name), b, 0o644); err != nil {
		c.t.Fatal(err)
	}
	return name
}

// layer writes a tar holding one random file, for crane append, and
// returns its path.
func (c *e2eClients) layer(name string) string {
	c.t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	content := fmt.Sprintf("%s %d\n", name, rand.Uint64())
	tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(content)), Typeflag: tar.TypeReg})
	tw.Write([]byte(content))
	if err := tw.Close(); err != nil {
		c.t.Fatal(err)
	}
	path := filepath.Join(c.dir, name+".tar")
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		c.t.Fatal(err)
	}
	return path
}

// digest is what crane digest says ref points at.
func (c *e2eClients) digest(ref string) string {
	c.t.Helper()
	return strings.TrimSpace(c.must(c.crane, "digest", ref))
}

// crane pushes an image, then an immutability rule covers its tag:
// overwriting the tag with another image is refused with 403 DENIED naming
// the rule, and the tag still points at the first image. Pushing the same
// manifest under the tag again and creating a new covered tag still work;
// deleting the tagged manifest does not.
func TestImmutableTagWithCrane(t *testing.T) {
	c := e2eStartClients(t)
	ref := c.host + "/imm/app:v1"
	c.must(c.crane, "append", "-f", c.layer("first"), "-t", ref)
	want := c.digest(ref)

	c.meridian("immutable", "add", "--repositories", "imm", "--tags", "v*")
	out := c.refused([]string{"DENIED", "immutable", "rule"}, c.crane, "append", "-f", c.layer("second"), "-t", ref)
	if !strings.Contains(out, "v1") {
		t.Errorf("the refusal does not name the tag:\n%s", out)
	}
	t.Logf("crane, overwriting the immutable tag:\n%s", out)
	if got := c.digest(ref); got != want {
		t.Fatalf("after the refused overwrite %s points at %s, want %s", ref, got, want)
	}

	c.must(c.crane, "tag", c.host+"/imm/app@"+want, "v1")
	c.must(c.crane, "tag", ref, "v2")
	if got := c.digest(c.host + "/imm/app:v2"); got != want {
		t.Errorf("the new covered tag v2 points at %s, want %s", got, want)
	}
	c.refused([]string{"DENIED", "immutable"}, c.crane, "delete", c.host+"/imm/app@"+want)
	if got := c.digest(ref); got != want {
		t.Fatalf("after the refused delete %s points at %s, want %s", ref, got, want)
	}

	// Without the rule the tag moves again.
	c.meridian("immutable", "delete", "--repositories", "imm", "--tags", "v*")
	c.must(c.crane, "append", "-f", c.layer("third"), "-t", ref)
	if got := c.digest(ref); got == want {
		t.Errorf("with the rule deleted, the overwrite left %s at %s", ref, got)
	}
	c.p.stop()
}

// e2eQuotaUsed matches the usage in a quota refusal.
var e2eQuotaUsed = regexp.MustCompile(`quota exceeded: uses (\d+) of (\d+) bytes`)

// oras pushes files under a byte quota: the pushes that fit work, the one
// that crosses the limit is refused with the usage, which `meridian quota
// list` shows too, and a later push that fits still works.
func TestQuotaWithOras(t *testing.T) {
	c := e2eStartClients(t)
	const limit = 8 << 10
	c.meridian("quota", "set", "--repositories", "quota", "--max-bytes", "8KiB")
	usage := func() (used, max int64) {
		t.Helper()
		var list struct {
			Quotas []struct {
				Quota struct {
					Repositories string
					MaxBytes     int64 `json:"maxBytes,string"`
				}
				Bytes int64 `json:"bytes,string"`
			}
		}
		out := c.meridian("quota", "list", "--json")
		if err := json.Unmarshal([]byte(out), &list); err != nil {
			t.Fatalf("quota list --json: %v\n%s", err, out)
		}
		if len(list.Quotas) != 1 || list.Quotas[0].Quota.Repositories != "quota" {
			t.Fatalf("quota list --json: want the one quota on \"quota\":\n%s", out)
		}
		return list.Quotas[0].Bytes, list.Quotas[0].Quota.MaxBytes
	}
	repo := c.host + "/quota/files"

	// 3000-byte files: two fit in 8 KiB with oras's 2-byte empty config,
	// a third does not.
	var pushed []string
	var refusal string
	for i := range 5 {
		tag := fmt.Sprintf("f%d", i)
		f := c.file(tag+".bin", 3000)
		out, err := c.run(c.oras, "push", repo+":"+tag, f)
		if err != nil {
			refusal = out
			break
		}
		pushed = append(pushed, tag)
	}
	if want := []string{"f0", "f1"}; !slices.Equal(pushed, want) {
		t.Fatalf("pushes before the refusal: %v, want %v; the refusal:\n%s", pushed, want, refusal)
	}
	t.Logf("oras, pushing past the quota:\n%s", refusal)
	m := e2eQuotaUsed.FindStringSubmatch(refusal)
	if m == nil || !strings.Contains(strings.ToLower(refusal), "denied") || !strings.Contains(refusal, "this needs 3000 more") {
		t.Fatalf("the push past the quota failed with:\n%s\nwant DENIED, \"quota exceeded: uses N of %d bytes\" and what it needs", refusal, limit)
	}
	used, max := usage()
	if m[1] != strconv.FormatInt(used, 10) || m[2] != strconv.Itoa(limit) || max != limit {
		t.Errorf("the refusal says it uses %s of %s bytes; quota list says %d of %d", m[1], m[2], used, max)
	}
	if used < 2*3000 || used+3000 <= limit {
		t.Errorf("quota list: %d bytes used by two 3000-byte files, and a third would fit in %d", used, limit)
	}
	if out := c.meridian("quota", "list"); !strings.Contains(out, bytesOf(used)+" of 8.0 KiB") {
		t.Errorf("quota list does not show %s of 8.0 KiB:\n%s", bytesOf(used), out)
	}
	tags := strings.Fields(c.must(c.oras, "repo", "tags", repo))
	if !slices.Equal(tags, []string{"f0", "f1"}) {
		t.Errorf("oras repo tags after the refused push: %v, want [f0 f1]", tags)
	}

	// What still fits goes in.
	c.must(c.oras, "push", repo+":small", c.file("small.txt", 500))
	pulled := filepath.Join(c.dir, "pulled")
	c.must(c.oras, "pull", "-o", pulled, repo+":small")
	got, err := os.ReadFile(filepath.Join(pulled, "small.txt"))
	want, _ := os.ReadFile(filepath.Join(c.dir, "small.txt"))
	if err != nil || !bytes.Equal(got, want) {
		t.Errorf("pulling the push that fit: %v", err)
	}
	if after, _ := usage(); after != used+500 {
		t.Errorf("quota list after a 500-byte push: %d bytes used, want %d", after, used+500)
	}
	c.p.stop()
}

// e2eRetentionRun is `meridian retention run --json`.
type e2eRetentionRun struct {
	DryRun bool `json:"dryRun"`
	Tags   []struct {
		Repository, Tag, Digest string
	}
	Run *struct {
		TagsDeleted int64 `json:"tagsDeleted,string"`
	}
}

func (r e2eRetentionRun) refs() []string {
	var out []string
	for _, t := range r.Tags {
		out = append(out, t.Repository+":"+t.Tag+"@"+t.Digest)
	}
	slices.Sort(out)
	return out
}

// Tags pushed with crane under a rule keeping the newest two: the dry run
// lists the older ones, the real run deletes exactly what the dry run
// listed, crane no longer finds those tags, and the kept ones pull back.
func TestRetentionWithCrane(t *testing.T) {
	c := e2eStartClients(t)
	repo := c.host + "/ret/app"
	tags := []string{"v1", "v2", "v3", "v4", "v5"}
	digests := map[string]string{}
	for _, tag := range tags {
		c.must(c.crane, "append", "-f", c.layer(tag), "-t", repo+":"+tag)
		digests[tag] = c.digest(repo + ":" + tag)
	}
	c.meridian("retention", "set", "--repositories", "ret", "--keep-tags", "2")
	retention := func(args ...string) e2eRetentionRun {
		t.Helper()
		out := c.meridian(append([]string{"retention", "run", "--json"}, args...)...)
		var r e2eRetentionRun
		if err := json.Unmarshal([]byte(out), &r); err != nil {
			t.Fatalf("retention run --json %v: %v\n%s", args, err, out)
		}
		return r
	}

	dry := retention("--dry-run")
	var want []string
	for _, tag := range []string{"v1", "v2", "v3"} {
		want = append(want, "ret/app:"+tag+"@"+digests[tag])
	}
	slices.Sort(want)
	if !dry.DryRun || !slices.Equal(dry.refs(), want) {
		t.Fatalf("the dry run lists %v, want the three oldest tags %v", dry.refs(), want)
	}
	if listed := strings.Fields(c.must(c.crane, "ls", repo)); !slices.Equal(listed, tags) {
		t.Fatalf("after the dry run crane ls says %v, want %v", listed, tags)
	}

	run := retention()
	if run.DryRun || !slices.Equal(run.refs(), dry.refs()) {
		t.Fatalf("the run planned %v, the dry run listed %v", run.refs(), dry.refs())
	}
	if run.Run == nil || run.Run.TagsDeleted != int64(len(dry.Tags)) {
		t.Fatalf("the run reports %+v tags deleted, want %d", run.Run, len(dry.Tags))
	}
	var gone []string
	for _, d := range dry.Tags {
		gone = append(gone, d.Tag)
	}
	var kept []string
	for _, tag := range tags {
		if !slices.Contains(gone, tag) {
			kept = append(kept, tag)
		}
	}
	if listed := strings.Fields(c.must(c.crane, "ls", repo)); !slices.Equal(listed, kept) {
		t.Fatalf("after the run crane ls says %v, want %v (the dry run listed %v)", listed, kept, gone)
	}
	for _, tag := range gone {
		c.refused([]string{"MANIFEST_UNKNOWN"}, c.crane, "digest", repo+":"+tag)
	}
	for _, tag := range kept {
		tarball := filepath.Join(c.dir, tag+"-pulled.tar")
		c.must(c.crane, "pull", repo+":"+tag, tarball)
		if got := c.digest(repo + ":" + tag); got != digests[tag] {
			t.Errorf("%s:%s points at %s after the run, want %s", repo, tag, got, digests[tag])
		}
	}
	if again := retention("--dry-run"); len(again.Tags) != 0 {
		t.Errorf("after the run a dry run still lists %v", again.refs())
	}
	c.p.stop()
}
