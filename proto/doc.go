// Package proto holds Meridian's protobuf definitions. The generated Go code is
// committed next to each .proto file (see meridianpb) and `make proto`
// regenerates it, so a build never needs protoc.
package proto
