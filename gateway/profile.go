package gateway

import (
	"net/http"
	"net/http/pprof"
)

// ProfileHandler serves Go's runtime profiles under /debug/pprof/ (CPU,
// heap, goroutines, mutex and block contention, execution traces), for
// `go tool pprof http://HOST/debug/pprof/profile?seconds=30`. Nodes and
// gateways mount it for cluster admins only: profiles show what the
// process does and hold strings from its memory.
func ProfileHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}
