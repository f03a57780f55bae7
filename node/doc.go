// Package node runs one Meridian server process: it composes the consensus
// node (Raft and the Pebble state store), the region's blob store and the
// embedded OCI gateway behind one HTTP listener with health, readiness and
// metrics endpoints.
package node
