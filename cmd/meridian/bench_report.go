package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"
)

// Meridian's performance targets for a single node.
const (
	targetPushOfDisk      = 0.80 // push ≥ 80% of the fsync'd write rate
	targetPullOfStatic    = 0.90 // pull ≥ 90% of the static file server
	targetManifestOfDistr = 3.0  // manifest GET by tag ≥ 3× Distribution
	targetBearerOfAnon    = 0.90 // with a bearer token ≥ 90% of anonymous
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
	Result     string  `json:"result,omitempty"` // PASS, MISS, ERR or n/a
}

func newBenchReport(opts benchOptions, root string) *benchReport {
	return &benchReport{
		Environment: currentEnvironment(root), Started: time.Now().UTC(),
		SizeBytes: opts.size, ChunkBytes: opts.chunk,
		LoadDuration: opts.duration.String(), Concurrency: opts.concurrency, Runs: opts.runs,
	}
}

// buildRows turns the measurements into the table, with a PASS/MISS for each
// target whose figure and limit were both measured.
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
		}
		if reg.Pull.Bytes > 0 {
			row := benchRow{Figure: reg.Name + " pull, GET + sha256", Value: reg.Pull.MBps, Unit: "MB/s"}
			if l.Static != nil {
				compare(&row, "static file server", l.Static.Pull.MBps, pairedRatio(reg.Pull.RunsMBps, l.Static.Pull.RunsMBps), target, targetPullOfStatic)
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
					row.Limit, row.Target, row.Result = "distribution manifest GET", fmt.Sprintf("≥ %.2f", targetManifestOfDistr), "n/a"
				}
			}
			if m.Errors > 0 {
				row.Result = "ERR"
				row.Detail += fmt.Sprintf("; %d errors, first: %s", m.Errors, m.FirstError)
			}
			add(row)
			if a := reg.ManifestGETAnonymous; a != nil && a.Requests > 0 {
				row := benchRow{Figure: reg.Name + " manifest GET by tag, bearer token vs anonymous", Value: m.RPS, Unit: "req/s",
					Detail: fmt.Sprintf("anonymous (pull granted to anonymous): p50 %.2f ms, p99 %.2f ms", a.P50Ms, a.P99Ms)}
				compare(&row, "anonymous manifest GET", a.RPS, pairedRatio(m.SlicesRPS, a.SlicesRPS), target, targetBearerOfAnon)
				if a.Errors > 0 {
					row.Detail += fmt.Sprintf("; %d anonymous errors, first: %s", a.Errors, a.FirstError)
				}
				if a.Errors > 0 || m.Errors > 0 {
					row.Result = "ERR"
				}
				add(row)
			}
		}
		if tk := reg.TokenIssue; tk != nil && tk.Requests > 0 {
			row := benchRow{Figure: reg.Name + " token issuance", Value: tk.RPS, Unit: "tokens/s",
				Detail: fmt.Sprintf("%d clients, p50 %.2f ms, p99 %.2f ms; GET /auth/token, Basic credentials, scope repository:%s:pull",
					tk.Concurrency, tk.P50Ms, tk.P99Ms, benchRepo)}
			if tk.Errors > 0 {
				row.Result = "ERR"
				row.Detail += fmt.Sprintf("; %d errors, first: %s", tk.Errors, tk.FirstError)
			}
			add(row)
		}
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
	row.Result = "MISS"
	if row.Ratio >= want {
		row.Result = "PASS"
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
	fmt.Fprintf(w, "blob %s (chunks %s), median of %d runs, manifest GET load %d clients for %s\n\n", mib(r.SizeBytes), mib(r.ChunkBytes), r.Runs, r.Concurrency, r.LoadDuration)
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
	if r.DistributionSkipped != "" {
		fmt.Fprintf(w, "Distribution not measured: %s\n", r.DistributionSkipped)
	}
	if r.Error != "" {
		fmt.Fprintln(w, "The run failed before it finished; see the error below.")
	}
}

func formatValue(v float64, unit string) string {
	if unit == "req/s" || unit == "tokens/s" {
		return fmt.Sprintf("%.0f %s", v, unit)
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
