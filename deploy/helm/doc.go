// Package helm holds the tests of the Meridian Helm chart in
// deploy/helm/meridian: they render it with `helm template` for every
// values file it ships, decode every object strictly into the Kubernetes API
// types, and check what must agree across objects (ports between the
// members' config files, containers, Services, probes and NetworkPolicies;
// a PodDisruptionBudget per workload; voters spread so that no region holds
// a quorum's deciding share; no secret material rendered from values; the
// hardened pod security settings). The package has no code of its own.
package helm
