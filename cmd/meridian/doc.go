// Command meridian is the Meridian registry: one binary that runs a node
// (serve), a local three-node cluster (dev), cluster administration
// (cluster status, transfer-leader, remove, recover) and the benchmark
// (bench). Flags and wiring live here; everything else is in the packages
// it composes.
package main
