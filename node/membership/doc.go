// Package membership is the gossip membership of a Meridian cluster: which
// nodes and gateways exist, how to reach them, and whether they are alive.
//
// Every server node and every gateway runs one Membership. It gossips the
// member's metadata (cluster id, region, zone, role and the Raft, gRPC and
// HTTP addresses) over hashicorp/memberlist, refuses members of another
// cluster or another protocol version, and reports joins, metadata updates,
// graceful leaves and failures as Events. Consensus decides who votes; this
// package only says who is out there.
//
// It is a leaf package (standard library and memberlist only) so that the
// gateway can use it without importing any server code.
//
// Lifecycle: New validates the configuration without I/O, Start listens,
// Join contacts seeds, Close leaves the gossip and stops listening.
//
// Behaviour worth knowing:
//
//   - A member's ID is its memberlist node name and must be unique. While a
//     member is alive, another process that claims its ID from a different
//     address is ignored by the cluster and both sides log the conflict at
//     error level; the newcomer's Join keeps retrying and ends with
//     ErrDuplicateID, and its Close then skips the graceful leave so as not
//     to take the live member's entry with it. Once the first instance has
//     left or been declared dead, a process with the same ID takes its place
//     at once, with its new address (this is how a restart on another port
//     looks).
//   - Graceful leave and failure are told apart: Close first sends a leave
//     notice straight to every member it knows, then leaves. Peers report a
//     member that went away after its notice as StateLeft (EventLeave) and
//     any other as StateDead (EventFailed). Notices also travel in
//     memberlist's periodic state sync; a peer that gets one only after the
//     departure reports EventFailed followed by EventLeave. See leave.go.
//   - memberlist v0.7.0 does not expose suspicion, so members are reported
//     StateAlive until they are declared dead; StateSuspect is never
//     reported today.
//   - Dead and left members stay in Members for Config.Forget (24h by
//     default) so that callers can show when they went away.
package membership
