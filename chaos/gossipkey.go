package chaos

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"time"
)

// gossipKeyWithin bounds a gossip key rotation's healing: from the
// removal of the old key until every member's key file holds the new key
// alone, the restarted node is back, and it and another node see every
// member alive in gossip. A restart takes a few seconds; the rest is
// slack for a loaded machine.
const gossipKeyWithin = 20 * time.Second

// gossipKeyTarget is what a gossip-key fault's record names: the
// rotation is cluster-wide.
const gossipKeyTarget = "gossip-keyring"

// newGossipKey is 32 random bytes in base64, what `meridian ca init`
// writes and `meridian cluster gossip-key` takes.
func newGossipKey() string {
	b := make([]byte, 32)
	rand.Read(b)
	return base64.StdEncoding.EncodeToString(b)
}

// readGossipKeys returns the keys of a key file, primary first (blank
// lines and # comments skipped).
func readGossipKeys(path string) ([]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var keys []string
	for _, line := range strings.Split(string(b), "\n") {
		if s := strings.TrimSpace(line); s != "" && !strings.HasPrefix(s, "#") {
			keys = append(keys, s)
		}
	}
	return keys, nil
}

// shortKey tells keys apart in a report without printing them whole.
func shortKey(k string) string { return abbrev(k, 8) }

// rotateGossipKey rotates the cluster's gossip key online as an operator
// would: `meridian cluster gossip-key install NEW`, `use NEW`, `remove
// OLD`, each with the admin certificate through a live node. It runs with
// every member up (the draw makes it wait for that): a member down during
// the rotation would miss the new key and, the old one gone, could not
// come back, which is the operator's mistake, not the cluster's.
//
// Healing restarts f.node (kill -9, then a start from its key file) and
// waits, gossipKeyWithin at most, until every member's key file holds the
// new key alone and f.node and another node each list every member alive
// in gossip; if not, f.failure says what was seen last. An install that
// fails is an injection error (nothing changed but maybe a spare key); a
// use or remove that fails is a failure.
func (c *Cluster) rotateGossipKey(f *faultSpec) (heal func(context.Context) string, err error) {
	n := c.node(f.node)
	if n == nil {
		return nil, fmt.Errorf("no node %s", f.node)
	}
	keys, err := readGossipKeys(c.pki.memberGossipKeyFile(f.node))
	if err != nil {
		return nil, err
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("%s holds no gossip key", c.pki.memberGossipKeyFile(f.node))
	}
	old, next := keys[0], newGossipKey()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	start := time.Now()
	// Each step is idempotent, so a node that failed may be retried on
	// another.
	if _, err := c.adminCommand(ctx, true, "cluster", "gossip-key", "install", next); err != nil {
		return nil, err
	}
	f.detail = "restart " + f.node + ", key " + shortKey(old) + " → " + shortKey(next)
	for _, step := range [][]string{{"use", next}, {"remove", old}} {
		if _, err := c.adminCommand(ctx, true, append([]string{"cluster", "gossip-key"}, step...)...); err != nil {
			f.failure = fmt.Sprintf("gossip-key %s: %v", step[0], err)
			return func(context.Context) string { return "" }, nil
		}
	}
	removed := time.Now()
	f.detail += fmt.Sprintf(", install/use/remove took %v", removed.Sub(start).Round(10*time.Millisecond))
	return func(ctx context.Context) string {
		ctx, cancel := context.WithDeadline(ctx, removed.Add(gossipKeyWithin))
		defer cancel()
		if err := c.gossipKeyRejoin(ctx, n, next); err != nil {
			f.failure = err.Error()
			return ""
		}
		f.detail += fmt.Sprintf("; %s restarted from its key file, every member alive in gossip after %v",
			f.node, time.Since(removed).Round(10*time.Millisecond))
		return ""
	}, nil
}

// gossipKeyRejoin checks the key files for key alone, restarts n from its
// own and waits until n and another node see every member alive.
func (c *Cluster) gossipKeyRejoin(ctx context.Context, n *nodeProc, key string) error {
	// Members rewrite their files as they apply each change; the removal
	// returned once every member applied it.
	var members []string
	for _, m := range c.nodes {
		members = append(members, m.spec.ID)
	}
	for _, g := range c.gateways {
		members = append(members, g.spec.ID)
	}
	var last string
	err := pollUntil(ctx, time.Until(deadlineOf(ctx)), 200*time.Millisecond, nil, func() bool {
		for _, id := range members {
			keys, err := readGossipKeys(c.pki.memberGossipKeyFile(id))
			if err != nil {
				last = err.Error()
				return false
			}
			if !slices.Equal(keys, []string{key}) {
				last = fmt.Sprintf("%s's key file holds %d keys", id, len(keys))
				if len(keys) > 0 {
					last += ", primary " + shortKey(keys[0])
				}
				return false
			}
		}
		return true
	})
	if err != nil {
		return fmt.Errorf("key files not rewritten to the new key alone (%v): %s", err, last)
	}

	// A restart comes back from the rewritten file only.
	if err := n.proc.Kill(); err != nil {
		return fmt.Errorf("kill %s: %w", n.spec.ID, err)
	}
	if err := c.startNode(ctx, n); err != nil {
		return fmt.Errorf("restart of %s from its key file: %w", n.spec.ID, err)
	}
	var other *nodeProc
	for _, o := range c.nodes {
		if o != n && o.proc.Running() && !o.proc.Paused() {
			other = o
			break
		}
	}
	err = pollUntil(ctx, time.Until(deadlineOf(ctx)), 500*time.Millisecond, n.proc.Exited(), func() bool {
		for _, o := range []*nodeProc{n, other} {
			if o == nil {
				continue
			}
			health, err := c.memberHealth(ctx, o)
			if err != nil {
				last = err.Error()
				return false
			}
			for _, id := range members {
				if health[id] != "alive" {
					last = fmt.Sprintf("%s sees %s %s", o.spec.ID, id, orDash(health[id]))
					return false
				}
			}
		}
		return true
	})
	if err != nil {
		return fmt.Errorf("after the restart of %s not every member alive in gossip (%v): %s", n.spec.ID, err, last)
	}
	return nil
}

// deadlineOf is ctx's deadline, or a minute from now.
func deadlineOf(ctx context.Context) time.Time {
	if d, ok := ctx.Deadline(); ok {
		return d
	}
	return time.Now().Add(time.Minute)
}

// memberHealth is every member's gossip state (nodes and gateways, by id)
// as n sees it, from `meridian cluster status --json` against n.
func (c *Cluster) memberHealth(ctx context.Context, n *nodeProc) (map[string]string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	args := append([]string{"cluster", "status", "--json", "--addr", n.grpcAddr, "--timeout", "8s"}, c.pki.tlsFlags(adminID)...)
	cmd := exec.CommandContext(ctx, c.opt.Meridian, args...)
	cmd.Env = harnessEnv()
	var stderr strings.Builder
	cmd.Stderr = &stderr
	b, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("cluster status from %s: %v: %s", n.spec.ID, err, strings.TrimSpace(stderr.String()))
	}
	return parseMemberHealth(b)
}

// parseMemberHealth reads the members' health from the status JSON.
func parseMemberHealth(b []byte) (map[string]string, error) {
	var sj statusJSON
	if err := json.NewDecoder(bytes.NewReader(b)).Decode(&sj); err != nil {
		return nil, fmt.Errorf("cluster status JSON: %w", err)
	}
	if len(sj.Members) == 0 {
		return nil, errors.New("cluster status lists no members")
	}
	h := map[string]string{}
	for _, m := range sj.Members {
		h[m.ID] = m.Health
	}
	return h, nil
}

// CheckGossipKeys is the check of the gossip-key faults: each online
// rotation of the gossip key completed (install, use, remove), every
// member rewrote its key file to the new key alone, and after a node's
// restart from its file the node and another saw every member alive in
// gossip, within gossipKeyWithin of the removal. Checked counts the
// rotations injected; one whose Failure is set is a violation.
func CheckGossipKeys(faults []Fault) CheckResult {
	return checkFaultOutcomes(faults, FaultGossipKey, CheckNameGossipKeys,
		func(f Fault) string { return fmt.Sprintf("rotation at %s (%s)", fmtOffset(f.Start), f.Detail) },
		func(ok, checked int) string {
			return fmt.Sprintf("%d of %d gossip key rotations left every member alive in gossip, a restarted node included", ok, checked)
		}, "from install")
}
