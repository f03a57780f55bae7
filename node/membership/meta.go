package membership

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/hashicorp/memberlist"
)

// Role says what a member does in the cluster.
type Role string

const (
	// RoleServer is a node that holds Raft state and blobs.
	RoleServer Role = "server"
	// RoleGateway is a stateless OCI Distribution API gateway.
	RoleGateway Role = "gateway"
)

// ProtocolVersion is the membership/cluster protocol this binary speaks;
// members with another major version are refused.
const ProtocolVersion uint32 = 1

// maxIDLen bounds Meta.ID, which travels as the memberlist node name in every
// gossip message about the member (and is not part of the metadata bytes).
const maxIDLen = 128

// Meta is what a member tells the cluster about itself.
type Meta struct {
	// ID names the member uniquely within the cluster; it is the memberlist
	// node name and never changes for the life of a Membership.
	ID string
	// ClusterID must be equal on every member; others are refused.
	ClusterID string
	// Region and Zone place the member in the topology.
	Region, Zone string
	// Role is RoleServer or RoleGateway.
	Role Role
	// RaftAddr, GRPCAddr and HTTPAddr are the advertised host:port of the
	// member's listeners; empty when the member has no such listener.
	RaftAddr, GRPCAddr, HTTPAddr string
	// Version is the protocol version the member speaks (major only); zero
	// means ProtocolVersion. Members with another version are refused.
	Version uint32
	// Topology fingerprints the member's configured region list; members
	// whose fingerprints differ are refused (empty: not compared).
	Topology string
	// LogVersion is the newest Raft log format the member applies
	// (consensus.LogVersion of its binary); the leader proposes entries of
	// a newer format only when every server applies it. Metadata of
	// binaries from before the field decodes as 1; gateways apply no log
	// and leave it zero.
	LogVersion uint32
}

// Wire format of the metadata (memberlist limits it to MetaMaxSize bytes):
//
//	byte 0      encoding version (metaEncodingV1)
//	8 bytes     instance, big endian
//	uvarint     Meta.Version
//	7 strings   ClusterID, Region, Zone, Role, RaftAddr, GRPCAddr, HTTPAddr,
//	            each a uvarint length then the bytes
//	1 string    Topology (appended later; absent in older metadata)
//	uvarint     LogVersion (appended later; absent in older metadata: 1)
//
// The ID is not encoded: it is the memberlist node name. Decoders ignore
// trailing bytes, so later versions of this binary may append fields without
// changing the encoding version; a new encoding version is refused as
// incompatible.
const metaEncodingV1 byte = 1

var errMetaTruncated = errors.New("truncated metadata")

// wireMeta is Meta plus the internal state gossiped with it.
type wireMeta struct {
	Meta
	// instance is random per Membership, so that a leave notice names one
	// run of a member and cannot apply to its restart.
	instance uint64
}

func (w *wireMeta) fields() []*string {
	return []*string{&w.ClusterID, &w.Region, &w.Zone, (*string)(&w.Role), &w.RaftAddr, &w.GRPCAddr, &w.HTTPAddr}
}

func encodeMeta(w wireMeta) []byte {
	buf := make([]byte, 0, 128)
	buf = append(buf, metaEncodingV1)
	buf = binary.BigEndian.AppendUint64(buf, w.instance)
	buf = binary.AppendUvarint(buf, uint64(w.Version))
	for _, f := range w.fields() {
		buf = binary.AppendUvarint(buf, uint64(len(*f)))
		buf = append(buf, *f...)
	}
	buf = binary.AppendUvarint(buf, uint64(len(w.Topology)))
	buf = append(buf, w.Topology...)
	buf = binary.AppendUvarint(buf, uint64(w.LogVersion))
	return buf
}

// decodeMeta decodes the metadata of the member named id.
func decodeMeta(id string, b []byte) (wireMeta, error) {
	w := wireMeta{Meta: Meta{ID: id}}
	if len(b) == 0 {
		return w, errors.New("no metadata (not a Meridian member?)")
	}
	if b[0] != metaEncodingV1 {
		return w, fmt.Errorf("unknown metadata encoding %d", b[0])
	}
	if len(b) < 9 {
		return w, errMetaTruncated
	}
	w.instance = binary.BigEndian.Uint64(b[1:9])
	b = b[9:]
	v, n := binary.Uvarint(b)
	if n <= 0 || v > uint64(^uint32(0)) {
		return w, errMetaTruncated
	}
	w.Version = uint32(v)
	b = b[n:]
	for _, f := range w.fields() {
		l, n := binary.Uvarint(b)
		if n <= 0 || l > uint64(len(b)-n) {
			return w, errMetaTruncated
		}
		*f = string(b[n : n+int(l)])
		b = b[n+int(l):]
	}
	if len(b) > 0 { // absent in metadata of older binaries
		l, n := binary.Uvarint(b)
		if n <= 0 || l > uint64(len(b)-n) {
			return w, errMetaTruncated
		}
		w.Topology = string(b[n : n+int(l)])
		b = b[n+int(l):]
	}
	w.LogVersion = 1 // what every binary from before the field applies
	if len(b) > 0 {
		v, n := binary.Uvarint(b)
		if n <= 0 || v > uint64(^uint32(0)) {
			return w, errMetaTruncated
		}
		w.LogVersion = uint32(v)
	}
	return w, nil
}

// validateMeta checks what the local member advertises.
func validateMeta(m Meta) error {
	switch {
	case m.ID == "":
		return errors.New("membership: meta: ID is required")
	case len(m.ID) > maxIDLen:
		return fmt.Errorf("membership: meta: ID is %d bytes, over the limit of %d", len(m.ID), maxIDLen)
	case m.ClusterID == "":
		return errors.New("membership: meta: ClusterID is required")
	case m.Role != RoleServer && m.Role != RoleGateway:
		return fmt.Errorf("membership: meta: role %q is neither %q nor %q", m.Role, RoleServer, RoleGateway)
	}
	for _, r := range m.ID {
		if r <= ' ' || r == '/' || r == 0x7f {
			return fmt.Errorf("membership: meta: ID %q contains a space, control character or '/'", m.ID)
		}
	}
	if n := len(encodeMeta(wireMeta{Meta: m})); n > memberlist.MetaMaxSize {
		return fmt.Errorf("membership: meta: encoded metadata is %d bytes, over memberlist's limit of %d; shorten the cluster id, region, zone or addresses",
			n, memberlist.MetaMaxSize)
	}
	return nil
}
