package s3test

import (
	"context"
	"fmt"
	"html"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
)

// Mode is what a FaultProxy does with requests.
type Mode int

const (
	// Pass forwards requests to the target.
	Pass Mode = iota
	// Fail answers every request with an S3 error: 503 ServiceUnavailable
	// unless SetFailure chose another.
	Fail
	// Stall holds requests, unanswered, until the mode changes (they are
	// then handled in the new mode) or the client gives up. net/http notices
	// a client that gave up only once the request body has been read, so a
	// held request with an unread body may still be forwarded after its
	// client left, like a request delayed in the network: stores must cope.
	Stall
	// Cut closes the connection of every request without an answer, and
	// aborts requests in flight when the mode is set.
	Cut
)

func (m Mode) String() string {
	switch m {
	case Pass:
		return "pass"
	case Fail:
		return "fail"
	case Stall:
		return "stall"
	case Cut:
		return "cut"
	}
	return "unknown"
}

// FaultProxy is an HTTP reverse proxy on a loopback port whose behaviour
// can be changed while requests flow. Bodies are streamed both ways.
//
// The proxy forwards each request with its Host header unchanged. S3 clients
// sign the Host they connect to (SigV4), so a client pointed at the proxy
// signs the proxy's address; versitygw checks the signature against the Host
// header it receives, not against its own listening address, so it accepts
// the forwarded request.
type FaultProxy struct {
	addr  string
	srv   *http.Server
	proxy *httputil.ReverseProxy

	mu         sync.Mutex
	mode       Mode
	failStatus int
	failCode   string
	filter     func(*http.Request) bool         // requests the mode applies to; nil: all
	observer   func(*http.Request)              // sees every request; nil: none
	changed    chan struct{}                    // closed and replaced by SetMode
	inflight   map[*context.CancelFunc]struct{} // forwarded requests, aborted by Cut

	requests, forwarded, failed, cut atomic.Int64
}

// NewFaultProxy starts a proxy in Pass mode in front of target (host:port,
// plain HTTP) and closes it in tb.Cleanup.
func NewFaultProxy(tb testing.TB, target string) *FaultProxy {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatalf("s3test: proxy listener: %v", err)
	}
	p := &FaultProxy{
		addr:       l.Addr().String(),
		failStatus: http.StatusServiceUnavailable,
		failCode:   "ServiceUnavailable",
		changed:    make(chan struct{}),
		inflight:   map[*context.CancelFunc]struct{}{},
	}
	targetURL := &url.URL{Scheme: "http", Host: target}
	p.proxy = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(targetURL)
			pr.Out.Host = pr.In.Host // the Host the client signed
		},
		ErrorLog: log.New(io.Discard, "", 0), // cuts are the point, not news
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			if r.Context().Err() != nil {
				panic(http.ErrAbortHandler) // cut: drop the client's connection
			}
			w.WriteHeader(http.StatusBadGateway)
		},
	}
	p.srv = &http.Server{Handler: http.HandlerFunc(p.serve)}
	go p.srv.Serve(l)
	tb.Cleanup(p.Close)
	return p
}

// Addr is the proxy's host:port, to use as the client's endpoint.
func (p *FaultProxy) Addr() string { return p.addr }

// SetMode changes what the proxy does from now on. Stalled requests wake up
// and follow the new mode; Cut also aborts requests being forwarded.
func (p *FaultProxy) SetMode(m Mode) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.mode = m
	close(p.changed)
	p.changed = make(chan struct{})
	if m == Cut {
		for cancel := range p.inflight {
			(*cancel)()
		}
	}
}

// SetFilter makes the mode apply only to requests f accepts (e.g. only
// PUTs, as with a full disk); the others pass. nil applies it to all.
func (p *FaultProxy) SetFilter(f func(*http.Request) bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.filter = f
}

// SetObserver makes the proxy call f with every request it receives, before
// the mode applies, e.g. to count requests of some kind. f sees the method,
// URL and headers; it must not read the body. nil removes it.
func (p *FaultProxy) SetObserver(f func(*http.Request)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.observer = f
}

// SetFailure sets the HTTP status and S3 error code that Fail mode answers
// with, e.g. 500 InternalError or 507 XMinioStorageFull.
func (p *FaultProxy) SetFailure(status int, code string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.failStatus, p.failCode = status, code
}

// Requests is the number of requests the proxy received.
func (p *FaultProxy) Requests() int64 { return p.requests.Load() }

// Forwarded is the number of requests passed to the target.
func (p *FaultProxy) Forwarded() int64 { return p.forwarded.Load() }

// Failed is the number of requests answered with the fail status.
func (p *FaultProxy) Failed() int64 { return p.failed.Load() }

// CutCount is the number of requests whose connection was cut.
func (p *FaultProxy) CutCount() int64 { return p.cut.Load() }

// Close stops the proxy and drops its connections.
func (p *FaultProxy) Close() {
	p.SetMode(Cut)
	p.srv.Close()
}

func (p *FaultProxy) serve(w http.ResponseWriter, r *http.Request) {
	p.requests.Add(1)
	p.mu.Lock()
	observe := p.observer
	p.mu.Unlock()
	if observe != nil {
		observe(r)
	}
	for {
		p.mu.Lock()
		mode, status, code, changed := p.mode, p.failStatus, p.failCode, p.changed
		if p.filter != nil && !p.filter(r) {
			mode = Pass
		}
		p.mu.Unlock()
		switch mode {
		case Pass:
			p.forward(w, r)
			return
		case Fail:
			p.failed.Add(1)
			w.Header().Set("Content-Type", "application/xml")
			w.WriteHeader(status)
			fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?><Error><Code>%s</Code>`+
				`<Message>s3test: fault proxy in fail mode</Message></Error>`, html.EscapeString(code))
			return
		case Stall:
			select {
			case <-changed:
				continue
			case <-r.Context().Done():
				return
			}
		default: // Cut
			p.cut.Add(1)
			panic(http.ErrAbortHandler)
		}
	}
}

// forward passes r to the target under a context that Cut cancels.
func (p *FaultProxy) forward(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	p.mu.Lock()
	p.inflight[&cancel] = struct{}{}
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.inflight, &cancel)
		p.mu.Unlock()
	}()
	p.forwarded.Add(1)
	p.proxy.ServeHTTP(w, r.WithContext(ctx))
	if ctx.Err() != nil && r.Context().Err() == nil {
		p.cut.Add(1)
		panic(http.ErrAbortHandler) // cut mid-response: the client must see a broken connection
	}
}
