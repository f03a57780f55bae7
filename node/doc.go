// Package node runs one Meridian server process: it composes the consensus
// node (Raft and the Pebble state store), the region's blob store and the
// embedded OCI gateway behind one HTTP (or HTTPS) listener with health,
// readiness and metrics endpoints, and serves the cluster's gRPC API.
//
// The node owns the commands: every write, from its own gateway, a
// standalone gateway, another node or the admin API, is validated field by
// field (commands.go) before consensus builds the log entry; followers
// forward commands, never entries, to the leader (forward.go). The gRPC
// API is one service per caller role (server.go): Member for other nodes,
// Gateway for gateways, Admin for operator commands. With cluster TLS,
// gRPC and Raft run over mutual TLS (node/transport) and each service
// admits the certificate roles in access.go. keyring.go
// rotates the gossip keyring through gossip; scrub.go re-hashes stored
// blobs and repairs wrong copies.
package node
