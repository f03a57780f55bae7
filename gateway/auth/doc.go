// Package auth authenticates and authorizes the callers of Meridian's OCI
// API on any node or gateway, without asking another member: it holds the
// access state (users with bcrypt hashes, teams, robots with hashed
// secrets, grants, token signing keys) that the cluster replicates through
// Raft, and a member swaps in a new copy whenever the state changes.
//
// Callers authenticate with HTTP Basic (users, and robots as
// "robot+NAME"), with a registry token from /auth/token (the Docker
// distribution token flow: ES256 JWTs signed by a key of the cluster's
// ring, named by kid), or with a token of an external issuer whose keys
// come from a JWKS file. What a token's access claim grants is checked
// again against the current grants on every request, so a revocation
// holds as soon as the member has the new state, not when the token
// expires.
package auth
