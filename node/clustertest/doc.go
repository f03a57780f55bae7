// Package clustertest runs a Meridian cluster inside one process for tests,
// chaos runs and benchmarks: N real node.Node's, each with its own data
// directory, all listening on 127.0.0.1 ports chosen at first start and
// kept across restarts, sharing one blob directory so every node serves
// every blob.
//
// Node 0 bootstraps the cluster and the others join it through gossip. A
// Cluster can stop nodes gracefully or kill them as a crash would, restart
// them (same data, same addresses unless asked otherwise), find the leader,
// wait until the Raft configuration or the replicated state converges, and
// cut nodes off from each other.
//
// Cuts act on the connections that Raft and the nodes' gRPC links open
// (node.Config.Dial): dials across a cut fail at once and connections
// across it are closed when it starts. Gossip is not cut, so a cut node
// still looks alive to membership (it is a network partition of the data
// paths, not a crash), and clients' HTTP requests still reach every node.
// A node's addresses are known to the cut table once its Start returns;
// connections opened to it before then are cut too, since their owner is
// looked up when a cut starts. Kill uses the same table: a killed node's
// Raft and gRPC connections are cut before it stops (its gossip then stops
// without a leave), and stay cut until it restarts.
//
// Every helper that waits polls with a deadline taken from its context.
package clustertest
