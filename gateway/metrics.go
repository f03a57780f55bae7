package gateway

import (
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the gateway's request counters and latencies.
type metrics struct {
	requests *prometheus.HistogramVec
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
	}
	if reg != nil {
		if err := reg.Register(m.requests); err != nil {
			return nil, err
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
