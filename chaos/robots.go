package chaos

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
)

// adminUser is the first admin, whom the bootstrapping node creates with
// the password of --admin-password-file.
const adminUser = "admin"

// revokeGrace is how long after `meridian robot revoke` returned the
// robot's writes may still be acknowledged: nodes apply the revocation
// with the Raft log and gateways poll the access state every 250 ms.
const revokeGrace = time.Second

// robotTarget is what a revoke fault occupies, whichever robot it
// revokes: one revocation at a time.
const robotTarget = "robot-writer"

// robotAccounts is the robot the workload's robot writers push as: one
// created at start, replaced after each revocation.
type robotAccounts struct {
	mu   sync.Mutex
	made int // create attempts, which name the robots
	name string
	cred Credentials
}

// writeAdminPassword puts a new admin password into the run's pki/
// directory (one line, mode 0600) for --admin-password-file.
func writeAdminPassword(path string) (string, error) {
	b := make([]byte, 24)
	rand.Read(b)
	pw := hex.EncodeToString(b)
	if err := os.WriteFile(path, []byte(pw+"\n"), 0o600); err != nil {
		return "", err
	}
	return pw, nil
}

func (c *Cluster) adminPasswordFile() string { return filepath.Join(c.pki.dir, "admin-password") }

// AdminCredentials are the first admin's login.
func (c *Cluster) AdminCredentials() Credentials {
	return Credentials{User: adminUser, Password: c.adminPassword}
}

// Robot is the login of the robot the workload writes as now (empty
// before the first one was made).
func (c *Cluster) Robot() Credentials {
	c.robots.mu.Lock()
	defer c.robots.mu.Unlock()
	return c.robots.cred
}

func (c *Cluster) robotName() string {
	c.robots.mu.Lock()
	defer c.robots.mu.Unlock()
	return c.robots.name
}

// adminCommand runs `meridian ARGS` with the harness's admin certificate
// against the live, unpaused nodes in turn (a follower forwards access
// changes to the leader) until one answers, and returns its stdout.
// retry says whether the same command may be sent to the next node after
// a failure that may have applied.
func (c *Cluster) adminCommand(ctx context.Context, retry bool, args ...string) (string, error) {
	var errs []error
	for _, n := range c.nodes {
		if !n.proc.Running() || n.proc.Paused() {
			continue
		}
		out, err := c.runAdmin(ctx, n, 10*time.Second, args...)
		if err == nil {
			return out, nil
		}
		errs = append(errs, err)
		if !retry || ctx.Err() != nil {
			break
		}
	}
	if len(errs) == 0 {
		return "", errors.New("chaos: no node is running")
	}
	return "", errors.Join(errs...)
}

// runAdmin runs `meridian ARGS` with the harness's admin certificate
// against n's own gRPC listener (not its fault proxy: the harness is not
// a member), the command's --timeout set to timeout, and returns its
// stdout.
func (c *Cluster) runAdmin(ctx context.Context, n *nodeProc, timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout+2*time.Second)
	defer cancel()
	argv := append(slices.Clone(args), "--addr", n.grpcAddr, "--timeout", timeout.String())
	cmd := exec.CommandContext(ctx, c.opt.Meridian, append(argv, c.pki.tlsFlags(adminID)...)...)
	cmd.Env = harnessEnv()
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("meridian %s via %s: %v: %s", strings.Join(args, " "), n.spec.ID, err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// newRobot creates the next robot, which may pull and push under
// RobotRepoPrefix, and makes it the workload's; it tries again, under a
// new name each time (a create that failed may have applied), until ctx
// ends.
func (c *Cluster) newRobot(ctx context.Context) (string, error) {
	for {
		c.robots.mu.Lock()
		c.robots.made++
		name := fmt.Sprintf("chaos-writer-%d", c.robots.made)
		c.robots.mu.Unlock()
		out, err := c.adminCommand(ctx, false, "robot", "create", name, "--scope", RobotRepoPrefix+":pull,push")
		if err == nil {
			// The secret is alone on stdout's last line.
			lines := strings.Split(strings.TrimSpace(out), "\n")
			secret := strings.TrimSpace(lines[len(lines)-1])
			if secret == "" {
				return "", fmt.Errorf("chaos: robot create %s printed no secret", name)
			}
			c.robots.mu.Lock()
			c.robots.name, c.robots.cred = name, Credentials{User: "robot+" + name, Password: secret}
			c.robots.mu.Unlock()
			return name, nil
		}
		if !holdFor(ctx, time.Second) {
			return "", err
		}
	}
}

// waitLogin waits until every gateway accepts the admin's and the
// robot's credentials on /v2/: the first admin is created by the leader
// after it bootstrapped, and gateways follow the access state.
func (c *Cluster) waitLogin(ctx context.Context, timeout time.Duration) error {
	for _, g := range c.gateways {
		for _, cred := range []Credentials{c.AdminCredentials(), c.Robot()} {
			var last string
			err := pollUntil(ctx, timeout, 200*time.Millisecond, g.proc.Exited(), func() bool {
				code, err := statusAs(ctx, "http://"+g.httpAddr+"/v2/", cred)
				if err != nil {
					last = err.Error()
					return false
				}
				last = fmt.Sprintf("HTTP %d", code)
				return code == 200
			})
			if err != nil {
				return fmt.Errorf("chaos: %s never accepted %s's login: %w (last: %s)", g.spec.ID, cred.User, err, last)
			}
		}
	}
	return nil
}

// statusAs GETs url with cred's Basic login and returns the status code.
func statusAs(ctx context.Context, url string, cred Credentials) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	req.SetBasicAuth(cred.User, cred.Password)
	resp, err := probeClient.Do(req)
	if err != nil {
		return 0, err
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	return resp.StatusCode, nil
}

// revokeRobot revokes the workload's robot with `meridian robot revoke`
// while its writers go on writing as it; healing makes the next robot
// (its writers switch to it). f.revoked is when the revocation returned.
func (c *Cluster) revokeRobot(f *faultSpec) (heal func(context.Context) string, err error) {
	name := c.robotName()
	if name == "" {
		return nil, errors.New("no robot to revoke")
	}
	f.target = name
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	start := time.Now()
	// A revocation is idempotent: a node that failed may be retried on
	// another.
	if _, err := c.adminCommand(ctx, true, "robot", "revoke", name); err != nil {
		return nil, err
	}
	f.revoked = time.Now()
	f.detail = fmt.Sprintf("revoke returned after %v", f.revoked.Sub(start).Round(time.Millisecond))
	return func(ctx context.Context) string {
		next, err := c.newRobot(ctx)
		if err != nil {
			return "no new robot: " + err.Error()
		}
		f.detail += "; writes go on as " + next
		return ""
	}, nil
}

// CheckRevocations is the check of the revoke faults: no write request
// of a revoked robot that was sent more than revokeGrace after its
// revocation returned was acknowledged (2xx). Requests sent earlier are
// not judged (the revocation may not have reached their gateway yet, or
// their Raft entry came first); whether the robot's writes acknowledged
// before it still read back is acknowledged-writes-survive's to say.
// Checked counts the requests judged.
func CheckRevocations(ops []Op, faults []Fault) CheckResult {
	var (
		vs                                  []Violation
		checked, revocations, early, before int
		refused                             = map[int]int{}
	)
	for _, f := range faults {
		if f.Kind != FaultRevoke || f.Error != "" || f.Revoked == 0 {
			continue
		}
		revocations++
		user := "robot+" + f.Target
		deadline := f.Revoked + revokeGrace
		var late []Op
		for _, op := range ops {
			if op.Kind != OpRobotWrite || op.User != user {
				continue
			}
			switch {
			case op.Start > deadline:
				checked++
				if op.Outcome == OutcomeOK {
					late = append(late, op)
				} else {
					refused[op.Status]++
				}
			case op.End > f.Revoked:
				early++
			case op.Outcome == OutcomeOK:
				before++
			}
		}
		if len(late) > 0 {
			vs = append(vs, Violation{Check: CheckNameRevocations,
				Message: fmt.Sprintf("robot %s, revoked at %s (the command returned): %d write requests sent after %s were acknowledged",
					f.Target, fmtOffset(f.Revoked), len(late), fmtOffset(deadline)),
				Ops: late})
		}
	}
	var codes []string
	statuses := make([]int, 0, len(refused))
	for code := range refused {
		statuses = append(statuses, code)
	}
	slices.Sort(statuses)
	for _, code := range statuses {
		s := "no answer"
		if code != 0 {
			s = fmt.Sprint(code)
		}
		codes = append(codes, fmt.Sprintf("%s ×%d", s, refused[code]))
	}
	detail := fmt.Sprintf("%d revocations; %d write requests sent more than %v after one returned (answers: %s); %d sent earlier and answered after it, not judged; %d acknowledged before it",
		revocations, checked, revokeGrace, orDash(strings.Join(codes, ", ")), early, before)
	return newResult(CheckNameRevocations, checked, vs, detail)
}
