package gateway

import (
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the gateway's request counters and latencies.
type metrics struct {
	requests      *prometheus.HistogramVec
	blobReads     *prometheus.CounterVec
	blobReadBytes *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		requests: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "meridian",
			Subsystem: "gateway",
			Name:      "request_duration_seconds",
			Help:      "OCI API requests by endpoint, method and status code.",
			Buckets:   []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, []string{"endpoint", "method", "code"}),
		blobReads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "meridian", Subsystem: "gateway", Name: "blob_reads_total",
			Help: "Blob GETs by the region whose store served them, streamed or redirected to a presigned URL.",
		}, []string{"region", "how"}),
		blobReadBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "meridian", Subsystem: "gateway", Name: "blob_read_bytes_total",
			Help: "Blob bytes streamed to clients by the region whose store served them.",
		}, []string{"region"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.requests, m.blobReads, m.blobReadBytes} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}

func (m *metrics) observe(kind routeKind, method string, code int, d time.Duration) {
	endpoint := "invalid"
	if kind != 0 {
		endpoint = kind.String()
	}
	m.requests.WithLabelValues(endpoint, method, strconv.Itoa(code)).Observe(d.Seconds())
}
