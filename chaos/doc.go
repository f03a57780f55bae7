// Package chaos drives a real multi-region Meridian cluster through faults
// while clients work, then checks every promise the registry makes.
//
// The harness drives only the meridian binary and its public interfaces:
// processes started with --ready-file, the OCI API on /v2/, `meridian ca`,
// `meridian cluster status --json`, `meridian robot` and `meridian gc`;
// after the run it reads the regions' stores through the registry's own
// drivers (replication.OpenStore). It makes the run's cluster CA and
// a certificate for every member and for itself (members run mutual TLS
// on gRPC and Raft and encrypted gossip), starts versitygw S3 servers behind
// an HTTP fault proxy of its own, puts a TCP fault proxy in front of each
// node's gRPC and Raft ports (through --advertise-grpc/--advertise-raft),
// runs a seeded concurrent workload through two gateways (logged in as the
// first admin, and a stream of pushes as a robot; images share layers from
// a small pool, and whole images are deleted), collects garbage with a
// short grace every few seconds, injects faults on a seeded schedule that
// cycles through every kind (kill -9 of the leader and restart, SIGSTOP,
// partitions, latency, S3 errors, stalls and outages, a gateway killed
// mid-upload, a node's certificate re-issued in place, the robot revoked
// mid-write, the gossip key rotated online and a node restarted from its
// rewritten key file), heals, and checks:
//
//   - every acknowledged push that was not deleted pulls back byte for byte;
//   - no pull returned bytes that do not match the requested digest;
//   - tag histories read through a strong gateway are linearizable
//     (porcupine, each tag a compare-and-swap register);
//   - no 404 through a local gateway for content acknowledged before the
//     read began;
//   - every certificate re-issued in place was served by its node within
//     10 s, without a restart;
//   - no write of a revoked robot sent more than a second after its
//     revocation returned was acknowledged;
//   - every online gossip key rotation completed, every member rewrote
//     its key file to the new key, and a node restarted from its file
//     and another saw every member alive in gossip;
//   - after healing every node reaches the same applied index and state
//     digest, and no region misses a blob its policy names;
//   - after a last garbage collection whose removals every region
//     finished, every blob of every live manifest is in the store of
//     every region its policy names, with the right bytes.
//
// A run passes only if every check decided with something to check and
// every fault kind the schedule promised was injected (Report).
//
// Everything runs on loopback and every run stops by itself. The seed
// reproduces the workload and the fault schedule (timing still varies).
package chaos
