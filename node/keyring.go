package node

import (
	"context"
	"errors"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meridian-registry/meridian/node/membership"
	"github.com/meridian-registry/meridian/node/pki"
	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// keyringTimeout bounds how long a keyring change waits for members'
// answers.
const keyringTimeout = 15 * time.Second

var keyOps = map[string]membership.KeyOp{
	"list": membership.KeyList, "install": membership.KeyInstall,
	"use": membership.KeyUse, "remove": membership.KeyRemove,
}

// GossipKeyring changes the gossip keyring of every live member through
// this node's gossip, and reports each member's answer.
func (s adminServer) GossipKeyring(ctx context.Context, req *pb.GossipKeyringRequest) (*pb.GossipKeyringResponse, error) {
	op, ok := keyOps[req.Op]
	if !ok {
		return nil, status.Errorf(codes.InvalidArgument, "op %q: want list, install, use or remove", req.Op)
	}
	if op != membership.KeyList {
		if _, err := membership.DecodeKey(membership.EncodeKey(req.Key)); err != nil {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
	}
	if !s.n.membership.Encrypted() {
		return nil, status.Error(codes.FailedPrecondition, "this cluster's gossip is not encrypted: start every member with --gossip-key-file")
	}
	ctx, cancel := context.WithTimeout(ctx, keyringTimeout)
	defer cancel()
	answers, err := s.n.membership.ChangeKeyring(ctx, op, req.Key)
	if err != nil && len(answers) == 0 {
		return nil, status.Error(codes.Unavailable, err.Error())
	}
	resp := &pb.GossipKeyringResponse{}
	for _, a := range answers {
		resp.Members = append(resp.Members, &pb.GossipKeyringMember{Id: a.Member, Error: a.Err, Keys: a.Keys})
	}
	if err != nil {
		// This node refused the change (say, removing the primary key):
		// nothing was sent to the others.
		return resp, status.Error(codes.FailedPrecondition, err.Error())
	}
	return resp, nil
}

// saveGossipKeys writes the keyring to the key file the process started
// with, so that a restart comes back with the keys the cluster uses now.
func saveGossipKeys(path string) func([][]byte) error {
	if path == "" {
		return nil
	}
	return func(keys [][]byte) error {
		if err := pki.WriteFileAtomic(path, membership.FormatKeys(keys), 0o600); err != nil {
			return errors.New("keyring changed in memory, but the key file could not be written (update it by hand before the next restart): " + err.Error())
		}
		return nil
	}
}
