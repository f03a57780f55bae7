// Command meridian is the Meridian registry: one binary that runs a node
// (serve), a standalone gateway (gateway), a local three-region cluster
// (dev), the cluster CA (ca init, ca issue), cluster administration
// (cluster status, transfer-leader, remove, recover, gossip-key), policies
// (policy), blob scrubbing (scrub) and the benchmark (bench). Flags and
// wiring live here; everything else is in the packages it composes.
package main
