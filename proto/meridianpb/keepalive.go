package meridianpb

import (
	"time"

	"google.golang.org/grpc/keepalive"
)

// ClientKeepalive is how nodes' and gateways' gRPC clients notice a member
// that stopped answering without closing its connections (paused, cut off
// by a partition, its host gone): a connection silent for Time is pinged
// and closed when the ping is not answered within Timeout, which fails the
// calls waiting on it so that they can go to another member instead of
// hanging until the partition heals.
var ClientKeepalive = keepalive.ClientParameters{Time: 3 * time.Second, Timeout: 3 * time.Second}

// KeepaliveEnforcement lets clients ping as often as ClientKeepalive does;
// gRPC's default (5 minutes) would answer such pings with GOAWAY.
var KeepaliveEnforcement = keepalive.EnforcementPolicy{MinTime: time.Second, PermitWithoutStream: true}
