package pki

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"strings"
)

// Roles a member certificate can carry. Each gRPC service admits some of
// them; see docs/security.md.
const (
	RoleNode    = "node"
	RoleGateway = "gateway"
	RoleAdmin   = "admin"
)

// Roles lists the valid roles, in the order the CLI documents them.
var Roles = []string{RoleNode, RoleGateway, RoleAdmin}

// Errors of identity parsing and verification.
var (
	// ErrNoIdentity: the certificate carries no spiffe:// URI SAN.
	ErrNoIdentity = errors.New("certificate carries no Meridian identity (spiffe://<cluster-id>/<role>/<id> URI SAN)")
	// ErrBadIdentity: the URI is not of the form spiffe://<cluster-id>/<role>/<id>.
	ErrBadIdentity = errors.New("malformed Meridian identity")
	// ErrWrongCluster: the identity belongs to another cluster's trust domain.
	ErrWrongCluster = errors.New("certificate belongs to another cluster")
)

// idRE is the shape of cluster ids, node ids, gateway ids and admin names:
// the same rule node.Config applies to node ids.
var idRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// ValidID reports whether s can be a cluster id or a member id.
func ValidID(s string) bool { return idRE.MatchString(s) }

// ValidRole reports whether role is one of Roles.
func ValidRole(role string) bool {
	for _, r := range Roles {
		if r == role {
			return true
		}
	}
	return false
}

// Identity is who a certificate speaks for.
type Identity struct {
	Cluster string // the trust domain: the cluster id
	Role    string // RoleNode, RoleGateway or RoleAdmin
	ID      string // node id, gateway id or admin name
}

// URI is the identity as a SAN URI: spiffe://cluster/role/id.
func (id Identity) URI() *url.URL {
	return &url.URL{Scheme: "spiffe", Host: id.Cluster, Path: "/" + id.Role + "/" + id.ID}
}

func (id Identity) String() string { return id.URI().String() }

// Validate checks every part of the identity.
func (id Identity) Validate() error {
	switch {
	case !ValidID(id.Cluster):
		return fmt.Errorf("%w: cluster id %q: use 1-63 letters, digits, '.', '_' or '-'", ErrBadIdentity, id.Cluster)
	case !ValidRole(id.Role):
		return fmt.Errorf("%w: role %q: want one of %s", ErrBadIdentity, id.Role, strings.Join(Roles, ", "))
	case !ValidID(id.ID):
		return fmt.Errorf("%w: id %q: use 1-63 letters, digits, '.', '_' or '-'", ErrBadIdentity, id.ID)
	}
	return nil
}

// ParseIdentity parses spiffe://cluster/role/id.
func ParseIdentity(u *url.URL) (Identity, error) {
	if u.Scheme != "spiffe" {
		return Identity{}, fmt.Errorf("%w: %s is not a spiffe:// URI", ErrBadIdentity, u)
	}
	parts := strings.Split(strings.TrimPrefix(u.Path, "/"), "/")
	if len(parts) != 2 || u.RawQuery != "" || u.Fragment != "" || u.User != nil || u.Port() != "" {
		return Identity{}, fmt.Errorf("%w: %s: want spiffe://<cluster-id>/<role>/<id>", ErrBadIdentity, u)
	}
	id := Identity{Cluster: u.Host, Role: parts[0], ID: parts[1]}
	if err := id.Validate(); err != nil {
		return Identity{}, fmt.Errorf("%s: %w", u, err)
	}
	return id, nil
}

// IdentityOf returns the identity of a member certificate: its one
// spiffe:// URI SAN. A certificate with several is refused, so a peer
// cannot choose which identity it presents.
func IdentityOf(cert *x509.Certificate) (Identity, error) {
	var found []*url.URL
	for _, u := range cert.URIs {
		if u.Scheme == "spiffe" {
			found = append(found, u)
		}
	}
	switch len(found) {
	case 0:
		return Identity{}, ErrNoIdentity
	case 1:
		return ParseIdentity(found[0])
	default:
		return Identity{}, fmt.Errorf("%w: %d spiffe:// URIs, want one", ErrBadIdentity, len(found))
	}
}

// trustDomainOf returns the cluster id a CA certificate carries
// (spiffe://<cluster-id>), or "" when it has none.
func trustDomainOf(ca *x509.Certificate) string {
	for _, u := range ca.URIs {
		if u.Scheme == "spiffe" && (u.Path == "" || u.Path == "/") && ValidID(u.Host) {
			return u.Host
		}
	}
	return ""
}
