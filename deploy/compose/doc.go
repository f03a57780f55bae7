// Package compose holds the test of deploy/compose/compose.yaml: Meridian
// in three regions on one machine with docker compose (three S3 servers,
// five nodes placed 2/2/1, two gateways, mutual TLS and encrypted gossip).
// TestComposeThreeRegions starts it with docker-compose, pushes and pulls
// with the docker CLI, takes a whole region down and brings it back; it
// runs under MERIDIAN_COMPOSE=1 (make compose-test). The package has no
// other code: the deployment is the YAML next to it.
package compose
