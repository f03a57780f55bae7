package membership

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"time"

	"github.com/hashicorp/memberlist"
)

// DefaultPort is the default gossip port (UDP and TCP).
const DefaultPort = 5003

// DefaultClusterID is the cluster id used when none is configured.
const DefaultClusterID = "meridian"

const (
	defaultForget      = 24 * time.Hour
	defaultEventBuffer = 1024
)

// Config configures a Membership. Zero values take defaults; see DefaultConfig.
type Config struct {
	// Meta is what this member advertises. ID, ClusterID and Role are
	// required; Version zero means ProtocolVersion.
	Meta Meta
	// BindAddr is the host:port gossip listens on, UDP and TCP on the same
	// port. The host must be an IP address; an empty host means all
	// interfaces. Port 0 picks a free port (see Membership.Addr).
	BindAddr string
	// AdvertiseAddr is the IP:port other members use to reach this one.
	// Empty means the bind address, which then must name a specific IP.
	// Port 0 means the bound port.
	AdvertiseAddr string
	// Timings tune failure detection and gossip; zero fields take
	// LANTimings values.
	Timings Timings
	// Forget is how long a dead or left member stays in Members; zero
	// means 24h.
	Forget time.Duration
	// EventBuffer is the capacity of the Events channel; zero means 1024.
	EventBuffer int
	// Logger receives this package's and memberlist's logs; nil means
	// slog.Default().
	Logger *slog.Logger
	// Keys encrypt gossip (AES-GCM; 16, 24 or 32 bytes each), Keys[0]
	// the primary; see keyring.go. Without keys gossip is plaintext and
	// anyone who reaches the port can read metadata and join.
	Keys [][]byte
	// OnKeysChanged, when set, is called with the keyring (primary first)
	// after every change, so the process can write its key file: a member
	// restarted later must come back with the keys the cluster uses now.
	OnKeysChanged func(keys [][]byte) error
}

// DefaultConfig returns a configuration for a server node of the default
// cluster listening on all interfaces at DefaultPort. Meta.ID and
// AdvertiseAddr must still be filled in.
func DefaultConfig() Config {
	return Config{
		Meta:        Meta{ClusterID: DefaultClusterID, Role: RoleServer, Version: ProtocolVersion},
		BindAddr:    net.JoinHostPort("0.0.0.0", strconv.Itoa(DefaultPort)),
		Timings:     LANTimings(),
		Forget:      defaultForget,
		EventBuffer: defaultEventBuffer,
	}
}

// Timings tune memberlist's failure detector and gossip. A member is
// declared dead roughly ProbeInterval + SuspicionMult*max(1, log10(N))*
// ProbeInterval after it stops answering, N being the cluster size.
type Timings struct {
	// ProbeInterval is the time between probes of a random member.
	ProbeInterval time.Duration
	// ProbeTimeout is how long to wait for a probe's ack; keep it above
	// the worst round-trip time between any two members.
	ProbeTimeout time.Duration
	// SuspicionMult scales how long a suspect member may refute before it
	// is declared dead.
	SuspicionMult int
	// GossipInterval is the time between gossip rounds.
	GossipInterval time.Duration
	// PushPullInterval is the time between full state exchanges with a
	// random member.
	PushPullInterval time.Duration
	// TCPTimeout bounds stream connections, including each join attempt.
	TCPTimeout time.Duration
}

func timingsOf(c *memberlist.Config) Timings {
	return Timings{
		ProbeInterval:    c.ProbeInterval,
		ProbeTimeout:     c.ProbeTimeout,
		SuspicionMult:    c.SuspicionMult,
		GossipInterval:   c.GossipInterval,
		PushPullInterval: c.PushPullInterval,
		TCPTimeout:       c.TCPTimeout,
	}
}

// LANTimings are memberlist's DefaultLANConfig timings, for members in one
// data centre.
func LANTimings() Timings { return timingsOf(memberlist.DefaultLANConfig()) }

// WANTimings are memberlist's DefaultWANConfig timings, for clusters whose
// members are in several regions (probe timeout 3s).
func WANTimings() Timings { return timingsOf(memberlist.DefaultWANConfig()) }

// LocalTimings are memberlist's DefaultLocalConfig timings, for members on
// one machine (loopback), such as tests.
func LocalTimings() Timings { return timingsOf(memberlist.DefaultLocalConfig()) }

// withDefaults fills zero fields from LANTimings.
func (t Timings) withDefaults() Timings {
	d := LANTimings()
	if t.ProbeInterval == 0 {
		t.ProbeInterval = d.ProbeInterval
	}
	if t.ProbeTimeout == 0 {
		t.ProbeTimeout = d.ProbeTimeout
	}
	if t.SuspicionMult == 0 {
		t.SuspicionMult = d.SuspicionMult
	}
	if t.GossipInterval == 0 {
		t.GossipInterval = d.GossipInterval
	}
	if t.PushPullInterval == 0 {
		t.PushPullInterval = d.PushPullInterval
	}
	if t.TCPTimeout == 0 {
		t.TCPTimeout = d.TCPTimeout
	}
	return t
}

func (t Timings) validate() error {
	if t.ProbeInterval < 0 || t.ProbeTimeout < 0 || t.SuspicionMult < 0 ||
		t.GossipInterval < 0 || t.PushPullInterval < 0 || t.TCPTimeout < 0 {
		return errors.New("membership: timings must not be negative")
	}
	return nil
}

// endpoint is a parsed host:port whose host is an IP literal or empty.
type endpoint struct {
	ip   net.IP // nil when the host is empty
	port int
}

func parseEndpoint(what, s string) (endpoint, error) {
	host, portStr, err := net.SplitHostPort(s)
	if err != nil {
		return endpoint{}, fmt.Errorf("membership: %s %q: %w", what, s, err)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return endpoint{}, fmt.Errorf("membership: %s %q: invalid port", what, s)
	}
	e := endpoint{port: int(port)}
	if host != "" {
		if e.ip = net.ParseIP(host); e.ip == nil {
			return endpoint{}, fmt.Errorf("membership: %s %q: host must be an IP address, not a name", what, s)
		}
	}
	return e, nil
}

// Validate checks the configuration without doing any I/O.
func (c Config) Validate() error {
	meta := c.Meta
	if meta.Version == 0 {
		meta.Version = ProtocolVersion
	}
	if err := validateMeta(meta); err != nil {
		return err
	}
	if err := c.Timings.validate(); err != nil {
		return err
	}
	for _, k := range c.Keys {
		if err := checkKey(k); err != nil {
			return err
		}
	}
	if c.Forget < 0 || c.EventBuffer < 0 {
		return errors.New("membership: Forget and EventBuffer must not be negative")
	}
	bind, err := parseEndpoint("bind address", c.BindAddr)
	if err != nil {
		return err
	}
	if c.AdvertiseAddr == "" {
		if bind.ip == nil || bind.ip.IsUnspecified() {
			return fmt.Errorf("membership: bind address %q does not name one IP: set the advertise address (host:port other members can reach)", c.BindAddr)
		}
		return nil
	}
	adv, err := parseEndpoint("advertise address", c.AdvertiseAddr)
	if err != nil {
		return err
	}
	if adv.ip == nil || adv.ip.IsUnspecified() {
		return fmt.Errorf("membership: advertise address %q must name an IP other members can reach", c.AdvertiseAddr)
	}
	if bind.port == 0 && adv.port != 0 {
		return fmt.Errorf("membership: advertise address %q has a fixed port but the bind port is 0; use port 0 in both or fix the bind port", c.AdvertiseAddr)
	}
	return nil
}

// memberlistConfig builds memberlist's configuration; c has been validated
// and defaulted by New.
func (c Config) memberlistConfig(d delegate, ring *memberlist.Keyring, logger *slog.Logger) *memberlist.Config {
	mc := memberlist.DefaultLANConfig()
	mc.Name = c.Meta.ID
	// With a keyring memberlist seals everything it sends and drops what
	// it cannot open (GossipVerifyIncoming/Outgoing stay at their default,
	// true).
	mc.Keyring = ring

	bind, _ := parseEndpoint("bind address", c.BindAddr)
	mc.BindAddr, mc.BindPort = "0.0.0.0", bind.port
	if bind.ip != nil {
		mc.BindAddr = bind.ip.String()
	}
	if c.AdvertiseAddr != "" {
		adv, _ := parseEndpoint("advertise address", c.AdvertiseAddr)
		mc.AdvertiseAddr, mc.AdvertisePort = adv.ip.String(), adv.port
		if adv.port == 0 {
			// With a fixed bind port memberlist would otherwise advertise
			// its default port; with port 0 it advertises the bound port.
			mc.AdvertisePort = bind.port
		}
	}

	t := c.Timings
	mc.ProbeInterval, mc.ProbeTimeout, mc.SuspicionMult = t.ProbeInterval, t.ProbeTimeout, t.SuspicionMult
	mc.GossipInterval, mc.PushPullInterval, mc.TCPTimeout = t.GossipInterval, t.PushPullInterval, t.TCPTimeout

	// A dead member's ID may be taken at once by a process at another
	// address: that is a restart on a new port. An alive member's ID is
	// never taken over (memberlist reports a conflict instead).
	mc.DeadNodeReclaimTime = time.Nanosecond

	mc.Delegate, mc.Events, mc.Merge, mc.Alive, mc.Conflict = d, d, d, d, d
	mc.Logger = memberlistLogger(logger.With("lib", "memberlist"))
	return mc
}
