package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"
)

// Meridian's performance targets (issue 14's table): ratios of a figure to
// its reference measured in the same run.
const (
	targetPushOfDisk      = 0.80 // push ≥ 80% of the fsync'd write rate
	targetPushOfDistr     = 1.0  // push (fsync) ≥ Distribution's (no fsync)
	targetPullOfFaster    = 0.95 // pull ≥ 95% of the faster of Distribution and the static server
	targetManifestOfDistr = 3.0  // manifest GET by tag ≥ 3× Distribution
	targetManifestOfNginx = 0.90 // manifest GET by tag ≥ 90% of the same bytes as a static file
	targetBearerOfAnon    = 0.90 // with a bearer token ≥ 90% of anonymous

	targetGatewayPullOfNode     = 0.80 // blob GET through the gateway ≥ 80% of the node's
	targetGatewayManifestOfNode = 0.70 // manifest GET through the gateway ≥ 70% of the node's
	targetS3PullOfRaw           = 0.80 // gateway GET from S3 ≥ 80% of a raw S3 GET
	targetS3PushOfRaw           = 0.80 // gateway push to S3 ≥ 80% of a raw multipart PUT
	targetStormOfStatic         = 0.80 // pull storm through the gateway ≥ 80% of the static server's

	targetTagCommitsPerSec = 2000 // tag commits through a follower, 32 writers
	targetTagCommitP50Ms   = 10.0 // and their median latency
)

// Verdicts of a row with a target.
const (
	verdictMet    = "MET"
	verdictMissed = "MISSED"
	verdictError  = "ERR" // some requests failed: the figure is not judged
	verdictNA     = "n/a" // the reference was not measured
)

// benchReport is everything one run measured; the JSON file holds it whole.
type benchReport struct {
	Environment  benchEnvironment `json:"environment"`
	Started      time.Time        `json:"started"`
	SizeBytes    int64            `json:"blob_bytes"`
	ChunkBytes   int64            `json:"chunk_bytes"`
	LoadDuration string           `json:"manifest_load_duration"`
	Concurrency  int              `json:"manifest_load_concurrency"`
	Runs         int              `json:"runs"`

	Limits              benchLimits     `json:"limits"`
	Meridian            *registryResult `json:"meridian,omitempty"`
	Distribution        *registryResult `json:"distribution,omitempty"`
	DistributionSkipped string          `json:"distribution_skipped,omitempty"`
	Cluster             *clusterResult  `json:"cluster,omitempty"`
	S3                  *s3Result       `json:"s3,omitempty"`
	Scale               *scaleResult    `json:"scale,omitempty"`
	Error               string          `json:"error,omitempty"`

	Rows []benchRow `json:"rows"`
}

type benchLimits struct {
	DiskWrite *diskResult   `json:"disk_write_fsync,omitempty"`
	SHA256    *throughput   `json:"sha256_one_core,omitempty"`
	Static    *staticResult `json:"static_file_server,omitempty"`
}

type staticResult struct {
	Server string     `json:"server"`
	Pull   pullResult `json:"pull"`
	// ManifestGET is the manifest load on the same manifest bytes served
	// as a static file, without authentication.
	ManifestGET *loadResult `json:"manifest_get,omitempty"`
}

// benchRow is one line of the table.
type benchRow struct {
	Figure     string  `json:"figure"`
	Value      float64 `json:"value"`
	Unit       string  `json:"unit"`
	Detail     string  `json:"detail,omitempty"`
	Limit      string  `json:"compared_with,omitempty"`
	LimitValue float64 `json:"limit_value,omitempty"`
	Ratio      float64 `json:"ratio,omitempty"`
	Target     string  `json:"target,omitempty"`
	Result     string  `json:"result,omitempty"` // MET, MISSED, ERR or n/a
}

func newBenchReport(opts benchOptions, root string) *benchReport {
	return &benchReport{
		Environment: currentEnvironment(root), Started: time.Now().UTC(),
		SizeBytes: opts.size, ChunkBytes: opts.chunk,
		LoadDuration: opts.duration.String(), Concurrency: opts.concurrency, Runs: opts.runs,
	}
}

// buildRows turns the measurements into the table, with a MET/MISSED for
// each target whose figure and reference were both measured.
func (r *benchReport) buildRows() {
	r.Rows = nil
	add := func(row benchRow) { r.Rows = append(r.Rows, row) }
	l := r.Limits
	if l.DiskWrite != nil {
		add(benchRow{Figure: "limit: disk write, 1 MiB blocks + fsync", Value: l.DiskWrite.MBps, Unit: "MB/s",
			Detail: fmt.Sprintf("%.2f s, of which the final fsync %.2f s", l.DiskWrite.Seconds, l.DiskWrite.FsyncSeconds)})
	}
	if l.SHA256 != nil {
		add(benchRow{Figure: "limit: sha256, one core, in memory", Value: l.SHA256.MBps, Unit: "MB/s"})
	}
	if l.Static != nil {
		add(benchRow{Figure: "limit: static file server GET + sha256", Value: l.Static.Pull.MBps, Unit: "MB/s", Detail: l.Static.Server})
	}
	for _, reg := range []*registryResult{r.Meridian, r.Distribution} {
		if reg == nil {
			continue
		}
		target := reg == r.Meridian
		for _, p := range []struct {
			what string
			res  pushResult
		}{{"push, monolithic", reg.PushMonolithic}, {"push, chunked", reg.PushChunked}} {
			if p.res.Bytes == 0 {
				continue
			}
			row := benchRow{Figure: reg.Name + " " + p.what, Value: p.res.MBps, Unit: "MB/s",
				Detail: fmt.Sprintf("%s; %.2f s, of which %.2f s after the data (commit)", p.res.Method, p.res.Seconds, p.res.CommitSeconds)}
			if l.DiskWrite != nil {
				compare(&row, "disk write + fsync", l.DiskWrite.MBps, pairedRatio(p.res.RunsMBps, l.DiskWrite.RunsMBps), target, targetPushOfDisk)
			}
			add(row)
			if d := r.Distribution; target && p.what == "push, monolithic" && d != nil && d.PushMonolithic.Bytes > 0 {
				row := benchRow{Figure: reg.Name + " push (fsync) vs distribution (no fsync)", Value: p.res.MBps, Unit: "MB/s",
					Detail: "distribution: " + d.PushMonolithic.Method}
				compare(&row, "distribution push, monolithic", d.PushMonolithic.MBps, pairedRatio(p.res.RunsMBps, d.PushMonolithic.RunsMBps), true, targetPushOfDistr)
				add(row)
			}
		}
		if reg.Pull.Bytes > 0 {
			row := benchRow{Figure: reg.Name + " pull, GET + sha256", Value: reg.Pull.MBps, Unit: "MB/s"}
			if target {
				r.compareWithFaster(&row)
			} else if l.Static != nil {
				compare(&row, "static file server", l.Static.Pull.MBps, pairedRatio(reg.Pull.RunsMBps, l.Static.Pull.RunsMBps), false, 0)
			}
			add(row)
		}
		if m := reg.ManifestGET; m.Requests > 0 {
			row := benchRow{Figure: fmt.Sprintf("%s manifest GET by tag, %d clients", reg.Name, m.Concurrency),
				Value: m.RPS, Unit: "req/s", Detail: fmt.Sprintf("p50 %.2f ms, p99 %.2f ms", m.P50Ms, m.P99Ms)}
			if target {
				if r.Distribution != nil && r.Distribution.ManifestGET.Requests > 0 {
					d := r.Distribution.ManifestGET.RPS
					compare(&row, "distribution manifest GET", d, m.RPS/d, true, targetManifestOfDistr)
				} else {
					row.Limit, row.Target, row.Result = "distribution manifest GET", fmt.Sprintf("≥ %.2f", targetManifestOfDistr), verdictNA
				}
			}
			if m.Errors > 0 {
				row.Result = verdictError
				row.Detail += fmt.Sprintf("; %d errors, first: %s", m.Errors, m.FirstError)
			}
			add(row)
			if target && l.Static != nil && l.Static.ManifestGET != nil && l.Static.ManifestGET.Requests > 0 {
				st := l.Static.ManifestGET
				row := benchRow{Figure: fmt.Sprintf("%s manifest GET by tag vs the same bytes as a static file", reg.Name), Value: m.RPS, Unit: "req/s",
					Detail: fmt.Sprintf("%s, no authentication: p50 %.2f ms, p99 %.2f ms", l.Static.Server, st.P50Ms, st.P99Ms)}
				compare(&row, "static file GET", st.RPS, pairedRatio(m.SlicesRPS, st.SlicesRPS), true, targetManifestOfNginx)
				judgeErrors(&row, m, *st)
				add(row)
			}
			if a := reg.ManifestGETAnonymous; a != nil && a.Requests > 0 {
				row := benchRow{Figure: reg.Name + " manifest GET by tag, bearer token vs anonymous", Value: m.RPS, Unit: "req/s",
					Detail: fmt.Sprintf("anonymous (pull granted to anonymous): p50 %.2f ms, p99 %.2f ms", a.P50Ms, a.P99Ms)}
				compare(&row, "anonymous manifest GET", a.RPS, pairedRatio(m.SlicesRPS, a.SlicesRPS), target, targetBearerOfAnon)
				if a.Errors > 0 {
					row.Detail += fmt.Sprintf("; %d anonymous errors, first: %s", a.Errors, a.FirstError)
				}
				if a.Errors > 0 || m.Errors > 0 {
					row.Result = verdictError
				}
				add(row)
			}
		}
		if tk := reg.TokenIssue; tk != nil && tk.Requests > 0 {
			row := benchRow{Figure: reg.Name + " token issuance", Value: tk.RPS, Unit: "tokens/s",
				Detail: fmt.Sprintf("%d clients, p50 %.2f ms, p99 %.2f ms; GET /auth/token, Basic credentials, scope repository:%s:pull",
					tk.Concurrency, tk.P50Ms, tk.P99Ms, benchRepo)}
			if tk.Errors > 0 {
				row.Result = verdictError
				row.Detail += fmt.Sprintf("; %d errors, first: %s", tk.Errors, tk.FirstError)
			}
			add(row)
		}
	}
	r.clusterRows(add)
	r.s3Rows(add)
	r.scaleRows(add)
}

// compareWithFaster judges the node's pull against the faster of
// Distribution's and the static file server's, run by run.
func (r *benchReport) compareWithFaster(row *benchRow) {
	m, l := r.Meridian, r.Limits
	var refs [][]float64
	var names []string
	if l.Static != nil && l.Static.Pull.Bytes > 0 {
		refs, names = append(refs, l.Static.Pull.RunsMBps), append(names, "static file server")
	}
	if d := r.Distribution; d != nil && d.Pull.Bytes > 0 {
		refs, names = append(refs, d.Pull.RunsMBps), append(names, "distribution")
	}
	if len(refs) == 0 {
		return
	}
	faster, name := fasterRuns(refs)
	limit := "faster of " + strings.Join(names, " and ")
	if len(names) == 1 {
		limit = names[0]
	}
	row.Detail = "faster reference: " + names[name]
	compare(row, limit, medianBy(faster, identity), pairedRatio(m.Pull.RunsMBps, faster), true, targetPullOfFaster)
}

// fasterRuns is, run by run, the highest of the references' figures, and
// which reference had the highest median.
func fasterRuns(refs [][]float64) (faster []float64, best int) {
	n := len(refs[0])
	for _, r := range refs {
		n = min(n, len(r))
	}
	faster = make([]float64, n)
	for i := range faster {
		for _, r := range refs {
			faster[i] = max(faster[i], r[i])
		}
	}
	for i, r := range refs {
		if medianBy(r, identity) > medianBy(refs[best], identity) {
			best = i
		}
	}
	return faster, best
}

// judgeErrors marks a row ERR when either load had failed requests.
func judgeErrors(row *benchRow, loads ...loadResult) {
	for _, l := range loads {
		if l.Errors > 0 {
			row.Result = verdictError
			row.Detail += fmt.Sprintf("; %d errors, first: %s", l.Errors, l.FirstError)
		}
	}
}

// clusterRows are the gateway, pull storm and tag commit rows.
func (r *benchReport) clusterRows(add func(benchRow)) {
	c := r.Cluster
	if c == nil {
		return
	}
	sec := c.Security
	if c.GatewayPull.Bytes > 0 && c.NodePull.Bytes > 0 {
		row := benchRow{Figure: fmt.Sprintf("gateway pull %s, file:// regions", mib(c.GatewayPull.Bytes)), Value: c.GatewayPull.MBps, Unit: "MB/s",
			Detail: fmt.Sprintf("GET + sha256 of a blob in the gateway's cache; standalone gateway in front of 3 nodes; reference: the node it prefers, %s; %s", c.PreferredNode, sec)}
		compare(&row, "the node it fronts", c.NodePull.MBps, pairedRatio(c.GatewayPull.RunsMBps, c.NodePull.RunsMBps), true, targetGatewayPullOfNode)
		add(row)
	}
	for _, p := range []struct {
		figure, detail string
		pull           pullResult
	}{
		{"first read of a blob", "a blob no one read through the gateway before, streamed uncached", c.GatewayColdPull},
		{"second read of a blob", "the gateway's blob cache fills as it streams", c.GatewayFillPull},
	} {
		if p.pull.Bytes == 0 || c.NodePull.Bytes == 0 {
			continue
		}
		row := benchRow{Figure: fmt.Sprintf("gateway pull %s, %s", mib(p.pull.Bytes), p.figure), Value: p.pull.MBps, Unit: "MB/s",
			Detail: fmt.Sprintf("GET + sha256; %s; reference: the node it prefers, %s; %s", p.detail, c.PreferredNode, sec)}
		compare(&row, "the node it fronts", c.NodePull.MBps, pairedRatio(p.pull.RunsMBps, c.NodePull.RunsMBps), true, targetGatewayPullOfNode)
		add(row)
	}
	if g, n := c.GatewayManifestGET, c.NodeManifestGET; g.Requests > 0 && n.Requests > 0 {
		row := benchRow{Figure: fmt.Sprintf("gateway manifest GET by tag, %d clients", g.Concurrency), Value: g.RPS, Unit: "req/s",
			Detail: fmt.Sprintf("bearer token; gateway p50 %.2f ms, p99 %.2f ms; node %s p50 %.2f ms, p99 %.2f ms; %s",
				g.P50Ms, g.P99Ms, c.PreferredNode, n.P50Ms, n.P99Ms, sec)}
		compare(&row, "the node it fronts", n.RPS, pairedRatio(g.SlicesRPS, n.SlicesRPS), true, targetGatewayManifestOfNode)
		judgeErrors(&row, g, n)
		add(row)
	}
	if c.GatewayStorm.Bytes > 0 && c.StaticStorm.Bytes > 0 {
		server := "static file server"
		if r.Limits.Static != nil {
			server = r.Limits.Static.Server
		}
		row := benchRow{Figure: fmt.Sprintf("pull storm: %d clients GET one %s blob, gateway", c.StormClients, mib(c.StormBytes)), Value: c.GatewayStorm.MBps, Unit: "MB/s",
			Detail: fmt.Sprintf("aggregate (clients × blob / time to the last byte), each body's length and CRC-32C checked; file:// region; reference: %s serving the same file to the same clients; %s", server, sec)}
		compare(&row, "static file server, same clients", c.StaticStorm.MBps, pairedRatio(c.GatewayStorm.RunsMBps, c.StaticStorm.RunsMBps), true, targetStormOfStatic)
		add(row)
	}
	if t := c.TagCommits; t != nil && (t.Requests > 0 || t.Errors > 0) {
		row := benchRow{Figure: fmt.Sprintf("tag commits, 3 nodes, %d writers through a follower", t.Concurrency), Value: t.RPS, Unit: "commits/s",
			Detail: fmt.Sprintf("manifest PUT by new tag to follower %s (leader %s), bearer token; p50 %.2f ms, p99 %.2f ms; %s",
				c.Follower, c.Leader, t.P50Ms, t.P99Ms, sec)}
		judgeTagCommits(&row, *t)
		add(row)
	}
	if c.Error != "" {
		add(benchRow{Figure: "cluster rows", Result: verdictError, Detail: c.Error})
	}
}

// judgeTagCommits holds the tag commit row to both of its targets: the rate
// and the median latency.
func judgeTagCommits(row *benchRow, t loadResult) {
	row.Target = fmt.Sprintf("≥ %d/s and p50 < %.0f ms", targetTagCommitsPerSec, targetTagCommitP50Ms)
	row.Result = verdictMissed
	if t.Requests > 0 && t.RPS >= targetTagCommitsPerSec && t.P50Ms < targetTagCommitP50Ms {
		row.Result = verdictMet
	}
	judgeErrors(row, t)
}

// s3Rows are the gateway's pull and push on an S3 region.
func (r *benchReport) s3Rows(add func(benchRow)) {
	s := r.S3
	if s == nil {
		return
	}
	if s.Skipped != "" {
		add(benchRow{Figure: "gateway on an S3 region", Result: verdictNA, Detail: "not measured: " + s.Skipped})
		return
	}
	if s.GatewayPull.Bytes > 0 && s.RawPull.Bytes > 0 {
		how := "streamed by the gateway"
		if s.PullRedirected {
			how = "redirected by the gateway to S3"
		}
		row := benchRow{Figure: fmt.Sprintf("gateway pull %s, S3 region (versitygw)", mib(s.GatewayPull.Bytes)), Value: s.GatewayPull.MBps, Unit: "MB/s",
			Detail: fmt.Sprintf("GET + sha256, %s; reference: minio-go GetObject of the same bytes, sha256 too; %s", how, s.Security)}
		compare(&row, "raw S3 GET (minio-go)", s.RawPull.MBps, pairedRatio(s.GatewayPull.RunsMBps, s.RawPull.RunsMBps), true, targetS3PullOfRaw)
		add(row)
	}
	if s.GatewayPush.Bytes > 0 && s.RawPush.Bytes > 0 {
		row := benchRow{Figure: fmt.Sprintf("gateway push %s, S3 region (versitygw)", mib(s.GatewayPush.Bytes)), Value: s.GatewayPush.MBps, Unit: "MB/s",
			Detail: fmt.Sprintf("one POST ?digest= to the 201; reference: minio-go PutObject of the same bytes (multipart, its default parts); %s", s.Security)}
		compare(&row, "raw S3 multipart PUT (minio-go)", s.RawPush.MBps, pairedRatio(s.GatewayPush.RunsMBps, s.RawPush.RunsMBps), true, targetS3PushOfRaw)
		add(row)
	}
	if s.Error != "" {
		add(benchRow{Figure: "S3 rows", Result: verdictError, Detail: s.Error})
	}
}

// compare fills in a row's limit and ratio and, for a figure with a target,
// the verdict.
func compare(row *benchRow, limit string, limitValue, ratio float64, target bool, want float64) {
	row.Limit, row.LimitValue, row.Ratio = limit, limitValue, ratio
	if !target {
		return
	}
	row.Target = fmt.Sprintf("≥ %.2f", want)
	row.Result = verdictMissed
	if row.Ratio >= want {
		row.Result = verdictMet
	}
}

// pairedRatio is the median of values[i]/limits[i], run i of a figure
// having been measured right after run i of its limit. Without a full
// pairing it is the ratio of the medians.
func pairedRatio(values, limits []float64) float64 {
	if len(values) == 0 || len(limits) == 0 {
		return 0
	}
	if len(values) != len(limits) {
		return medianBy(values, identity) / medianBy(limits, identity)
	}
	ratios := make([]float64, len(values))
	for i := range values {
		ratios[i] = values[i] / limits[i]
	}
	return medianBy(ratios, identity)
}

func identity(x float64) float64 { return x }

func (r *benchReport) writeTable(w io.Writer) {
	e := r.Environment
	fmt.Fprintf(w, "\nmeridian bench: meridian %s, %s %s/%s, %d CPUs, dir %s\n", e.MeridianVersion, e.GoVersion, e.OS, e.Arch, e.CPUs, e.Dir)
	if e.LoadAvgStart != "" {
		fmt.Fprintf(w, "load average at start: %s; at end: %s\n", e.LoadAvgStart, e.LoadAvgEnd)
	}
	if busy(e.LoadAvgStart, e.CPUs) || busy(e.LoadAvgEnd, e.CPUs) {
		fmt.Fprintf(w, "WARNING: the machine had more runnable work than its %d CPUs; the figures, the CPU-bound ones most, are unreliable.\n", e.CPUs)
	}
	if r.Scale != nil {
		fmt.Fprintf(w, "scale run: %d tags in one repository\n\n", r.Scale.Tags)
	} else {
		fmt.Fprintf(w, "blob %s (chunks %s), median of %d runs, manifest GET load %d clients for %s\n\n", mib(r.SizeBytes), mib(r.ChunkBytes), r.Runs, r.Concurrency, r.LoadDuration)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "FIGURE\tVALUE\tCOMPARED WITH\tLIMIT\tRATIO\tTARGET\tRESULT")
	for _, row := range r.Rows {
		limit, ratio := "", ""
		if row.Limit != "" && row.LimitValue > 0 {
			limit, ratio = formatValue(row.LimitValue, row.Unit), fmt.Sprintf("%.2f", row.Ratio)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", row.Figure, formatValue(row.Value, row.Unit), row.Limit, limit, ratio, row.Target, row.Result)
	}
	tw.Flush()
	fmt.Fprintln(w)
	for _, row := range r.Rows {
		if row.Detail != "" {
			fmt.Fprintf(w, "  %s: %s\n", row.Figure, row.Detail)
		}
	}
	if r.Limits.Static != nil || r.Meridian != nil {
		fmt.Fprintf(w, "\nMB = 10^6 bytes. Each figure is the median of %d runs (the JSON has every run). Runs of a push or\n", r.Runs)
		fmt.Fprintln(w, "pull and of its limit alternate, and the ratio is the median of the per-run ratios; the manifest loads")
		fmt.Fprintln(w, "(Meridian with a bearer token and anonymously, Distribution) alternate in slices of about 2 s; bearer")
		fmt.Fprintln(w, "vs anonymous is the median of the per-slice ratios.")
		fmt.Fprintln(w, "Meridian authenticates every request (the admin's Basic credentials for pushes and pulls); Distribution")
		fmt.Fprintln(w, "runs without authentication. Token issuance is measured after the loads.")
		fmt.Fprintln(w, "Pulls: the client hashes every body with sha256 and checks it.")
		fmt.Fprintln(w, "Pushes: timed from the first request to the 201, which follows the server's fsync.")
	}
	if r.Cluster != nil || r.S3 != nil {
		fmt.Fprintln(w, "Cluster rows: `meridian serve` and `meridian gateway` processes of this binary, set up as `meridian dev`")
		fmt.Fprintln(w, "sets up its cluster (own CA, mutual TLS, encrypted gossip, authentication on), each figure interleaved run")
		fmt.Fprintln(w, "by run (load slice by slice) with its reference; any failed request makes a row ERR, never throughput.")
	}
	if r.DistributionSkipped != "" {
		fmt.Fprintf(w, "Distribution not measured: %s\n", r.DistributionSkipped)
	}
	if r.Error != "" {
		fmt.Fprintln(w, "The run failed before it finished; see the error below.")
	}
}

func formatValue(v float64, unit string) string {
	switch unit {
	case "": // a row that only carries a verdict and its reason
		return ""
	case "req/s", "tokens/s", "commits/s", "MiB":
		return fmt.Sprintf("%.0f %s", v, unit)
	case "ms", "s":
		return fmt.Sprintf("%.2f %s", v, unit)
	}
	return fmt.Sprintf("%.1f %s", v, unit)
}

func (r *benchReport) writeJSON(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}
