package transport

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meridian-registry/meridian/node/pki"
)

// HandshakeTimeout bounds a TLS handshake on the Raft port, so a client
// that connects and says nothing does not hold a goroutine for long.
const HandshakeTimeout = 10 * time.Second

// Trust is a process's standing in the cluster: its member identity, or
// nothing (plaintext). The zero value and nil are plaintext.
type Trust struct {
	Source *pki.Source
}

// Secure reports whether members are reached over mutual TLS.
func (t *Trust) Secure() bool { return t != nil && t.Source != nil }

// Identity is this process's identity; the zero Identity in plaintext.
func (t *Trust) Identity() pki.Identity {
	if !t.Secure() {
		return pki.Identity{}
	}
	return t.Source.Identity()
}

// onlyNodes admits node certificates: Raft is between nodes only.
func onlyNodes(id pki.Identity) error {
	if id.Role != pki.RoleNode {
		return fmt.Errorf("%s: only nodes may connect here", id)
	}
	return nil
}

// RaftListener wraps ln so every Raft connection is mutual TLS with a node
// certificate of this cluster; plaintext leaves ln as it is. A connection
// that fails the handshake is closed on its first read, before Raft sees a
// byte of it.
func (t *Trust) RaftListener(ln net.Listener) net.Listener {
	if !t.Secure() {
		return ln
	}
	return &tlsListener{Listener: ln, cfg: t.Source.ServerConfig(onlyNodes)}
}

// RaftDial returns Raft's dialer: base (nil: a plain TCP dial) wrapped in
// a TLS handshake that expects a node of this cluster.
func (t *Trust) RaftDial(base func(ctx context.Context, addr string) (net.Conn, error)) func(addr string, timeout time.Duration) (net.Conn, error) {
	if base == nil {
		var d net.Dialer
		base = func(ctx context.Context, addr string) (net.Conn, error) { return d.DialContext(ctx, "tcp", addr) }
	}
	return func(addr string, timeout time.Duration) (net.Conn, error) {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		conn, err := base(ctx, addr)
		if err != nil || !t.Secure() {
			return conn, err
		}
		tc := tls.Client(conn, t.Source.ClientConfig(onlyNodes))
		if err := tc.HandshakeContext(ctx); err != nil {
			conn.Close()
			return nil, fmt.Errorf("raft TLS handshake with %s: %w", addr, err)
		}
		return tc, nil
	}
}

type tlsListener struct {
	net.Listener
	cfg *tls.Config
}

func (l *tlsListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &serverConn{Conn: tls.Server(c, l.cfg)}, nil
}

// serverConn runs the handshake, bounded by HandshakeTimeout, on the first
// read or write: the accept loop hands connections off at once, so a slow
// client never stalls it.
type serverConn struct {
	*tls.Conn
	once sync.Once
	err  error
}

func (c *serverConn) handshake() error {
	c.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), HandshakeTimeout)
		defer cancel()
		if c.err = c.Conn.HandshakeContext(ctx); c.err != nil {
			c.Conn.Close()
		}
	})
	return c.err
}

func (c *serverConn) Read(b []byte) (int, error) {
	if err := c.handshake(); err != nil {
		return 0, err
	}
	return c.Conn.Read(b)
}

func (c *serverConn) Write(b []byte) (int, error) {
	if err := c.handshake(); err != nil {
		return 0, err
	}
	return c.Conn.Write(b)
}

// ServerCredentials are the gRPC server's transport credentials: TLS
// admitting any role of this cluster, and clients without a certificate
// (each call is then checked against an Access table, which admits those
// to the methods that take credentials only), or plaintext.
func (t *Trust) ServerCredentials() grpc.ServerOption {
	if !t.Secure() {
		return grpc.Creds(insecure.NewCredentials())
	}
	return grpc.Creds(credentials.NewTLS(t.Source.ServerConfigCertOptional(nil, "h2")))
}

// DialCredentials are the gRPC client's transport credentials for calling
// nodes: mutual TLS expecting a node of this cluster, or plaintext.
func (t *Trust) DialCredentials() grpc.DialOption {
	if !t.Secure() {
		return grpc.WithTransportCredentials(insecure.NewCredentials())
	}
	return grpc.WithTransportCredentials(credentials.NewTLS(t.Source.ClientConfig(onlyNodes, "h2")))
}

// ErrInsecureListener: a listener that is not loopback would run without
// cluster TLS or gossip encryption.
var ErrInsecureListener = errors.New("refusing to listen beyond loopback without cluster TLS and a gossip key")

// CheckListeners refuses member listeners (gRPC, Raft, gossip: name to
// host:port) that are not loopback when cluster TLS or the gossip key is
// missing, unless insecureOK (--insecure-cluster). Ports reachable from
// other hosts must not trust whoever connects.
func CheckListeners(listeners map[string]string, tlsOn, gossipKeyOn, insecureOK bool) error {
	if (tlsOn && gossipKeyOn) || insecureOK {
		return nil
	}
	var open []string
	for name, addr := range listeners {
		if addr == "" || !isLoopback(addr) {
			open = append(open, fmt.Sprintf("%s %q", name, addr))
		}
	}
	if len(open) == 0 {
		return nil
	}
	var missing []string
	if !tlsOn {
		missing = append(missing, "--tls-ca/--tls-cert/--tls-key")
	}
	if !gossipKeyOn {
		missing = append(missing, "--gossip-key-file")
	}
	return fmt.Errorf("%w: %s (set %s, see docs/security.md, or accept the risk with --insecure-cluster)",
		ErrInsecureListener, strings.Join(slices.Sorted(slices.Values(open)), ", "), strings.Join(missing, " and "))
}

// isLoopback reports whether host:port binds only loopback: a loopback
// IP or "localhost". An empty host binds every interface.
func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// VerifyNode proves that the node at a Raft address is the member id: it
// completes a mutual TLS handshake there and finds id, role node, in the
// certificate. A leader calls it before it puts an address into the Raft
// configuration, so a member cannot claim another's id in gossip. In
// plaintext there is nothing to check.
func (t *Trust) VerifyNode(ctx context.Context, dial func(ctx context.Context, addr string) (net.Conn, error), addr, id string) error {
	if !t.Secure() {
		return nil
	}
	if dial == nil {
		var d net.Dialer
		dial = func(ctx context.Context, addr string) (net.Conn, error) { return d.DialContext(ctx, "tcp", addr) }
	}
	conn, err := dial(ctx, addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	tc := tls.Client(conn, t.Source.ClientConfig(func(got pki.Identity) error {
		if got.Role != pki.RoleNode || got.ID != id {
			return fmt.Errorf("the certificate at %s is %s, not node %s", addr, got, id)
		}
		return nil
	}))
	return tc.HandshakeContext(ctx)
}

// WriteReadyFile writes v as indented JSON to path through a temporary
// file and a rename, so a script polling the file never reads half of it.
// Nodes and gateways write their actual addresses there once they serve.
func WriteReadyFile(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("ready file: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("ready file: %w", err)
	}
	return nil
}
