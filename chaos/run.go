package chaos

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// RunConfig is one chaos run.
type RunConfig struct {
	Seed    uint64
	Profile Profile
	// Workload overrides the profile's workload length when positive.
	Workload time.Duration
	// NoFaults runs the workload on a healthy cluster (a baseline).
	NoFaults bool
	// FaultKinds limits the faults to these kinds (nil: all of FaultKinds).
	FaultKinds []string
	// KeepData keeps the nodes' data and the regions' blobs after a run
	// that passed; a failed run always keeps them.
	KeepData bool
	// Meridian and Versitygw are the binaries to run.
	Meridian, Versitygw string
	// Dir receives the processes' data and logs, the history and the
	// report.
	Dir string
	// Out receives progress lines and the summary.
	Out io.Writer
}

// Run starts the profile's cluster, runs the workload under faults, heals,
// waits for convergence, verifies every acknowledged push and checks the
// history. The report says whether every promise held; the error is for a
// harness that could not run (a cluster that never started, say).
func Run(ctx context.Context, cfg RunConfig) (*Report, error) {
	out := cfg.Out
	if out == nil {
		out = io.Discard
	}
	logf := func(format string, args ...any) {
		fmt.Fprintf(out, "%s  %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
	}
	p := cfg.Profile
	workload := p.Workload
	if cfg.Workload > 0 {
		workload = cfg.Workload
	}
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return nil, err
	}
	logf("chaos run: profile %s, seed %d, workload %v, directory %s", p.Name, cfg.Seed, workload, cfg.Dir)

	startCtx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	c, err := StartCluster(startCtx, Options{Meridian: cfg.Meridian, Versitygw: cfg.Versitygw, Dir: cfg.Dir, Profile: p, Log: out})
	cancel()
	if err != nil {
		return nil, fmt.Errorf("starting the cluster: %w", err)
	}
	defer c.Close()

	h := NewHistory()
	started := time.Now()
	wc := workloadFor(p, cfg.Seed, c.Gateways())
	wc.Live = logf
	wc.Admin, wc.Robot = c.AdminCredentials(), c.Robot
	wl := NewWorkload(wc, h)
	setupCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	err = wl.Setup(setupCtx)
	cancel()
	if err != nil {
		return nil, err
	}

	// The workload and the faults run side by side for the workload's
	// length; faults heal themselves when their context ends.
	runCtx, stopRun := context.WithTimeout(ctx, workload)
	defer stopRun()
	var (
		faults   []Fault
		faultsCh = make(chan Fault, 64)
		done     = make(chan struct{})
	)
	go func() {
		for f := range faultsCh {
			faults = append(faults, f)
			end := "one-shot"
			if f.End > 0 {
				end = "healed at " + f.End.Round(time.Millisecond).String()
			}
			detail := f.Detail
			if f.Failure != "" {
				detail += " FAILED: " + f.Failure
			}
			logf("fault %-12s %-20s at %v, %s %s", f.Kind, f.Target, f.Start.Round(time.Millisecond), end, detail)
		}
		close(done)
	}()
	// The schedule's promises, checked in the report.
	var quotas []FaultQuota
	if !cfg.NoFaults {
		quotas = FaultQuotas(p, cfg.FaultKinds, p.faultRounds(workload))
	}
	faultsDone := make(chan struct{})
	if cfg.NoFaults {
		close(faultsDone)
	} else {
		rng := rand.New(rand.NewPCG(cfg.Seed, 0xfa017))
		go func() {
			defer close(faultsDone)
			c.InjectFaults(runCtx, rng, FaultPlan{Base: h.Base(), MeanInterval: p.FaultEvery, MaxConcurrent: p.MaxFaults, Kinds: cfg.FaultKinds},
				func(f Fault) { faultsCh <- f })
		}()
	}
	progress := time.NewTicker(30 * time.Second)
	go func() {
		for {
			select {
			case <-runCtx.Done():
				return
			case <-progress.C:
				logf("%d operations so far", len(h.Ops()))
			}
		}
	}()
	logf("workload and faults running, garbage collection every %v or so (grace %v)", gcEvery, gcGrace)
	gcCtx, stopGC := context.WithCancel(ctx)
	gcDone := make(chan struct{})
	go func() {
		defer close(gcDone)
		c.GCLoop(gcCtx, h, rand.New(rand.NewPCG(cfg.Seed, 0x6c)))
	}()
	wl.Run(ctx, workload)
	stopGC()
	<-gcDone
	progress.Stop()
	workloadTook := time.Since(started)
	<-faultsDone
	close(faultsCh)
	<-done
	logf("workload stopped after %v: %d operations", workloadTook.Round(time.Second), len(h.Ops()))

	// Heal, converge, verify.
	healCtx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	err = c.Heal(healCtx)
	cancel()
	if err != nil {
		logf("healing: %v", err)
	}
	convCtx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	conv := c.WaitConverged(convCtx)
	cancel()
	logf("convergence: %v after %v (applied index %d) %s", conv.Converged, conv.Took.Round(time.Millisecond), conv.Applied, conv.Detail)
	// A last collection, and every region done removing what it
	// condemned, before verifying and reading the stores.
	finalCtx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	drain := c.FinalGC(finalCtx, h, regionNames(p))
	cancel()
	logf("gc: %s", drain)
	verifyCtx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	n := wl.Verify(verifyCtx, 4)
	wl.FinalTagReads(verifyCtx)
	cancel()
	logf("verified %d acknowledged images", n)

	ops := h.Ops()
	checks := CheckHistory(ops, linearizabilityTimeout)
	checks = append(checks, checkStores(ctx, c, ops, drain, logf))
	if hasKind(quotas, faults, FaultCertRotate) {
		checks = append(checks, CheckCertRotations(faults))
	}
	if hasKind(quotas, faults, FaultRevoke) {
		checks = append(checks, CheckRevocations(ops, faults))
	}
	if hasKind(quotas, faults, FaultGossipKey) {
		checks = append(checks, CheckGossipKeys(faults))
	}
	for _, ch := range checks {
		logf("check %s: %s, %d checked, in %v", ch.Name, ch.Status, ch.Checked, ch.Took.Round(time.Millisecond))
	}
	rep := NewReport(cfg.Seed, p.Name, started, workloadTook, ops, faults, quotas, checks, &conv)
	if err := writeJSON(filepath.Join(cfg.Dir, "history.json"), ops); err != nil {
		logf("writing the history: %v", err)
	}
	for _, ch := range checks {
		if ch.Name == "tags-linearizable" && ch.Status != CheckPass {
			path := filepath.Join(cfg.Dir, "linearizability.html")
			if err := WriteLinearizabilityVisualization(ops, path); err == nil {
				rep.Notes = append(rep.Notes, "linearizability visualization: "+path)
			}
		}
	}
	if err := rep.WriteJSON(filepath.Join(cfg.Dir, "report.json")); err != nil {
		return rep, err
	}
	rep.Notes = append(rep.Notes, "report: "+filepath.Join(cfg.Dir, "report.json"), "history: "+filepath.Join(cfg.Dir, "history.json"),
		"logs: "+filepath.Join(cfg.Dir, "logs"))
	if rep.Passed && !cfg.KeepData {
		// Gigabytes of blobs prove nothing more once the run passed.
		c.Close()
		for _, sub := range []string{"nodes", "blobs", "s3"} {
			os.RemoveAll(filepath.Join(cfg.Dir, sub))
		}
		rep.Notes = append(rep.Notes, "the nodes' data and the regions' blobs were removed (the run passed; -keep-data keeps them)")
	}
	return rep, nil
}

// checkStores runs CheckLiveManifests on the region stores. The bound
// leaves room for the long profile, whose regions hold a few GB each.
func checkStores(ctx context.Context, c *Cluster, ops []Op, drain GCDrain, logf func(string, ...any)) CheckResult {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Minute)
	defer cancel()
	start := time.Now()
	stores, err := c.RegionStores(ctx)
	if err != nil {
		logf("opening the region stores: %v", err)
	}
	r := CheckLiveManifests(ctx, ops, stores, c.RegionsOf, drain)
	r.Took = time.Since(start)
	return r
}

func regionNames(p Profile) []string {
	var names []string
	for _, r := range p.Regions {
		names = append(names, r.Name)
	}
	return names
}

// hasKind reports whether a run with these promises and faults has faults
// of kind to check: promised ones (none injected is then a check with
// nothing to check, which fails the run) or injected ones.
func hasKind(quotas []FaultQuota, faults []Fault, kind string) bool {
	return slices.ContainsFunc(quotas, func(q FaultQuota) bool { return q.Kind == kind }) ||
		slices.ContainsFunc(faults, func(f Fault) bool { return f.Kind == kind })
}

// linearizabilityTimeout bounds porcupine. A run whose checker times out
// fails (Report), so the workload keeps each tag's history small
// (WorkloadConfig.TagGeneration): on the short profile the whole check
// takes milliseconds (10–50 ms for ~1,700 operations on 29 tags). The
// bound only keeps a pathological history from holding the run.
const linearizabilityTimeout = 2 * time.Minute

// workloadFor scales the clients to the profile: the short profile keeps a
// loaded 2-core machine able to serve its nodes.
func workloadFor(p Profile, seed uint64, gws []Endpoint) WorkloadConfig {
	wc := WorkloadConfig{
		Seed: seed, Gateways: gws,
		Pushers: 2, Uploaders: 1, Pullers: 2, Taggers: 3, Movers: 1, RobotWriters: 1,
		DeleteOneIn: 6, SharedLayers: 8,
		TagSlots: 3, TagGeneration: 120,
		ChunkedBlobSize: 11 << 20,
		UploadPause:     3 * time.Second,
		Think:           100 * time.Millisecond,
		// A revoked robot's refusals count against the registry's
		// failed-login limit (100 a minute from one address, where every
		// client is): a few dozen per revocation stay well below it.
		RobotPause:     250 * time.Millisecond,
		RequestTimeout: 20 * time.Second,
	}
	if len(p.Nodes) >= 5 {
		// About 2 MB/s of new blobs per region: 30 minutes fit in ~4 GB
		// a region.
		wc.Pushers, wc.Pullers, wc.Taggers, wc.TagSlots = 3, 3, 4, 4
		wc.Think = 60 * time.Millisecond
		wc.UploadPause = 6 * time.Second
	}
	return wc
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}
