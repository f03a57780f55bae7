// Package meridianpb holds the messages every Meridian component shares: the
// Raft log entry, the records kept in the state store, and the error codes
// that travel unchanged from the state machine to the HTTP edge.
//
// meridian.pb.go is generated from meridian.proto by `make proto`; errors.go
// is written by hand.
package meridianpb
