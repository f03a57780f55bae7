package chaos

import (
	"sort"
	"sync"
	"time"
)

// OpKind names what a recorded operation did.
type OpKind string

const (
	// OpPush is a complete image push: blobs, then a manifest under a tag.
	// Digest is the manifest digest, Blobs what it references.
	OpPush OpKind = "push"
	// OpMount pushes an image whose blobs were mounted from another
	// repository (From) instead of uploaded.
	OpMount OpKind = "mount"
	// OpPullManifest fetches a manifest by tag (Tag set) or by digest.
	// Digest is what was asked for or, by tag, what the tag's
	// acknowledged push set; Got is the sha256 of the bytes received.
	OpPullManifest OpKind = "pull-manifest"
	// OpPullBlob fetches a blob by digest; Got is the sha256 of the bytes.
	OpPullBlob OpKind = "pull-blob"
	// OpTagRead reads a mutable tag: Value is the digest it points at, ""
	// when the registry answered 404 (Outcome still OutcomeOK).
	OpTagRead OpKind = "tag-read"
	// OpTagWrite sets a mutable tag to Value, conditionally (Cond).
	OpTagWrite OpKind = "tag-write"
	// OpDelete deletes the manifest Digest from Repo.
	OpDelete OpKind = "delete"
	// OpDeleteBlob deletes the blob Digest from Repo (its link: the bytes
	// stay while another repository links them), after the manifest of
	// the image that used it was deleted. The registry refuses it (403)
	// while a manifest of Repo still references the blob.
	OpDeleteBlob OpKind = "delete-blob"
	// OpGC is one `meridian gc run` sent to the node Gateway names, with
	// Request its arguments and Detail what the run did. A run without an
	// answer (a fault) is unknown: some of its batches may have applied.
	OpGC OpKind = "gc"
	// OpRobotWrite is one write request (a blob upload or a manifest PUT)
	// the robot writer sent as User, a robot account: Request names it,
	// Outcome OK means the registry acknowledged it (2xx). The revocation
	// check judges these; the image they make up is also an OpPush.
	OpRobotWrite OpKind = "robot-write"
	// OpVerify is the check, after healing, of one acknowledged push:
	// Outcome OK means its tag still points at Digest and the manifest and
	// every blob pulled back with matching bytes.
	OpVerify OpKind = "verify"
)

// Outcome is what a client learned from an operation.
type Outcome string

const (
	// OutcomeOK: the registry acknowledged the operation (2xx), or a
	// read returned its answer.
	OutcomeOK Outcome = "ok"
	// OutcomeFail: the registry definitely did not apply it (a 4xx such
	// as 412 on a compare-and-swap that lost, or a verify that failed).
	OutcomeFail Outcome = "fail"
	// OutcomeUnknown: no definite answer (timeout, connection error, 5xx):
	// a write may or may not take effect, at any time after it started.
	OutcomeUnknown Outcome = "unknown"
	// OutcomeNotFound: a read answered 404.
	OutcomeNotFound Outcome = "not-found"
)

// Tag write conditions.
const (
	CondNone        = ""              // unconditional PUT
	CondIfMatch     = "if-match"      // If-Match: "<Expect>"
	CondIfNoneMatch = "if-none-match" // If-None-Match: * (create only)
)

// Blob is one blob of a pushed image.
type Blob struct {
	Digest string `json:"digest"`
	Size   int64  `json:"size"`
}

// Op is one client operation as the history records it. Times are offsets
// from the start of the run, so histories are comparable across runs.
type Op struct {
	ID     int           `json:"id"`
	Client int           `json:"client"`
	Kind   OpKind        `json:"kind"`
	Start  time.Duration `json:"start"`
	End    time.Duration `json:"end"`
	// Gateway is the gateway (or node) the request went through and
	// Consistency its read_consistency ("strong" or "local").
	Gateway     string `json:"gateway,omitempty"`
	Consistency string `json:"consistency,omitempty"`

	Repo   string `json:"repo"`
	Tag    string `json:"tag,omitempty"`
	Digest string `json:"digest,omitempty"`
	Blobs  []Blob `json:"blobs,omitempty"`
	From   string `json:"from,omitempty"` // OpMount: the source repository

	// User is the account the operation was sent as when it was not the
	// workload's admin: a robot's login, robot+NAME.
	User string `json:"user,omitempty"`
	// Request is an OpRobotWrite's method and path, an OpGC's arguments.
	Request string `json:"request,omitempty"`
	// Detail is what an OpGC's run collected.
	Detail string `json:"detail,omitempty"`

	Cond   string `json:"cond,omitempty"`   // OpTagWrite
	Expect string `json:"expect,omitempty"` // OpTagWrite with CondIfMatch
	Value  string `json:"value,omitempty"`  // OpTagWrite: written; OpTagRead: read

	Got     string  `json:"got,omitempty"` // sha256 of the bytes a pull received
	Outcome Outcome `json:"outcome"`
	Status  int     `json:"status,omitempty"` // last HTTP status seen
	Err     string  `json:"err,omitempty"`
}

// History collects operations from concurrent clients.
type History struct {
	mu    sync.Mutex
	base  time.Time
	ops   []Op
	nextI int
}

// NewHistory starts a history whose times count from now.
func NewHistory() *History { return &History{base: time.Now()} }

// Now is the offset of this instant from the history's start.
func (h *History) Now() time.Duration { return time.Since(h.base) }

// Base is the wall-clock instant offsets count from.
func (h *History) Base() time.Time { return h.base }

// Add records op, giving it the next id, and returns the id.
func (h *History) Add(op Op) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	op.ID = h.nextI
	h.nextI++
	h.ops = append(h.ops, op)
	return op.ID
}

// Ops returns a copy of the operations sorted by start time.
func (h *History) Ops() []Op {
	h.mu.Lock()
	ops := append([]Op(nil), h.ops...)
	h.mu.Unlock()
	sort.SliceStable(ops, func(i, j int) bool { return ops[i].Start < ops[j].Start })
	return ops
}

// Fault is one injected fault as the report lists it.
type Fault struct {
	Kind   string        `json:"kind"`   // one of FaultKinds
	Target string        `json:"target"` // node, gateway, region or "a,b|c" for a partition
	Start  time.Duration `json:"start"`
	End    time.Duration `json:"end"` // when it was healed; 0 if it was a one-shot
	Detail string        `json:"detail,omitempty"`
	// Leader: the node acted on was the Raft leader when the fault began.
	Leader bool `json:"leader,omitempty"`
	// Error says why the fault could not be injected; such a fault did
	// not happen and counts for no quota.
	Error string `json:"error,omitempty"`
	// Failure says what the fault's own check found wrong: a certificate
	// re-issued in place that the process did not serve in time
	// (CheckCertRotations). Such a fault was injected and counts.
	Failure string `json:"failure,omitempty"`
	// Revoked is when a revoke fault's `meridian robot revoke` returned:
	// from revokeGrace later on, no write of the robot (Target) may be
	// acknowledged (CheckRevocations).
	Revoked time.Duration `json:"revoked,omitempty"`
}

// RegionLag is a region's replication backlog as `meridian cluster status`
// reports it.
type RegionLag struct {
	Region       string `json:"region"`
	MissingBlobs int64  `json:"missing_blobs"`
	MissingBytes int64  `json:"missing_bytes"`
}

// Convergence is the state of the cluster after healing: whether every
// node reached the same applied index and state digest and every region
// holds every blob its policy names, and how long that took.
type Convergence struct {
	Converged bool          `json:"converged"`
	Took      time.Duration `json:"took"`
	Applied   uint64        `json:"applied_index"`
	Digest    string        `json:"state_digest"` // hex, at Applied
	Regions   []RegionLag   `json:"regions"`
	// Detail says what differed when Converged is false.
	Detail string `json:"detail,omitempty"`
}
