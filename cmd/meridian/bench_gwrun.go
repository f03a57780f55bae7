package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/minio/minio-go/v7"
)

// The cluster part of `meridian bench`: a `meridian gateway` in front of
// three `meridian serve` nodes with file:// regions (blob pull and manifest
// GET through the gateway next to the node it prefers, a pull storm next to
// the static file server, tag commits through a follower), then a gateway
// and a node on one S3 region served by versitygw (blob pull and push
// through the gateway next to raw S3 requests with minio-go).

// clusterResult is what the cluster part measured.
type clusterResult struct {
	Security      string `json:"security"`
	PreferredNode string `json:"preferred_node,omitempty"`

	GatewayPull pullResult `json:"gateway_pull"`
	NodePull    pullResult `json:"node_pull"`
	// GatewayColdPull is each run's first read of a blob of its own through
	// the gateway (streamed uncached), and GatewayFillPull its second
	// read, which fills the gateway's blob cache.
	GatewayColdPull pullResult `json:"gateway_cold_pull"`
	GatewayFillPull pullResult `json:"gateway_fill_pull"`

	GatewayManifestGET loadResult `json:"gateway_manifest_get_by_tag"`
	NodeManifestGET    loadResult `json:"node_manifest_get_by_tag"`

	StormClients int        `json:"storm_clients"`
	StormBytes   int64      `json:"storm_blob_bytes"`
	GatewayStorm pullResult `json:"gateway_storm"` // aggregate: clients × blob / wall time
	StaticStorm  pullResult `json:"static_storm"`

	TagCommits *loadResult `json:"tag_commits,omitempty"`
	Follower   string      `json:"tag_commits_follower,omitempty"`
	Leader     string      `json:"tag_commits_leader,omitempty"`

	Error string `json:"error,omitempty"`
}

// s3Result is what the S3 part measured.
type s3Result struct {
	Security       string     `json:"security"`
	GatewayPull    pullResult `json:"gateway_pull"`
	RawPull        pullResult `json:"raw_s3_get"`
	GatewayPush    pullResult `json:"gateway_push"`
	RawPush        pullResult `json:"raw_s3_multipart_put"`
	PullRedirected bool       `json:"pull_redirected,omitempty"`
	Skipped        string     `json:"skipped,omitempty"`
	Error          string     `json:"error,omitempty"`
}

const (
	// stormClients GET one stormSize blob at once.
	stormClients = 64
	stormSize    = 64 << 20
	// tagWriters commit tags at once through a follower.
	tagWriters = 32
)

// clusterWorkload runs the cluster part; static is the static file server
// of the node part, whose docroot is staticDir.
type clusterWorkload struct {
	opts      benchOptions
	root      string
	static    *staticServer
	staticDir string
	rep       *benchReport
	logf      func(string, ...any)
}

// runFileCluster measures everything that needs the file:// cluster.
func (w *clusterWorkload) runFileCluster(ctx context.Context) error {
	res := &clusterResult{StormClients: stormClients, StormBytes: stormSize}
	w.rep.Cluster = res
	err := w.fileCluster(ctx, res)
	if err != nil {
		res.Error = err.Error()
	}
	return err
}

func (w *clusterWorkload) fileCluster(ctx context.Context, res *clusterResult) error {
	dir := filepath.Join(w.root, "cluster")
	spec := benchClusterSpec{id: "bench", nodeRegions: []string{"us-east", "eu-west", "ap-south"}, gatewayRegion: "us-east", mtls: true}
	for _, r := range spec.nodeRegions {
		spec.regions = append(spec.regions, benchRegion{r, "file://" + filepath.Join(dir, "blobs", r)})
	}
	w.logf("cluster: starting 3 nodes (file:// regions) and a gateway, mutual TLS")
	c, err := startBenchCluster(ctx, w.opts.meridianCmd, dir, spec)
	if err != nil {
		return fmt.Errorf("bench: cluster: %w", err)
	}
	defer c.stop()
	res.Security = c.mtlsLabel()

	gw := c.adminClient(c.gw.base, 1)
	defer gw.CloseIdleConnections()
	config := []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}`)
	pulled := newBlobSpec(1, w.opts.size) // the node part's pulled blob
	storm := newBlobSpec(2001, min(stormSize, w.opts.size))
	res.StormBytes = storm.size
	// One blob per run that only that run's first GET reads: the gateway's
	// blob cache has not seen it, so the GET pays for filling it.
	cold := make([]blobSpec, w.opts.runs)
	for i := range cold {
		cold[i] = newBlobSpec(uint64(3001+i), w.opts.size)
	}
	w.logf("cluster: pushing %d blobs of %s, a %s one and a manifest through the gateway", 1+len(cold), mib(pulled.size), mib(storm.size))
	if _, err := pushSmall(ctx, gw, c.gw.base, config, sha256Digest(config)); err != nil {
		return fmt.Errorf("bench: cluster: push through the gateway: %w", err)
	}
	for _, b := range append([]blobSpec{pulled, storm}, cold...) {
		if _, err := pushMonolithic(ctx, gw, c.gw.base, b, true); err != nil {
			return fmt.Errorf("bench: cluster: push through the gateway: %w", err)
		}
	}
	manifest := imageManifest(sha256Digest(config), int64(len(config)), pulled)
	if err := putManifest(ctx, gw, c.gw.base, manifest); err != nil {
		return fmt.Errorf("bench: cluster: %w", err)
	}
	w.logf("cluster: waiting until every region holds every blob")
	if err := c.waitReplicated(ctx); err != nil {
		return fmt.Errorf("bench: cluster: %w", err)
	}
	n, err := c.preferred(ctx)
	if err != nil {
		return fmt.Errorf("bench: cluster: %w", err)
	}
	res.PreferredNode = n.ready.NodeID + " (" + n.ready.Region + ")"
	nc := c.adminClient(n.base, 1)
	defer nc.CloseIdleConnections()

	// The gateway caches a blob from its second read: two reads first, so
	// that every run's gateway pull of this blob is served from its cache.
	for range 2 {
		if _, err := pullOnce(ctx, gw, c.gw.base+"/v2/"+benchRepo+"/blobs/"+pulled.digest, pulled); err != nil {
			return fmt.Errorf("bench: cluster: warm the gateway's cache: %w", err)
		}
	}
	for i := range w.opts.runs {
		w.logf("cluster run %d/%d: GET a new %s blob through the gateway twice, then the cached one through the gateway and from %s", i+1, w.opts.runs, mib(pulled.size), n.ready.NodeID)
		for _, into := range []*pullResult{&res.GatewayColdPull, &res.GatewayFillPull} {
			d, err := pullOnce(ctx, gw, c.gw.base+"/v2/"+benchRepo+"/blobs/"+cold[i].digest, cold[i])
			if err != nil {
				return fmt.Errorf("bench: cluster: first pulls of a blob: %w", err)
			}
			into.add(cold[i].size, d)
		}
		for _, t := range []struct {
			c    *http.Client
			base string
			into *pullResult
		}{{gw, c.gw.base, &res.GatewayPull}, {nc, n.base, &res.NodePull}} {
			d, err := pullOnce(ctx, t.c, t.base+"/v2/"+benchRepo+"/blobs/"+pulled.digest, pulled)
			if err != nil {
				return fmt.Errorf("bench: cluster: pull: %w", err)
			}
			t.into.add(pulled.size, d)
		}
	}

	if err := w.clusterManifestLoad(ctx, c, n, res, len(manifest)); err != nil {
		return err
	}
	if err := w.pullStorm(ctx, c, storm, res); err != nil {
		return err
	}
	return w.tagCommits(ctx, c, manifest, res)
}

// clusterManifestLoad alternates slices of the manifest GET load between
// the gateway and the node, each with a token of its own.
func (w *clusterWorkload) clusterManifestLoad(ctx context.Context, c *benchCluster, n *clusterMember, res *clusterResult, manifestLen int) error {
	scope := "repository:" + benchRepo + ":pull"
	tc := newBenchClient(1)
	defer tc.CloseIdleConnections()
	type side struct {
		base, auth string
		c          *http.Client
		s          loadSample
	}
	sides := []*side{{base: c.gw.base}, {base: n.base}}
	for _, s := range sides {
		var err error
		if s.auth, err = c.token(ctx, tc, s.base, scope); err != nil {
			return fmt.Errorf("bench: cluster: token from %s: %w", s.base, err)
		}
		s.c = newBenchClient(w.opts.concurrency)
		defer s.c.CloseIdleConnections()
	}
	slices := max(1, int(math.Round(w.opts.duration.Seconds()/2)))
	slice := w.opts.duration / time.Duration(slices)
	w.logf("cluster: manifest GET by tag, %d clients, %s through the gateway and %s from %s, in %d slice(s)",
		w.opts.concurrency, w.opts.duration, w.opts.duration, n.ready.NodeID, slices)
	for i := range slices {
		order := []*side{sides[0], sides[1]}
		if i%2 == 1 {
			order[0], order[1] = order[1], order[0]
		}
		for _, s := range order {
			var profiled func() error
			if i == 0 {
				// The first slice of each side: the gateway and the node it
				// asks while the load goes through the gateway, the node
				// alone while the load goes to it.
				members := map[string]string{"manifest-get-node-direct": n.base}
				if s == sides[0] {
					members = map[string]string{"manifest-get-gateway": c.gw.base, "manifest-get-node-behind-gateway": n.base}
				}
				profiled = c.profileDuring(ctx, w.opts.profiles, slice, members)
			}
			got := manifestLoad(ctx, s.c, s.base+"/v2/"+benchRepo+"/manifests/"+benchTag, s.auth, manifestLen, w.opts.concurrency, slice)
			if profiled != nil {
				if err := profiled(); err != nil {
					return err
				}
			}
			if err := ctx.Err(); err != nil {
				return err
			}
			s.s.merge(got)
			if len(got.lat) == 0 {
				return fmt.Errorf("bench: cluster: no manifest GET from %s succeeded: %s", s.base, got.firstErr)
			}
		}
	}
	res.GatewayManifestGET = sides[0].s.result(w.opts.concurrency)
	res.NodeManifestGET = sides[1].s.result(w.opts.concurrency)
	return nil
}

// pullStorm has stormClients GET one blob at once, from the static file
// server (the same bytes as a file) and through the gateway, in alternating
// rounds. Every client counts the bytes and checks a CRC-32C of the body
// (sha256 on 64 clients would make the clients' hashing the limit); one GET
// through the gateway checks the sha256 first.
func (w *clusterWorkload) pullStorm(ctx context.Context, c *benchCluster, b blobSpec, res *clusterResult) error {
	if w.static == nil {
		return nil
	}
	path := filepath.Join(w.staticDir, "storm")
	if err := writeBlobFile(path, b); err != nil {
		return fmt.Errorf("bench: pull storm: %w", err)
	}
	defer os.Remove(path)
	crc := blobCRC(b)
	tc := newBenchClient(1)
	defer tc.CloseIdleConnections()
	auth, err := c.token(ctx, tc, c.gw.base, "repository:"+benchRepo+":pull")
	if err != nil {
		return fmt.Errorf("bench: pull storm: token: %w", err)
	}
	gwURL := c.gw.base + "/v2/" + benchRepo + "/blobs/" + b.digest
	check := newBenchClient(1)
	check.Transport = bearerTransport{auth, check.Transport}
	if _, err := pullOnce(ctx, check, gwURL, b); err != nil {
		return fmt.Errorf("bench: pull storm: %w", err)
	}
	staticURL := w.static.base + "/storm"
	for i := range w.opts.runs {
		w.logf("pull storm %d/%d: %d clients GET one %s blob at once, from %s, then through the gateway", i+1, w.opts.runs, stormClients, mib(b.size), w.static.label)
		d, err := storm(ctx, staticURL, "", stormClients, b.size, crc)
		if err != nil {
			return fmt.Errorf("bench: pull storm: static file server: %w", err)
		}
		res.StaticStorm.add(int64(stormClients)*b.size, d)
		if d, err = storm(ctx, gwURL, auth, stormClients, b.size, crc); err != nil {
			return fmt.Errorf("bench: pull storm: gateway: %w", err)
		}
		res.GatewayStorm.add(int64(stormClients)*b.size, d)
	}
	return nil
}

// bearerTransport adds an Authorization header to every request.
type bearerTransport struct {
	auth string
	base http.RoundTripper
}

func (b bearerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", b.auth)
	return b.base.RoundTrip(r)
}

// storm starts clients GETs of url at once, each on a connection of its
// own, and returns the time until the last body was read. Every body must
// be size bytes with the CRC-32C crc, and every answer a 200.
func storm(ctx context.Context, url, authorization string, clients int, size int64, crc uint32) (time.Duration, error) {
	hc := newBenchClient(clients)
	hc.Transport.(*http.Transport).DisableKeepAlives = true
	defer hc.CloseIdleConnections()
	var (
		wg       sync.WaitGroup
		failed   atomic.Int32
		firstErr error
		once     sync.Once
	)
	start := make(chan struct{})
	for range clients {
		wg.Go(func() {
			<-start
			if err := stormGet(ctx, hc, url, authorization, size, crc); err != nil {
				failed.Add(1)
				once.Do(func() { firstErr = err })
			}
		})
	}
	t0 := time.Now()
	close(start)
	wg.Wait()
	d := time.Since(t0)
	if firstErr != nil {
		return 0, fmt.Errorf("%d of %d clients failed, first: %w", failed.Load(), clients, firstErr)
	}
	return d, nil
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func stormGet(ctx context.Context, hc *http.Client, url, authorization string, size int64, crc uint32) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	if authorization != "" {
		req.Header.Set("Authorization", authorization)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return statusError("GET", resp)
	}
	h := crc32.New(castagnoli)
	n, err := io.CopyBuffer(h, resp.Body, make([]byte, 256<<10))
	if err != nil {
		return fmt.Errorf("GET: after %d bytes: %w", n, err)
	}
	if n != size || h.Sum32() != crc {
		return fmt.Errorf("GET: %d bytes with CRC-32C %08x, want %d bytes with %08x", n, h.Sum32(), size, crc)
	}
	return nil
}

// blobCRC is the CRC-32C of b's bytes.
func blobCRC(b blobSpec) uint32 {
	h := crc32.New(castagnoli)
	io.CopyBuffer(h, b.reader(), make([]byte, genBlockSize))
	return h.Sum32()
}

// writeBlobFile writes b's bytes to path.
func writeBlobFile(path string, b blobSpec) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.CopyBuffer(f, b.reader(), make([]byte, genBlockSize)); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// tagCommits has tagWriters clients PUT the manifest under new tags through
// a follower for the load's duration: every PUT is a tag commit, which the
// follower forwards to the leader.
func (w *clusterWorkload) tagCommits(ctx context.Context, c *benchCluster, manifest []byte, res *clusterResult) error {
	f, leader, err := c.follower(ctx)
	if err != nil {
		return fmt.Errorf("bench: tag commits: %w", err)
	}
	res.Follower, res.Leader = f.ready.NodeID, leader
	tc := newBenchClient(1)
	defer tc.CloseIdleConnections()
	auth, err := c.token(ctx, tc, f.base, "repository:"+benchRepo+":pull,push")
	if err != nil {
		return fmt.Errorf("bench: tag commits: token: %w", err)
	}
	hc := newBenchClient(tagWriters)
	defer hc.CloseIdleConnections()
	w.logf("tag commits: %d writers PUT the manifest under new tags through follower %s (leader %s) for %s", tagWriters, f.ready.NodeID, leader, w.opts.duration)
	var writer atomic.Int32
	var leaderBase string
	for _, n := range c.nodes {
		if n.ready.NodeID == leader {
			leaderBase = n.base
		}
	}
	profiled := c.profileDuring(ctx, w.opts.profiles, w.opts.duration, map[string]string{"tag-commits-leader": leaderBase, "tag-commits-follower": f.base})
	s := closedLoop(ctx, tagWriters, w.opts.duration, func() func() error {
		id := writer.Add(1)
		n := 0
		return func() error {
			n++
			tag := "w" + strconv.Itoa(int(id)) + "-" + strconv.Itoa(n)
			return putManifestTag(ctx, hc, f.base, tag, auth, manifest)
		}
	})
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := profiled(); err != nil {
		return err
	}
	r := s.result(tagWriters)
	res.TagCommits = &r
	if len(s.lat) == 0 {
		return fmt.Errorf("bench: tag commits: no PUT succeeded: %s", s.firstErr)
	}
	return nil
}

// putManifestTag PUTs m under tag with the Authorization given and wants a
// 201.
func putManifestTag(ctx context.Context, hc *http.Client, base, tag, authorization string, m []byte) error {
	resp, err := send(ctx, hc, http.MethodPut, base+"/v2/"+benchRepo+"/manifests/"+tag, bytes.NewReader(m), int64(len(m)),
		http.Header{"Content-Type": {mediaTypeManifest}, "Authorization": {authorization}})
	if err != nil {
		return err
	}
	return expect(resp, http.StatusCreated, "PUT manifest")
}

// runS3 measures the gateway on an S3 region next to raw S3 requests of the
// same bytes.
func (w *clusterWorkload) runS3(ctx context.Context) error {
	res := &s3Result{}
	w.rep.S3 = res
	bin, reason := findBinary(w.opts.versitygw, "versitygw")
	if bin == "" {
		res.Skipped = reason
		w.logf("S3 rows: skipped (%s)", reason)
		return nil
	}
	err := w.s3(ctx, bin, res)
	if err != nil {
		res.Error = err.Error()
	}
	return err
}

func (w *clusterWorkload) s3(ctx context.Context, bin string, res *s3Result) error {
	dir := filepath.Join(w.root, "s3")
	w.logf("S3: starting versitygw, a node and a gateway on one S3 region, mutual TLS")
	s3, err := startVersitygw(ctx, bin, filepath.Join(dir, "versitygw"))
	if err != nil {
		return fmt.Errorf("bench: S3: %w", err)
	}
	defer s3.proc.stop()
	spec := benchClusterSpec{id: "bench-s3", regions: []benchRegion{{"s3", s3.storeURL()}}, nodeRegions: []string{"s3"}, gatewayRegion: "s3", mtls: true}
	c, err := startBenchCluster(ctx, w.opts.meridianCmd, filepath.Join(dir, "cluster"), spec)
	if err != nil {
		return fmt.Errorf("bench: S3: %w", err)
	}
	defer c.stop()
	res.Security = c.mtlsLabel()
	mc, err := s3.client()
	if err != nil {
		return err
	}
	gw := c.adminClient(c.gw.base, 1)
	defer gw.CloseIdleConnections()

	blobs := make([]blobSpec, w.opts.runs)
	for i := range blobs {
		blobs[i] = newBlobSpec(uint64(3001+i), w.opts.size)
	}
	rawKey := func(i int) string { return "bench-raw/" + strconv.Itoa(i) }
	for i, b := range blobs {
		w.logf("S3 run %d/%d: push %s through the gateway, then a raw multipart PUT of the same bytes", i+1, w.opts.runs, mib(b.size))
		start := time.Now()
		if _, err := pushMonolithic(ctx, gw, c.gw.base, b, true); err != nil {
			return fmt.Errorf("bench: S3: push through the gateway: %w%s", err, c.gw.proc.logTail())
		}
		res.GatewayPush.add(b.size, time.Since(start))
		start = time.Now()
		info, err := mc.PutObject(ctx, benchBucket, rawKey(i), b.reader(), b.size, minio.PutObjectOptions{ContentType: "application/octet-stream"})
		if err != nil {
			return fmt.Errorf("bench: S3: raw PUT: %w", err)
		}
		if info.Size != b.size {
			return fmt.Errorf("bench: S3: raw PUT stored %d bytes, want %d", info.Size, b.size)
		}
		res.RawPush.add(b.size, time.Since(start))
	}
	pulled := blobs[0]
	var redirected atomic.Bool
	gw.CheckRedirect = func(*http.Request, []*http.Request) error { redirected.Store(true); return nil }
	for i := range w.opts.runs {
		w.logf("S3 run %d/%d: GET %s through the gateway, then a raw S3 GET of the same bytes", i+1, w.opts.runs, mib(pulled.size))
		d, err := pullOnce(ctx, gw, c.gw.base+"/v2/"+benchRepo+"/blobs/"+pulled.digest, pulled)
		if err != nil {
			return fmt.Errorf("bench: S3: pull through the gateway: %w", err)
		}
		res.GatewayPull.add(pulled.size, d)
		if d, err = rawS3Get(ctx, mc, rawKey(0), pulled); err != nil {
			return fmt.Errorf("bench: S3: raw GET: %w", err)
		}
		res.RawPull.add(pulled.size, d)
	}
	res.PullRedirected = redirected.Load()
	return nil
}

// rawS3Get GETs key with minio-go, hashing the body as pullOnce does.
func rawS3Get(ctx context.Context, mc *minio.Client, key string, b blobSpec) (time.Duration, error) {
	start := time.Now()
	obj, err := mc.GetObject(ctx, benchBucket, key, minio.GetObjectOptions{})
	if err != nil {
		return 0, err
	}
	defer obj.Close()
	h := sha256.New()
	n, err := io.CopyBuffer(h, obj, make([]byte, genBlockSize))
	d := time.Since(start)
	if err != nil {
		return 0, fmt.Errorf("after %d bytes: %w", n, err)
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); n != b.size || got != b.digest {
		return 0, fmt.Errorf("got %d bytes with digest %s, want %d bytes with %s", n, got, b.size, b.digest)
	}
	return d, nil
}
