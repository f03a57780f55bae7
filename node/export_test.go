package node

// SetSkipReadIndex makes n answer every read from its replica as it stands,
// without a read index from the leader: a local miss is not confirmed and a
// strong read is not linearizable. Tests use it as a negative control, to
// show that their checks catch what the read index prevents.
func (n *Node) SetSkipReadIndex(skip bool) { n.skipReadIndex.Store(skip) }
