package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/meridian-registry/meridian/gateway"
	"github.com/meridian-registry/meridian/node"
	"github.com/meridian-registry/meridian/node/pki"
)

// devNodes are the three nodes of `meridian dev`, one per simulated region;
// a gateway in front of them serves the registry on localhost:5000.
var devNodes = []struct {
	id, region string
	base       int
}{{"dev-a", "us-east", 5100}, {"dev-b", "eu-west", 5200}, {"dev-c", "ap-south", 5300}}

// devGateway is where `meridian dev` serves the registry.
const devGateway = "localhost:5000"

// Member ids of the dev gateway and of the admin certificate dev issues.
const (
	devGatewayID = "dev-gateway"
	devAdminID   = "admin"
)

// devPKI creates the dev cluster's CA, gossip key and revocation list in
// dir, and a certificate for every member and for an admin, unless they
// exist.
func devPKI(dir string) error {
	plan := pkiPlan{clusterID: node.DefaultConfig().ClusterID, members: []pki.IssueRequest{
		{Role: pki.RoleGateway, ID: devGatewayID}, {Role: pki.RoleAdmin, ID: devAdminID}}}
	for _, d := range devNodes {
		plan.members = append(plan.members, pki.IssueRequest{Role: pki.RoleNode, ID: d.id})
	}
	for i := range plan.members {
		plan.members[i].DNSNames = []string{"localhost"}
	}
	if _, err := ensurePKI(dir, plan); err != nil {
		return fmt.Errorf("dev certificates: %w", err)
	}
	return nil
}

// dev runs a local three-node cluster in this process until Ctrl-C.
func dev(args []string) error {
	fs := flag.NewFlagSet("meridian dev", flag.ContinueOnError)
	dir := fs.String("dir", "data/dev", "directory for the nodes' data (kept between runs)")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return err
	}
	logger := newLogger(*logLevel, "text")
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	blobs, err := filepath.Abs(filepath.Join(*dir, "blobs"))
	if err != nil {
		return err
	}
	// Each simulated region keeps its blobs in its own directory, which only
	// its node uses; the others reach it through that node, and the
	// replicators copy every blob into every region.
	var regions []node.RegionConfig
	for _, d := range devNodes {
		regions = append(regions, node.RegionConfig{Name: d.region, Store: "file://" + filepath.Join(blobs, d.region)})
	}

	// The cluster's own CA, certificates and gossip key, made once: the
	// dev cluster runs with every trust setting a production one has.
	pkiDir := filepath.Join(*dir, "pki")
	if err := devPKI(pkiDir); err != nil {
		return err
	}
	secure := func(c *node.Config, id string) {
		c.TLSCA = filepath.Join(pkiDir, pki.CACertFile)
		c.TLSCRL = filepath.Join(pkiDir, pki.CRLFile)
		c.TLSCert, c.TLSKey = filepath.Join(pkiDir, id+".crt"), filepath.Join(pkiDir, id+".key")
		c.GossipKeyFile = filepath.Join(pkiDir, pki.GossipKeyFile)
	}

	var nodes []*node.Node
	defer func() {
		shutdown, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		for i := len(nodes) - 1; i >= 0; i-- {
			nodes[i].Close(shutdown)
		}
	}()
	for i, d := range devNodes {
		cfg := node.DefaultConfig()
		cfg.NodeID, cfg.Region = d.id, d.region
		cfg.DataDir = filepath.Join(*dir, d.id)
		cfg.Regions = regions
		cfg.HTTPAddr = fmt.Sprintf(":%d", d.base)
		cfg.GRPCAddr = fmt.Sprintf("127.0.0.1:%d", d.base+1)
		cfg.RaftAddr = fmt.Sprintf("127.0.0.1:%d", d.base+2)
		cfg.GossipAddr = fmt.Sprintf("127.0.0.1:%d", d.base+3)
		cfg.GossipProfile = "local"
		cfg.LogLevel = *logLevel
		secure(&cfg, d.id)
		if i > 0 {
			cfg.Join = []string{fmt.Sprintf("127.0.0.1:%d", devNodes[0].base+3)}
		}
		n, err := node.New(cfg, logger.With("node", d.id))
		if err != nil {
			return err
		}
		if err := n.Start(ctx); err != nil {
			return fmt.Errorf("start %s: %w", d.id, err)
		}
		nodes = append(nodes, n)
	}
	ready, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	for _, n := range nodes {
		if err := n.WaitReady(ready); err != nil {
			if errors.Is(ctx.Err(), context.Canceled) {
				return nil
			}
			return err
		}
	}

	// The gateway: in us-east, in front of all three nodes.
	gc := gatewayDefaults() // as `meridian gateway` runs, blob cache included
	gc.Region = devNodes[0].region
	gc.Regions = regions
	gc.HTTPAddr = ":5000"
	gc.GossipAddr = "127.0.0.1:5004"
	gc.GossipProfile = "local"
	gc.Join = []string{fmt.Sprintf("127.0.0.1:%d", devNodes[0].base+3)}
	secure(&gc, devGatewayID)
	sc, err := standaloneConfig(gc)
	if err != nil {
		return err
	}
	sc.ID = devGatewayID
	sc.Logger = logger.With("node", devGatewayID)
	if sc.Trust, sc.GossipKeys, err = gc.LoadTrust(sc.Logger); err != nil {
		return err
	}
	closeAccess, err := gatewayAccess(gc, &sc, sc.Logger)
	if err != nil {
		return err
	}
	defer closeAccess()
	gw, err := gateway.NewStandalone(sc)
	if err != nil {
		return err
	}
	if err := gw.Start(ctx); err != nil {
		return fmt.Errorf("start the gateway: %w", err)
	}
	defer func() {
		shutdown, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		gw.Close(shutdown)
	}()
	// The first node created the first admin when the cluster was new.
	passwordFile := filepath.Join(*dir, devNodes[0].id, node.AdminPasswordFileName)
	password, err := waitForFile(ctx, passwordFile, 30*time.Second)
	if err != nil {
		return fmt.Errorf("the first admin's password: %w", err)
	}
	fmt.Println()
	fmt.Println("Meridian dev cluster is up (Ctrl-C stops it; data in " + *dir + "):")
	fmt.Printf("  gateway  registry http://%s   (in front of every node)\n", devGateway)
	for _, d := range devNodes {
		fmt.Printf("  %s  region %-9s registry http://localhost:%d   grpc 127.0.0.1:%d   blobs %s\n",
			d.id, d.region, d.base, d.base+1, filepath.Join(blobs, d.region))
	}
	fmt.Println()
	fmt.Println("Log in as the first admin (its password is in " + passwordFile + "), then push and pull:")
	fmt.Printf("  docker login %s -u admin -p %s\n", devGateway, password)
	fmt.Println()
	fmt.Println("Push to " + devGateway + " with any OCI client. Nodes and the gateway speak mutual TLS and encrypted")
	fmt.Println("gossip with the cluster CA in " + pkiDir + "; admin commands take its admin certificate:")
	fmt.Printf("  export MERIDIAN_TLS_CA=%s MERIDIAN_TLS_CERT=%s MERIDIAN_TLS_KEY=%s\n",
		filepath.Join(pkiDir, pki.CACertFile), filepath.Join(pkiDir, devAdminID+".crt"), filepath.Join(pkiDir, devAdminID+".key"))
	fmt.Println("  meridian cluster status --addr 127.0.0.1:5101")
	<-ctx.Done()
	logger.Info("stopping the dev cluster")
	return nil
}

// waitForFile returns the first line of path once it exists.
func waitForFile(ctx context.Context, path string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		b, err := os.ReadFile(path)
		if err == nil && len(b) > 0 {
			return strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[0]), nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return "", fmt.Errorf("%s not written within %v: %v", path, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
