package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"syscall"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

const usage = `meridian: a geo-replicated OCI container registry

Usage:
  meridian serve [flags]     run a registry node (OCI API on :5000)
  meridian gateway [flags]   run a stateless gateway in front of a cluster (--join, --region-store …)
  meridian dev               run a local 3-region cluster with a gateway (what make run starts)
  meridian cluster …         status, transfer-leader, remove, recover
  meridian policy …          list, set, delete replication policies
  meridian ca …              init a cluster CA, issue member certificates, bootstrap a cluster's secrets
  meridian store init        create the region stores' missing S3 buckets
  meridian scrub             re-hash stored blobs in every region, repair wrong copies
  meridian user …            add, list, passwd, delete users
  meridian team …            add a team of users
  meridian robot …           create, list, revoke robot accounts (log in as robot+NAME)
  meridian access …          grant, revoke, list permissions on repository prefixes
  meridian audit [flags]     read the audit log (who changed what, from where)
  meridian gc …              run (or dry-run) garbage collection, show what it freed per region
  meridian backup --to FILE  write a backup of the replicated state and the blob list per region
  meridian restore --from FILE [serve flags]
                             prepare a data dir that starts a new cluster from a backup (--check: verify only)
  meridian repo delete NAME  delete a repository (its tags, manifests and blob links)
  meridian immutable …       add, delete, list tag immutability rules
  meridian quota …           set, delete, list storage, repository and tag quotas with their usage
  meridian retention …       set, delete, list, run retention rules (newest N tags, untagged, pulled)
  meridian webhook …         add, delete, list, test webhooks; show deliveries, replay dead letters
  meridian bench [flags]     measure a node, a gateway and a cluster against their references (--scale: many tags)
  meridian healthcheck       exit 0 if a member's /healthz answers 200 (the image's HEALTHCHECK)
  meridian version           print the version

Run 'meridian serve --help' for the node's flags.
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		private()
		err = serve(os.Args[2:])
	case "gateway":
		private()
		err = gatewayCmd(os.Args[2:])
	case "dev":
		private()
		err = dev(os.Args[2:])
	case "cluster":
		err = cluster(os.Args[2:])
	case "policy":
		err = policy(os.Args[2:])
	case "ca":
		err = ca(os.Args[2:])
	case "store":
		err = storeCmd(os.Args[2:])
	case "scrub":
		err = scrub(os.Args[2:])
	case "user":
		err = userCmd(os.Args[2:])
	case "team":
		err = teamCmd(os.Args[2:])
	case "robot":
		err = robotCmd(os.Args[2:])
	case "access":
		err = accessCmd(os.Args[2:])
	case "audit":
		err = auditCmd(os.Args[2:])
	case "gc":
		err = gcCmd(os.Args[2:])
	case "backup":
		private() // the file holds password hashes and signing keys
		err = backupCmd(os.Args[2:])
	case "restore":
		private()
		err = restoreCmd(os.Args[2:])
	case "repo":
		err = repoCmd(os.Args[2:])
	case "immutable":
		err = immutableCmd(os.Args[2:])
	case "quota":
		err = quotaCmd(os.Args[2:])
	case "retention":
		err = retentionCmd(os.Args[2:])
	case "webhook":
		err = webhookCmd(os.Args[2:])
	case "bench":
		err = bench(os.Args[2:])
	case "healthcheck":
		err = healthcheck(os.Args[2:])
	case "version", "--version":
		fmt.Println("meridian", version)
	case "help", "-h", "--help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "meridian: unknown command %q\n\n%s", os.Args[1], usage)
		os.Exit(2)
	}
	if errors.Is(err, flag.ErrHelp) {
		return // the flag package already printed the usage
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "meridian: %v\n", err)
		os.Exit(1)
	}
}

// private makes everything the process writes (state, Raft log, blobs,
// keys, uploads in progress) readable by its own user alone: 0600 files,
// 0700 directories, whatever the libraries ask for.
func private() { syscall.Umask(0o077) }
