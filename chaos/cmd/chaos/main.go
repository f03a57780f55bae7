// Command chaos runs Meridian's fault-injection harness: a real cluster of
// meridian processes on loopback, a seeded workload through two gateways,
// faults on a seeded schedule, then the checkers. It exits non-zero when a
// promise was broken or the run could not be made.
//
//	chaos -profile short -meridian bin/meridian -versitygw bin/tools/versitygw
package main

import (
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/meridian-registry/meridian/chaos"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "chaos:", err)
		os.Exit(2)
	}
}

func run() error {
	profile := flag.String("profile", "short", "short (3 nodes, one S3 region, ≤5 min) or long (3 regions, 5 nodes)")
	seed := flag.Uint64("seed", 0, "seed of the workload and the fault schedule (0: random, printed)")
	duration := flag.Duration("duration", 0, "length of the workload phase (0: the profile's)")
	noFaults := flag.Bool("no-faults", false, "run the workload on a healthy cluster")
	faultKinds := flag.String("faults", "", "comma-separated fault kinds to inject (default: all of "+strings.Join(chaos.FaultKinds, ",")+")")
	meridian := flag.String("meridian", "bin/meridian", "meridian binary")
	versitygw := flag.String("versitygw", os.Getenv("MERIDIAN_VERSITYGW"), "versitygw binary (env MERIDIAN_VERSITYGW)")
	dir := flag.String("dir", "", "run directory for data, logs, history and report (default: a new one under the system temp dir)")
	reportPath := flag.String("report", "", "also copy the JSON report here")
	keepData := flag.Bool("keep-data", false, "keep the nodes' data and the regions' blobs after a run that passed")
	flag.Parse()
	if flag.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %v", flag.Args())
	}
	p, err := chaos.ProfileByName(*profile)
	if err != nil {
		return err
	}
	for name, path := range map[string]string{"-meridian": *meridian, "-versitygw": *versitygw} {
		if path == "" {
			return fmt.Errorf("%s is required", name)
		}
		if _, err := os.Stat(path); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
	}
	var kinds []string
	if *faultKinds != "" {
		for _, k := range strings.Split(*faultKinds, ",") {
			if !slices.Contains(chaos.FaultKinds, k) {
				return fmt.Errorf("-faults: unknown kind %q (want some of %s)", k, strings.Join(chaos.FaultKinds, ","))
			}
			kinds = append(kinds, k)
		}
	}
	if *seed == 0 {
		*seed = rand.Uint64()
	}
	if *dir == "" {
		if *dir, err = os.MkdirTemp("", fmt.Sprintf("meridian-chaos-%s-%d-", p.Name, *seed)); err != nil {
			return err
		}
	}
	abs := func(p string) string { a, _ := filepath.Abs(p); return a }
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// Every run stops by itself: workload, healing, convergence and
	// verification are each bounded; this is the outer bound.
	limit := p.Workload
	if *duration > 0 {
		limit = *duration
	}
	ctx, cancel := context.WithTimeout(ctx, limit+25*time.Minute)
	defer cancel()

	rep, err := chaos.Run(ctx, chaos.RunConfig{
		Seed: *seed, Profile: p, Workload: *duration, NoFaults: *noFaults, FaultKinds: kinds, KeepData: *keepData,
		Meridian: abs(*meridian), Versitygw: abs(*versitygw), Dir: abs(*dir), Out: os.Stdout,
	})
	if err != nil {
		return fmt.Errorf("%w (seed %d, logs in %s)", err, *seed, *dir)
	}
	fmt.Println()
	if err := rep.WriteText(os.Stdout); err != nil {
		return err
	}
	if *reportPath != "" {
		if err := rep.WriteJSON(*reportPath); err != nil {
			return err
		}
	}
	if !rep.Passed {
		fmt.Printf("reproduce with: chaos -profile %s -seed %d\n", p.Name, *seed)
		os.Exit(1)
	}
	return nil
}
