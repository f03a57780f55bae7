package chaos

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// WorkloadConfig sets the mix of concurrent clients. Every client draws its
// choices from its own generator seeded with (Seed, client number), so a
// seed reproduces what each client does, if not the interleaving.
type WorkloadConfig struct {
	Seed     uint64
	Gateways []Endpoint
	// Pushers push complete images of small random blobs under unique tags
	// (a share of them into "critical/" repositories, whose policy asks
	// for two regions before a push is acknowledged).
	Pushers int
	// Uploaders push images with one large blob uploaded in chunks that
	// alternate between the gateways.
	Uploaders int
	// Pullers pull acknowledged images by tag and by digest.
	Pullers int
	// Taggers read and compare-and-swap the shared mutable tags.
	Taggers int
	// Movers mount blobs across repositories and delete whole images
	// (see Workload.deleteOne), one operation in DeleteOneIn.
	Movers      int
	DeleteOneIn int
	// SharedLayers is the size of a pool of layers that a quarter of the
	// pushers' and the robot writer's layers come from (0: none), so that
	// images in many repositories share blobs: deletes and garbage
	// collection then unlink blobs that other images, and pushes in
	// flight, still use.
	SharedLayers int
	// TagSlots is how many mutable tags exist at once; a tag is retired for
	// a fresh one after TagGeneration operations or a few writes of unknown
	// outcome, which keeps each tag's history small enough to check.
	TagSlots, TagGeneration int
	// ChunkedBlobSize is the size of an uploader's blob, and UploadPause
	// the pause between an uploader's pushes (which keeps the bytes a long
	// run writes within a disk's means).
	ChunkedBlobSize int
	UploadPause     time.Duration
	// Think is the pause between a client's operations, so that a 2-core
	// machine keeps serving its nodes.
	Think time.Duration
	// RobotWriters push small images into RobotRepoPrefix repositories
	// as the robot account Robot names at the start of each push, one
	// push every RobotPause; every write request they send is recorded
	// (OpRobotWrite), so that the revocation check can tell which were
	// acknowledged after the robot was revoked.
	RobotWriters int
	Robot        func() Credentials
	RobotPause   time.Duration
	// Admin is the login of every other request.
	Admin Credentials
	// RequestTimeout bounds each HTTP request.
	RequestTimeout time.Duration
	// Live, when set, hears of suspect results as they happen (bytes that
	// do not match their digest, a 404 for an acknowledged push); the
	// checkers give the verdict after the run.
	Live func(format string, args ...any)
}

// Workload runs the clients and records every operation in a History.
type Workload struct {
	cfg    WorkloadConfig
	h      *History
	client *registryClient

	mu      sync.Mutex
	acked   []image // acknowledged pushes still pullable
	deleted map[string]bool

	values []image // manifests the mutable tags point at
	slots  []*tagSlot
	shared [][]byte // the layer pool (WorkloadConfig.SharedLayers)

	stop <-chan struct{} // closed when clients start no new operations
}

// image is one pushed image.
type image struct {
	repo, tag, digest string
	blobs             []Blob
}

// tagSlot is one mutable tag, renamed every generation.
type tagSlot struct {
	mu      sync.Mutex
	slot    int
	gen     int
	ops     int
	unknown int
	last    string // last value any client saw or set; "" absent
}

const mutableRepo = "chaos/mutable"

// RobotRepoPrefix is where the robot writers push, and what their robot
// accounts may push to.
const RobotRepoPrefix = "robot"

// sender is who a request goes out as: nil is the workload's admin;
// otherwise robot writer client, logged in as cred, each of whose write
// requests is recorded (OpRobotWrite).
type sender struct {
	client int
	cred   Credentials
}

// NewWorkload prepares a workload recording into h.
func NewWorkload(cfg WorkloadConfig, h *History) *Workload {
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = 20 * time.Second
	}
	if cfg.TagGeneration <= 0 {
		cfg.TagGeneration = 150
	}
	if cfg.RobotPause <= 0 {
		cfg.RobotPause = 250 * time.Millisecond
	}
	if cfg.DeleteOneIn <= 0 {
		cfg.DeleteOneIn = 6
	}
	w := &Workload{cfg: cfg, h: h, client: newRegistryClient(cfg.RequestTimeout, cfg.Admin), deleted: map[string]bool{}}
	for i := range cfg.TagSlots {
		w.slots = append(w.slots, &tagSlot{slot: i})
	}
	rng := rand.New(rand.NewPCG(cfg.Seed, 0x54a7ed))
	for range cfg.SharedLayers {
		w.shared = append(w.shared, randomBytes(rng, 512+rng.IntN(32<<10)))
	}
	return w
}

// Setup pushes the manifests the mutable tags will point at. It retries
// until they are all acknowledged or ctx ends.
func (w *Workload) Setup(ctx context.Context) error {
	rng := rand.New(rand.NewPCG(w.cfg.Seed, 1<<32))
	for i := range 4 {
		for attempt := 0; ; attempt++ {
			img, err := w.pushImage(ctx, -1, nil, rng, mutableRepo, fmt.Sprintf("value%d", i), 1, false)
			if err == nil {
				w.values = append(w.values, img)
				break
			}
			if ctx.Err() != nil {
				return fmt.Errorf("pushing mutable tag value %d: %w", i, err)
			}
			time.Sleep(time.Second)
		}
	}
	return nil
}

// Run starts every client, stops them from starting new operations after
// d, and returns when the operations in flight have finished (their
// requests end with ctx, or their own timeouts).
func (w *Workload) Run(ctx context.Context, d time.Duration) {
	stop := make(chan struct{})
	timer := time.AfterFunc(d, func() { close(stop) })
	defer timer.Stop()
	w.stop = stop
	var wg sync.WaitGroup
	client := 0
	spawn := func(n int, f func(ctx context.Context, id int, rng *rand.Rand)) {
		for range n {
			id := client
			client++
			rng := rand.New(rand.NewPCG(w.cfg.Seed, uint64(id)))
			wg.Go(func() { f(ctx, id, rng) })
		}
	}
	spawn(w.cfg.Pushers, w.pusher)
	spawn(w.cfg.Uploaders, w.uploader)
	spawn(w.cfg.Pullers, w.puller)
	spawn(w.cfg.Taggers, w.tagger)
	spawn(w.cfg.Movers, w.mover)
	if w.cfg.Robot != nil {
		spawn(w.cfg.RobotWriters, w.robotWriter)
	}
	wg.Wait()
}

// think pauses between a client's operations and says whether to go on.
func (w *Workload) think(ctx context.Context, rng *rand.Rand) bool {
	d := w.cfg.Think/2 + time.Duration(rng.Int64N(int64(w.cfg.Think)+1))
	select {
	case <-ctx.Done():
		return false
	case <-w.stop:
		return false
	case <-time.After(d):
		return true
	}
}

// pause waits d unless the workload stops first.
func (w *Workload) pause(ctx context.Context, d time.Duration) bool {
	select {
	case <-ctx.Done():
		return false
	case <-w.stop:
		return false
	case <-time.After(d):
		return true
	}
}

func (w *Workload) gateway(rng *rand.Rand) Endpoint {
	return w.cfg.Gateways[rng.IntN(len(w.cfg.Gateways))]
}

func (w *Workload) other(gw Endpoint) Endpoint {
	for _, g := range w.cfg.Gateways {
		if g.ID != gw.ID {
			return g
		}
	}
	return gw
}

// pusher pushes images of 1–3 small blobs plus a config under unique tags.
func (w *Workload) pusher(ctx context.Context, id int, rng *rand.Rand) {
	for k := 0; w.think(ctx, rng); k++ {
		repo := fmt.Sprintf("chaos/app%d", id)
		if rng.IntN(5) == 0 {
			repo = fmt.Sprintf("critical/app%d", id)
		}
		img, err := w.pushImage(ctx, id, nil, rng, repo, fmt.Sprintf("v%d", k), 1+rng.IntN(3), false)
		if err == nil {
			w.addAcked(img)
		}
	}
}

// uploader pushes images with one large blob sent in chunks that alternate
// between the gateways, continuing on the other gateway when one fails.
func (w *Workload) uploader(ctx context.Context, id int, rng *rand.Rand) {
	for k := 0; w.think(ctx, rng); k++ {
		if k > 0 && !w.pause(ctx, w.cfg.UploadPause) {
			return
		}
		img, err := w.pushImage(ctx, id, nil, rng, fmt.Sprintf("chaos/big%d", id), fmt.Sprintf("v%d", k), 1, true)
		if err == nil {
			w.addAcked(img)
		}
	}
}

func (w *Workload) addAcked(img image) {
	w.mu.Lock()
	w.acked = append(w.acked, img)
	w.mu.Unlock()
}

// pick returns an acknowledged image, recent ones more often, or false.
func (w *Workload) pick(rng *rand.Rand) (image, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := len(w.acked)
	if n == 0 {
		return image{}, false
	}
	if rng.IntN(2) == 0 {
		return w.acked[n-1-rng.IntN(min(n, 20))], true
	}
	return w.acked[rng.IntN(n)], true
}

// robotWriter pushes small images as the robot of the moment, which the
// revoke fault revokes and replaces: after a revocation its pushes are
// refused until the next robot comes.
func (w *Workload) robotWriter(ctx context.Context, id int, rng *rand.Rand) {
	repo := fmt.Sprintf("%s/app%d", RobotRepoPrefix, id)
	for k := 0; w.pause(ctx, w.cfg.RobotPause/2+time.Duration(rng.Int64N(int64(w.cfg.RobotPause)+1))); k++ {
		as := &sender{client: id, cred: w.cfg.Robot()}
		if as.cred.User == "" {
			continue // no robot yet
		}
		img, err := w.pushImage(ctx, id, as, rng, repo, fmt.Sprintf("v%d", k), 1, false)
		if err == nil {
			w.addAcked(img)
		}
	}
}

// send sends one request as as (see sender).
func (w *Workload) send(ctx context.Context, as *sender, gw Endpoint, repo, method, path string, hdr http.Header, body []byte) (reply, error) {
	if as == nil {
		return w.client.do(ctx, gw, method, path, hdr, body)
	}
	h := http.Header{"Authorization": {basicAuth(as.cred)}}
	for k, v := range hdr {
		h[k] = v
	}
	op := Op{Client: as.client, Kind: OpRobotWrite, Gateway: gw.ID, Consistency: gw.ReadConsistency, Repo: repo,
		User: as.cred.User, Request: method + " " + path, Start: w.h.Now()}
	r, err := w.client.do(ctx, gw, method, path, h, body)
	op.End, op.Status = w.h.Now(), r.status
	op.Outcome, op.Err = outcomeOf(r, err), errText(r, err)
	w.h.Add(op)
	return r, err
}

// pushImage uploads blobs and a config, then puts the manifest under tag
// and records one OpPush, all as as (nil: the admin). Its error says
// whether the push was acknowledged.
func (w *Workload) pushImage(ctx context.Context, id int, as *sender, rng *rand.Rand, repo, tag string, layers int, chunked bool) (image, error) {
	op := Op{Client: id, Kind: OpPush, Repo: repo, Tag: tag, Start: w.h.Now()}
	if as != nil {
		op.User = as.cred.User
	}
	gw := w.gateway(rng)
	fail := func(outcome Outcome, status int, msg string) (image, error) {
		op.End, op.Outcome, op.Status, op.Err = w.h.Now(), outcome, status, msg
		w.h.Add(op)
		return image{}, fmt.Errorf("%s", msg)
	}
	var blobs []Blob
	for i := range layers {
		var data []byte
		switch {
		case chunked:
			data = randomBytes(rng, w.cfg.ChunkedBlobSize)
		case len(w.shared) > 0 && rng.IntN(4) == 0:
			data = w.shared[rng.IntN(len(w.shared))]
		default:
			size := 256 + rng.IntN(64<<10)
			if rng.IntN(20) == 0 {
				size = 1<<20 + rng.IntN(1<<20)
			}
			data = randomBytes(rng, size)
		}
		b := Blob{Digest: sha256Digest(data), Size: int64(len(data))}
		if slices.ContainsFunc(blobs, func(o Blob) bool { return o.Digest == b.Digest }) {
			continue // a pool layer drawn twice
		}
		var err error
		if chunked && i == 0 {
			gw, err = w.uploadChunked(ctx, as, rng, gw, repo, data, b.Digest)
		} else {
			gw, err = w.uploadMonolithic(ctx, as, gw, repo, data, b.Digest)
		}
		if err != nil {
			return fail(OutcomeFail, 0, fmt.Sprintf("blob %d: %v", i, err))
		}
		blobs = append(blobs, b)
	}
	cfgBytes, _ := json.Marshal(map[string]any{
		"architecture": "amd64", "os": "linux",
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{}},
		"config": map[string]any{"Labels": map[string]string{"chaos.nonce": strconv.FormatUint(rng.Uint64(), 16)}},
	})
	cfgBlob := Blob{Digest: sha256Digest(cfgBytes), Size: int64(len(cfgBytes))}
	var err error
	if gw, err = w.uploadMonolithic(ctx, as, gw, repo, cfgBytes, cfgBlob.Digest); err != nil {
		return fail(OutcomeFail, 0, "config: "+err.Error())
	}
	manifest := manifestFor(cfgBlob, blobs)
	dgst := sha256Digest(manifest)
	op.Digest, op.Blobs = dgst, append([]Blob{cfgBlob}, blobs...)
	ref := dgst
	if tag != "" {
		ref = tag
	}
	// A manifest PUT is idempotent: retry it, on the other gateway too.
	gw, r, err := w.retry(ctx, gw, func(gw Endpoint) (reply, error) {
		return w.send(ctx, as, gw, repo, http.MethodPut, "/v2/"+repo+"/manifests/"+ref,
			http.Header{"Content-Type": {mediaTypeManifest}}, manifest)
	})
	op.Gateway, op.Consistency = gw.ID, gw.ReadConsistency
	if out := outcomeOf(r, err); out != OutcomeOK {
		return fail(out, r.status, "manifest: "+errText(r, err))
	}
	if got := r.header.Get("Docker-Content-Digest"); got != "" && got != dgst {
		return fail(OutcomeFail, r.status, fmt.Sprintf("manifest PUT answered digest %s, want %s", got, dgst))
	}
	op.End, op.Outcome, op.Status = w.h.Now(), OutcomeOK, r.status
	w.h.Add(op)
	return image{repo: repo, tag: tag, digest: dgst, blobs: op.Blobs}, nil
}

func manifestFor(cfg Blob, layers []Blob) []byte {
	return manifestWith(cfg, layers, nil)
}

// manifestWith builds an OCI image manifest; annotations, when set, make
// the manifest (and so its digest) distinct from another with the same
// blobs.
func manifestWith(cfg Blob, layers []Blob, annotations map[string]string) []byte {
	type desc struct {
		MediaType string `json:"mediaType"`
		Digest    string `json:"digest"`
		Size      int64  `json:"size"`
	}
	m := struct {
		SchemaVersion int               `json:"schemaVersion"`
		MediaType     string            `json:"mediaType"`
		Config        desc              `json:"config"`
		Layers        []desc            `json:"layers"`
		Annotations   map[string]string `json:"annotations,omitempty"`
	}{2, mediaTypeManifest, desc{"application/vnd.oci.image.config.v1+json", cfg.Digest, cfg.Size}, []desc{}, annotations}
	for _, l := range layers {
		m.Layers = append(m.Layers, desc{"application/vnd.oci.image.layer.v1.tar", l.Digest, l.Size})
	}
	b, _ := json.Marshal(m)
	return b
}

// uploadMonolithic sends a blob in one POST, retrying on the other gateway
// while the answer is transient. It returns the gateway that answered.
func (w *Workload) uploadMonolithic(ctx context.Context, as *sender, gw Endpoint, repo string, data []byte, dgst string) (Endpoint, error) {
	gw, r, err := w.retry(ctx, gw, func(gw Endpoint) (reply, error) {
		return w.send(ctx, as, gw, repo, http.MethodPost, "/v2/"+repo+"/blobs/uploads/?digest="+url.QueryEscape(dgst),
			http.Header{"Content-Type": {"application/octet-stream"}}, data)
	})
	if err != nil || r.status != http.StatusCreated {
		return gw, fmt.Errorf("upload via %s: %s", gw.ID, errText(r, err))
	}
	return gw, nil
}

// uploadChunked opens a session on gw and sends data in chunks, each on
// the gateway the previous one did not use; a chunk whose gateway fails is
// sent again, with the same session token, through the other gateway.
func (w *Workload) uploadChunked(ctx context.Context, as *sender, rng *rand.Rand, gw Endpoint, repo string, data []byte, dgst string) (Endpoint, error) {
	r, err := w.send(ctx, as, gw, repo, http.MethodPost, "/v2/"+repo+"/blobs/uploads/", nil, []byte{})
	if transient(r, err) {
		gw = w.other(gw)
		r, err = w.send(ctx, as, gw, repo, http.MethodPost, "/v2/"+repo+"/blobs/uploads/", nil, []byte{})
	}
	if err != nil || r.status != http.StatusAccepted {
		return gw, fmt.Errorf("open session via %s: %s", gw.ID, errText(r, err))
	}
	loc := r.header.Get("Location")
	chunk := 5 << 20
	if v, err := strconv.Atoi(r.header.Get("OCI-Chunk-Min-Length")); err == nil && v > chunk {
		chunk = v
	}
	for off := 0; off < len(data); {
		end := min(off+chunk, len(data))
		if len(data)-end < chunk/2 {
			end = len(data) // no tiny last chunk
		}
		gw = w.other(gw)
		hdr := http.Header{
			"Content-Type":  {"application/octet-stream"},
			"Content-Range": {fmt.Sprintf("%d-%d", off, end-1)},
		}
		gw, r, err = w.retry(ctx, gw, func(gw Endpoint) (reply, error) {
			return w.send(ctx, as, gw, repo, http.MethodPatch, pathOf(loc), hdr, data[off:end])
		})
		if err != nil || r.status != http.StatusAccepted {
			return gw, fmt.Errorf("chunk at %d via %s: %s", off, gw.ID, errText(r, err))
		}
		loc = r.header.Get("Location")
		off = end
	}
	gw, r, err = w.retry(ctx, w.other(gw), func(gw Endpoint) (reply, error) {
		return w.send(ctx, as, gw, repo, http.MethodPut, pathOf(loc)+querySep(loc)+"digest="+url.QueryEscape(dgst), nil, []byte{})
	})
	if err != nil || r.status != http.StatusCreated {
		return gw, fmt.Errorf("complete via %s: %s", gw.ID, errText(r, err))
	}
	return gw, nil
}

// retry sends a request through gw and, while the answer is transient,
// again through the other gateway after a growing pause, four times in
// all. It returns the gateway of the last attempt and its answer.
func (w *Workload) retry(ctx context.Context, gw Endpoint, send func(Endpoint) (reply, error)) (Endpoint, reply, error) {
	var r reply
	var err error
	for attempt := 0; attempt < 4; attempt++ {
		if attempt > 0 {
			gw = w.other(gw)
			if !sleepCtx(ctx, time.Duration(attempt)*500*time.Millisecond) {
				break
			}
		}
		if r, err = send(gw); !transient(r, err) {
			break
		}
	}
	return gw, r, err
}

// pathOf strips scheme and host from a Location, so that a session opened
// on one gateway can be continued on another.
func pathOf(loc string) string {
	if u, err := url.Parse(loc); err == nil && u.IsAbs() {
		return u.RequestURI()
	}
	return loc
}

func querySep(loc string) string {
	if strings.Contains(loc, "?") {
		return "&"
	}
	return "?"
}

// puller pulls acknowledged images, by tag or digest, and one or all of
// their blobs, through either gateway.
func (w *Workload) puller(ctx context.Context, id int, rng *rand.Rand) {
	for w.think(ctx, rng) {
		img, ok := w.pick(rng)
		if !ok {
			continue
		}
		gw := w.gateway(rng)
		byTag := rng.IntN(2) == 0
		w.pullManifest(ctx, id, gw, img, byTag, nil)
		b := img.blobs[rng.IntN(len(img.blobs))]
		w.pullBlob(ctx, id, gw, img.repo, b, nil)
	}
}

// pullManifest fetches img's manifest and records the pull; into, if not
// nil, also receives the op.
func (w *Workload) pullManifest(ctx context.Context, id int, gw Endpoint, img image, byTag bool, into *Op) {
	op := Op{Client: id, Kind: OpPullManifest, Gateway: gw.ID, Consistency: gw.ReadConsistency,
		Repo: img.repo, Digest: img.digest, Start: w.h.Now()}
	ref := img.digest
	if byTag && img.tag != "" {
		ref, op.Tag = img.tag, img.tag
	}
	r, err := w.client.do(ctx, gw, http.MethodGet, "/v2/"+img.repo+"/manifests/"+ref,
		http.Header{"Accept": {mediaTypeManifest}}, nil)
	w.finishPull(&op, r, err)
	if into != nil {
		*into = op
	}
}

func (w *Workload) pullBlob(ctx context.Context, id int, gw Endpoint, repo string, b Blob, into *Op) {
	op := Op{Client: id, Kind: OpPullBlob, Gateway: gw.ID, Consistency: gw.ReadConsistency,
		Repo: repo, Digest: b.Digest, Start: w.h.Now()}
	r, err := w.client.do(ctx, gw, http.MethodGet, "/v2/"+repo+"/blobs/"+b.Digest, nil, nil)
	w.finishPull(&op, r, err)
	if into != nil {
		*into = op
	}
}

func (w *Workload) finishPull(op *Op, r reply, err error) {
	op.End, op.Status = w.h.Now(), r.status
	switch {
	case err == nil && r.status == http.StatusOK:
		op.Outcome, op.Got = OutcomeOK, r.sum
	case err == nil && r.status == http.StatusNotFound:
		op.Outcome, op.Err = OutcomeNotFound, errText(r, err)
	case transient(r, err):
		op.Outcome, op.Err = OutcomeUnknown, errText(r, err)
	default:
		op.Outcome, op.Err = OutcomeFail, errText(r, err)
	}
	w.h.Add(*op)
	if w.cfg.Live == nil {
		return
	}
	switch {
	case op.Outcome == OutcomeOK && op.Got != op.Digest:
		w.cfg.Live("VIOLATION: %s %s %s via %s: asked for %s, received bytes hashing to %s", op.Kind, op.Repo, op.Tag, op.Gateway, op.Digest, op.Got)
	case op.Outcome == OutcomeNotFound:
		w.mu.Lock()
		deleted := w.deleted[op.Repo+"@"+op.Digest]
		w.mu.Unlock()
		if !deleted && op.Kind == OpPullManifest {
			w.cfg.Live("suspect: %s %s %s via %s (%s reads) answered 404 for an acknowledged push", op.Kind, op.Repo, op.Digest, op.Gateway, op.Consistency)
		}
	}
}

// tagger reads and writes the mutable tags. Reads through a strong gateway
// enter the linearizability check; writes may be unconditional, create-only
// or compare-and-swap against the last value this client knows of.
func (w *Workload) tagger(ctx context.Context, id int, rng *rand.Rand) {
	if len(w.slots) == 0 || len(w.values) == 0 {
		return
	}
	for w.think(ctx, rng) {
		s := w.slots[rng.IntN(len(w.slots))]
		s.mu.Lock()
		if s.ops >= w.cfg.TagGeneration || s.unknown >= 4 {
			s.gen, s.ops, s.unknown, s.last = s.gen+1, 0, 0, ""
		}
		s.ops++
		tag, last := fmt.Sprintf("m%dg%d", s.slot, s.gen), s.last
		s.mu.Unlock()

		gw := w.gateway(rng)
		op := Op{Client: id, Gateway: gw.ID, Consistency: gw.ReadConsistency, Repo: mutableRepo, Tag: tag}
		if rng.IntN(100) < 55 {
			op.Kind, op.Start = OpTagRead, w.h.Now()
			r, err := w.client.do(ctx, gw, http.MethodGet, "/v2/"+mutableRepo+"/manifests/"+tag,
				http.Header{"Accept": {mediaTypeManifest}}, nil)
			op.End, op.Status = w.h.Now(), r.status
			switch {
			case err == nil && r.status == http.StatusOK:
				op.Outcome, op.Value = OutcomeOK, r.header.Get("Docker-Content-Digest")
				if r.sum != op.Value {
					// Wrong bytes for the digest the registry named.
					w.h.Add(Op{Client: id, Kind: OpPullManifest, Gateway: gw.ID, Consistency: gw.ReadConsistency,
						Repo: mutableRepo, Tag: tag, Digest: op.Value, Got: r.sum, Start: op.Start, End: op.End, Outcome: OutcomeOK, Status: r.status})
				}
			case err == nil && r.status == http.StatusNotFound:
				op.Outcome = OutcomeOK // the answer is "no such tag"
			default:
				op.Outcome, op.Err = outcomeOf(r, err), errText(r, err)
			}
			w.h.Add(op)
			if op.Outcome == OutcomeOK && gw.ReadConsistency == "strong" {
				s.mu.Lock()
				if s.gen == genOf(tag) {
					s.last = op.Value
				}
				s.mu.Unlock()
			}
			continue
		}
		val := w.values[rng.IntN(len(w.values))]
		op.Kind, op.Value = OpTagWrite, val.digest
		hdr := http.Header{"Content-Type": {mediaTypeManifest}}
		switch p := rng.IntN(100); {
		case p < 10:
			op.Cond = CondNone
		case last == "":
			op.Cond = CondIfNoneMatch
			hdr.Set("If-None-Match", "*")
		default:
			op.Cond, op.Expect = CondIfMatch, last
			hdr.Set("If-Match", `"`+last+`"`)
		}
		op.Start = w.h.Now()
		r, err := w.client.do(ctx, gw, http.MethodPut, "/v2/"+mutableRepo+"/manifests/"+tag, hdr, manifestBytes(val))
		op.End, op.Status = w.h.Now(), r.status
		switch {
		case err == nil && r.status == http.StatusCreated:
			op.Outcome = OutcomeOK
		case err == nil && r.status == http.StatusPreconditionFailed:
			op.Outcome = OutcomeFail
		default:
			op.Outcome, op.Err = outcomeOf(r, err), errText(r, err)
		}
		w.h.Add(op)
		s.mu.Lock()
		if s.gen == genOf(tag) {
			switch op.Outcome {
			case OutcomeOK:
				s.last = op.Value
			case OutcomeUnknown:
				s.unknown++
			}
		}
		s.mu.Unlock()
	}
}

func genOf(tag string) int {
	i := strings.LastIndexByte(tag, 'g')
	n, _ := strconv.Atoi(tag[i+1:])
	return n
}

// manifestBytes rebuilds a tag value's manifest (values are single-layer
// images whose manifest was kept at setup).
func manifestBytes(img image) []byte {
	return manifestFor(img.blobs[0], img.blobs[1:])
}

// mover mounts an acknowledged image's blobs into another repository and
// pushes a manifest there, and now and then deletes a whole image.
func (w *Workload) mover(ctx context.Context, id int, rng *rand.Rand) {
	for k := 0; w.think(ctx, rng); k++ {
		if rng.IntN(w.cfg.DeleteOneIn) == 0 {
			w.deleteOne(ctx, id, rng)
			continue
		}
		src, ok := w.pick(rng)
		if !ok || strings.HasPrefix(src.repo, "critical/") {
			continue
		}
		repo, tag := fmt.Sprintf("chaos/mount%d", id), fmt.Sprintf("v%d", k)
		op := Op{Client: id, Kind: OpMount, Repo: repo, Tag: tag, From: src.repo, Start: w.h.Now()}
		gw := w.gateway(rng)
		failed := false
		for _, b := range src.blobs {
			var r reply
			var err error
			gw, r, err = w.retry(ctx, gw, func(gw Endpoint) (reply, error) {
				return w.client.do(ctx, gw, http.MethodPost, "/v2/"+repo+"/blobs/uploads/?mount="+url.QueryEscape(b.Digest)+"&from="+url.QueryEscape(src.repo), nil, []byte{})
			})
			if err != nil || r.status != http.StatusCreated {
				// 202 is a spec-allowed refusal (e.g. the source was just
				// deleted): the mount did not happen; nothing to check.
				if err == nil && r.status == http.StatusAccepted {
					if loc := r.header.Get("Location"); loc != "" {
						w.client.do(ctx, gw, http.MethodDelete, pathOf(loc), nil, nil)
					}
				}
				op.End, op.Outcome, op.Status, op.Err = w.h.Now(), OutcomeFail, r.status, "mount: "+errText(r, err)
				w.h.Add(op)
				failed = true
				break
			}
		}
		if failed {
			continue
		}
		// A manifest of its own, so that deleting it deletes only this image.
		manifest := manifestWith(src.blobs[0], src.blobs[1:], map[string]string{"chaos.mounted-from": src.repo + ":" + src.tag, "chaos.nonce": strconv.FormatUint(rng.Uint64(), 16)})
		op.Digest, op.Blobs = sha256Digest(manifest), src.blobs
		gw, r, err := w.retry(ctx, gw, func(gw Endpoint) (reply, error) {
			return w.client.do(ctx, gw, http.MethodPut, "/v2/"+repo+"/manifests/"+tag, http.Header{"Content-Type": {mediaTypeManifest}}, manifest)
		})
		op.End, op.Gateway, op.Status = w.h.Now(), gw.ID, r.status
		op.Outcome, op.Err = outcomeOf(r, err), errText(r, err)
		w.h.Add(op)
		if op.Outcome == OutcomeOK {
			w.addAcked(image{repo: repo, tag: tag, digest: op.Digest, blobs: src.blobs})
		}
	}
}

// deleteOne deletes a whole acknowledged image (never a tag value): its
// manifest by digest and then, once that was acknowledged, each of its
// blobs from the repository. The registry refuses (403) the blobs another
// manifest of the repository still uses, which the pool's layers often
// are; the others lose their link at once instead of after a GC grace.
// The image leaves the pull pool before the request, so pulls only race
// with deletes the checkers know about.
func (w *Workload) deleteOne(ctx context.Context, id int, rng *rand.Rand) {
	w.mu.Lock()
	if len(w.acked) < 10 {
		w.mu.Unlock()
		return
	}
	i := rng.IntN(len(w.acked))
	img := w.acked[i]
	w.acked = append(w.acked[:i], w.acked[i+1:]...)
	w.deleted[img.repo+"@"+img.digest] = true
	w.mu.Unlock()
	// Other images in the repository may share a manifest (a mount of the
	// same source twice); deleting by digest removes them all, so they go
	// too.
	w.mu.Lock()
	kept := w.acked[:0]
	for _, a := range w.acked {
		if a.repo == img.repo && a.digest == img.digest {
			continue
		}
		kept = append(kept, a)
	}
	w.acked = kept
	w.mu.Unlock()

	gw := w.gateway(rng)
	op := Op{Client: id, Kind: OpDelete, Gateway: gw.ID, Repo: img.repo, Tag: img.tag, Digest: img.digest, Start: w.h.Now()}
	r, err := w.client.do(ctx, gw, http.MethodDelete, "/v2/"+img.repo+"/manifests/"+img.digest, nil, nil)
	op.End, op.Status = w.h.Now(), r.status
	op.Outcome, op.Err = outcomeOf(r, err), errText(r, err)
	w.h.Add(op)
	if op.Outcome != OutcomeOK {
		return
	}
	for _, b := range img.blobs {
		op := Op{Client: id, Kind: OpDeleteBlob, Gateway: gw.ID, Repo: img.repo, Digest: b.Digest, Start: w.h.Now()}
		r, err := w.client.do(ctx, gw, http.MethodDelete, "/v2/"+img.repo+"/blobs/"+b.Digest, nil, nil)
		op.End, op.Status = w.h.Now(), r.status
		op.Outcome, op.Err = outcomeOf(r, err), errText(r, err)
		w.h.Add(op)
	}
}

// Verify checks, after healing, every acknowledged push that was never the
// target of a delete: its tag still names its manifest, and the manifest and
// every blob pull back with matching bytes. Transient errors are retried; a
// 404 or wrong bytes is final. It records one OpVerify per image.
func (w *Workload) Verify(ctx context.Context, parallel int) (checked int) {
	var imgs []image
	deletedRepoDigest := map[string]bool{}
	for _, op := range w.h.Ops() {
		if op.Kind == OpDelete {
			deletedRepoDigest[op.Repo+"@"+op.Digest] = true
		}
	}
	for _, op := range w.h.Ops() {
		if (op.Kind == OpPush || op.Kind == OpMount) && op.Outcome == OutcomeOK && op.Tag != "" && !deletedRepoDigest[op.Repo+"@"+op.Digest] {
			imgs = append(imgs, image{repo: op.Repo, tag: op.Tag, digest: op.Digest, blobs: op.Blobs})
		}
	}
	work := make(chan image)
	var wg sync.WaitGroup
	for i := range parallel {
		gw := w.cfg.Gateways[i%len(w.cfg.Gateways)]
		wg.Go(func() {
			for img := range work {
				w.verifyOne(ctx, gw, img)
			}
		})
	}
	for _, img := range imgs {
		select {
		case work <- img:
		case <-ctx.Done():
		}
	}
	close(work)
	wg.Wait()
	return len(imgs)
}

const verifyClient = -2

func (w *Workload) verifyOne(ctx context.Context, gw Endpoint, img image) {
	op := Op{Client: verifyClient, Kind: OpVerify, Gateway: gw.ID, Consistency: gw.ReadConsistency,
		Repo: img.repo, Tag: img.tag, Start: w.h.Now()}
	finish := func(outcome Outcome, got, msg string) {
		op.End, op.Outcome, op.Err = w.h.Now(), outcome, msg
		op.Digest = got
		w.h.Add(op)
	}
	// The tag, then the manifest by the digest the tag names.
	var m Op
	for attempt := 0; ; attempt++ {
		w.pullManifest(ctx, verifyClient, gw, img, true, &m)
		if m.Outcome != OutcomeUnknown || attempt == 5 || !sleepCtx(ctx, time.Second) {
			break
		}
		gw = w.other(gw)
	}
	if m.Outcome != OutcomeOK {
		finish(OutcomeFail, "", fmt.Sprintf("tag %s: %s %s", img.tag, m.Outcome, m.Err))
		return
	}
	if m.Got != img.digest {
		finish(OutcomeFail, m.Got, fmt.Sprintf("tag %s names bytes hashing to %s", img.tag, m.Got))
		return
	}
	for _, b := range img.blobs {
		var p Op
		for attempt := 0; ; attempt++ {
			w.pullBlob(ctx, verifyClient, gw, img.repo, b, &p)
			if p.Outcome != OutcomeUnknown || attempt == 5 || !sleepCtx(ctx, time.Second) {
				break
			}
			gw = w.other(gw)
		}
		if p.Outcome != OutcomeOK || p.Got != b.Digest {
			finish(OutcomeFail, img.digest, fmt.Sprintf("blob %s: %s %s got %s", b.Digest, p.Outcome, p.Err, p.Got))
			return
		}
	}
	finish(OutcomeOK, img.digest, "")
}

// FinalTagReads reads every mutable tag ever used through each strong
// gateway, so that the final state enters the linearizability check.
func (w *Workload) FinalTagReads(ctx context.Context) {
	for _, s := range w.slots {
		for gen := 0; gen <= s.gen; gen++ {
			tag := fmt.Sprintf("m%dg%d", s.slot, gen)
			for _, gw := range w.cfg.Gateways {
				if gw.ReadConsistency != "strong" {
					continue
				}
				op := Op{Client: verifyClient, Kind: OpTagRead, Gateway: gw.ID, Consistency: gw.ReadConsistency, Repo: mutableRepo, Tag: tag, Start: w.h.Now()}
				r, err := w.client.do(ctx, gw, http.MethodGet, "/v2/"+mutableRepo+"/manifests/"+tag, http.Header{"Accept": {mediaTypeManifest}}, nil)
				op.End, op.Status = w.h.Now(), r.status
				switch {
				case err == nil && r.status == http.StatusOK:
					op.Outcome, op.Value = OutcomeOK, r.header.Get("Docker-Content-Digest")
				case err == nil && r.status == http.StatusNotFound:
					op.Outcome = OutcomeOK
				default:
					op.Outcome, op.Err = outcomeOf(r, err), errText(r, err)
				}
				w.h.Add(op)
			}
		}
	}
}

func randomBytes(rng *rand.Rand, n int) []byte {
	var seed [32]byte
	for i := 0; i < 32; i += 8 {
		v := rng.Uint64()
		for j := range 8 {
			seed[i+j] = byte(v >> (8 * j))
		}
	}
	b := make([]byte, n)
	rand.NewChaCha8(seed).Read(b)
	return b
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	select {
	case <-ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}
