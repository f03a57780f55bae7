// Package transport is how a Meridian process (node, gateway or CLI)
// speaks to cluster members: one place that wraps the Raft listener and
// dialer in mutual TLS, builds the gRPC server and client credentials,
// and checks each gRPC call's caller role against a table of which roles
// may call which method.
//
// Trust holds the process's member identity (a pki.Source). A nil or
// empty Trust means plaintext, which is only allowed on loopback unless
// the operator says --insecure-cluster (see CheckListeners).
package transport
