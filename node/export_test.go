package node

// SetSkipReadIndex makes n answer every read from its replica as it stands,
// without a read index from the leader: a local miss is not confirmed and a
// strong read is not linearizable. Tests use it as a negative control, to
// show that their checks catch what the read index prevents.
func (n *Node) SetSkipReadIndex(skip bool) { n.skipReadIndex.Store(skip) }

// OwnWritesPending reports whether n acknowledged a write it has not
// applied yet: its local reads wait for that write (or answer 503).
func (n *Node) OwnWritesPending() bool { return n.acked.Load() > n.consensus.AppliedIndex() }
