// Package consensus owns Meridian's replicated metadata: the hashicorp/raft
// node, the finite-state machine that applies log entries, the Pebble state
// store those entries build (repositories, manifests, tags, blob links and
// placements, referrers), snapshots of that store, and the Raft log store on
// a second Pebble instance.
//
// It knows nothing of HTTP or object storage. Writes arrive as validated
// meridianpb.Command intents (Node.Commit); Entry turns one into the
// LogEntry Raft carries, the only place entries are built. Business
// failures come back as *meridianpb.Error values. Reads go straight to the
// local Store.
//
// On disk, a node's data directory holds:
//
//	raft/       the Raft log and stable store (Pebble, synced writes)
//	state/      the state store (Pebble), including the last applied index
//	snapshots/  Raft snapshot files (streams of the state store)
package consensus
