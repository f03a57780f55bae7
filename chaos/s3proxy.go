package chaos

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
	"time"
)

// S3Mode is what an S3Proxy does with requests.
type S3Mode string

const (
	// S3Pass forwards requests to the server.
	S3Pass S3Mode = "pass"
	// S3Error answers every request 503 with an S3 error body
	// (ServiceUnavailable), as an overloaded or failing S3 does.
	S3Error S3Mode = "error"
	// S3Stall holds requests without an answer until the mode changes
	// (they then follow the new mode), the client gives up or the proxy
	// closes. net/http notices a client that gave up only once the
	// request body was read, so a held request with an unread body may
	// still be forwarded after its client left, like a request delayed in
	// the network.
	S3Stall S3Mode = "stall"
)

// S3Proxy is an HTTP reverse proxy in front of one S3 server, whose mode
// can change while requests flow. Nodes and gateways use its address as
// the region's S3 endpoint. It forwards the Host header unchanged (clients
// sign the Host they connect to, and versitygw checks the signature against
// the Host it receives). When the server is down, a forwarded request's
// connection is dropped, as a refused connection would be.
type S3Proxy struct {
	addr   string
	srv    *http.Server
	proxy  *httputil.ReverseProxy
	closed chan struct{}
	once   sync.Once

	mu      sync.Mutex
	mode    S3Mode
	changed chan struct{}

	requests, forwarded, failed, stalled, abandoned atomic.Int64
}

// NewS3Proxy starts a proxy in pass mode on listen (host:port; port 0
// picks one) in front of target, the S3 server's host:port (plain HTTP).
func NewS3Proxy(listen, target string) (*S3Proxy, error) {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, fmt.Errorf("chaos: s3 proxy: %w", err)
	}
	p := &S3Proxy{addr: ln.Addr().String(), mode: S3Pass, changed: make(chan struct{}), closed: make(chan struct{})}
	targetURL := &url.URL{Scheme: "http", Host: target}
	p.proxy = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(targetURL)
			pr.Out.Host = pr.In.Host // the Host the client signed
		},
		Transport: &http.Transport{
			Proxy:               nil,
			DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
			MaxIdleConnsPerHost: 64,
			IdleConnTimeout:     30 * time.Second,
		},
		FlushInterval: -1,
		ErrorLog:      log.New(io.Discard, "", 0),
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			// The server is unreachable or broke off: drop the client's
			// connection rather than invent an answer.
			panic(http.ErrAbortHandler)
		},
	}
	p.srv = &http.Server{Handler: http.HandlerFunc(p.serve), ErrorLog: log.New(io.Discard, "", 0), ReadHeaderTimeout: 30 * time.Second}
	go p.srv.Serve(ln)
	return p, nil
}

// Addr is the proxy's host:port, the endpoint to give clients.
func (p *S3Proxy) Addr() string { return p.addr }

// Mode is the current mode.
func (p *S3Proxy) Mode() S3Mode {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.mode
}

// SetMode changes what the proxy does from now on; stalled requests wake
// up and follow the new mode.
func (p *S3Proxy) SetMode(m S3Mode) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.mode = m
	close(p.changed)
	p.changed = make(chan struct{})
}

// S3ProxyStats counts what the proxy did. Stalled counts the requests it
// held, Abandoned those of them whose client gave up while held (they
// never reach the server).
type S3ProxyStats struct{ Requests, Forwarded, Failed, Stalled, Abandoned int64 }

// Stats returns the proxy's counters.
func (p *S3Proxy) Stats() S3ProxyStats {
	return S3ProxyStats{p.requests.Load(), p.forwarded.Load(), p.failed.Load(), p.stalled.Load(), p.abandoned.Load()}
}

// Close stops the proxy: stalled requests end, connections close.
func (p *S3Proxy) Close() error {
	p.once.Do(func() {
		close(p.closed)
		p.srv.Close()
	})
	return nil
}

func (p *S3Proxy) serve(w http.ResponseWriter, r *http.Request) {
	p.requests.Add(1)
	counted := false
	for {
		p.mu.Lock()
		mode, changed := p.mode, p.changed
		p.mu.Unlock()
		switch mode {
		case S3Error:
			p.failed.Add(1)
			w.Header().Set("Content-Type", "application/xml")
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusServiceUnavailable)
			io.WriteString(w, `<?xml version="1.0" encoding="UTF-8"?>`+"\n"+
				`<Error><Code>ServiceUnavailable</Code><Message>chaos: S3 fault proxy in error mode</Message>`+
				`<Resource>`+html.EscapeString(r.URL.Path)+`</Resource><RequestId>chaos</RequestId></Error>`)
			return
		case S3Stall:
			if !counted {
				p.stalled.Add(1)
				counted = true
			}
			select {
			case <-changed:
				continue
			case <-r.Context().Done():
				p.abandoned.Add(1)
				return
			case <-p.closed:
				panic(http.ErrAbortHandler)
			}
		default:
			p.forwarded.Add(1)
			ctx, cancel := context.WithCancel(r.Context())
			go func() {
				select {
				case <-p.closed:
					cancel()
				case <-ctx.Done():
				}
			}()
			p.proxy.ServeHTTP(w, r.WithContext(ctx))
			cancel()
			return
		}
	}
}
