// Package pki holds Meridian's cluster certificates: the cluster CA that
// `meridian ca init` creates, the member certificates `meridian ca issue`
// signs for nodes, gateways and admins, and the identity a certificate
// carries.
//
// A member's identity is one URI SAN, spiffe://<cluster-id>/<role>/<id>:
// the trust domain is the cluster id (the CA carries spiffe://<cluster-id>),
// the role is node, gateway or admin, and the id is the member's node id,
// gateway id or admin name. Peers are verified against the CA pool and then
// by that identity, never by host name, so member certificates need no DNS
// or IP names unless they also serve HTTPS to registry clients.
//
// Source keeps a process's CA pool, certificate and key current: it
// re-reads the files when they change, so rotating a certificate (or, with
// two CAs in the CA file, the CA itself) needs no restart. Certificates
// from another PKI (cert-manager, Vault) work the same way as long as they
// carry the identity URI.
package pki
