package gateway

import (
	"io"
	"net/http"
	"time"
)

// WithBodyIdleTimeout fails a request whose body stalls for longer than d
// between reads. Uploads may take hours, so a whole-request deadline would be
// wrong; a client that stops sending (slow loris) still frees its connection.
func WithBodyIdleTimeout(next http.Handler, d time.Duration) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Body != nil && r.Body != http.NoBody {
			rc := http.NewResponseController(w)
			r.Body = &idleTimeoutBody{ReadCloser: r.Body, rc: rc, d: d}
		}
		next.ServeHTTP(w, r)
	})
}

type idleTimeoutBody struct {
	io.ReadCloser
	rc *http.ResponseController
	d  time.Duration
}

func (b *idleTimeoutBody) Read(p []byte) (int, error) {
	b.rc.SetReadDeadline(time.Now().Add(b.d))
	return b.ReadCloser.Read(p)
}
