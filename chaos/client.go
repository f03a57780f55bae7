package chaos

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"
)

const mediaTypeManifest = "application/vnd.oci.image.manifest.v1+json"

// Credentials are an account's login, sent as HTTP Basic.
type Credentials struct{ User, Password string }

// registryClient speaks the OCI Distribution API over plain HTTP, the way
// any client would; it records nothing itself.
type registryClient struct {
	http    *http.Client
	timeout time.Duration // per request
	// login is sent with every request that carries no Authorization
	// of its own (none: anonymous).
	login Credentials
}

func newRegistryClient(timeout time.Duration, login Credentials) *registryClient {
	tr := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 3 * time.Second}).DialContext,
		MaxIdleConnsPerHost: 32,
		IdleConnTimeout:     30 * time.Second,
		// A gateway that stops answering must not hold a worker forever.
		ResponseHeaderTimeout: timeout,
	}
	return &registryClient{http: &http.Client{Transport: tr}, timeout: timeout, login: login}
}

// reply is what one request got back.
type reply struct {
	status int
	header http.Header
	body   []byte
	sum    string // sha256 digest of body
}

// do sends one request to gw and reads the whole answer. body may be nil.
func (c *registryClient) do(ctx context.Context, gw Endpoint, method, path string, hdr http.Header, body []byte) (reply, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, gw.URL+path, rd)
	if err != nil {
		return reply{}, err
	}
	for k, vs := range hdr {
		req.Header[k] = vs
	}
	// Basic on every request: the registry caches a verified password,
	// and Basic needs no token round trip that a fault could break.
	if req.Header.Get("Authorization") == "" && c.login.User != "" {
		req.SetBasicAuth(c.login.User, c.login.Password)
	}
	if body != nil {
		req.ContentLength = int64(len(body))
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return reply{}, err
	}
	defer resp.Body.Close()
	h := sha256.New()
	var buf bytes.Buffer
	// Manifests and error bodies are small; blobs are hashed, not kept.
	keep := method != http.MethodGet || !strings.Contains(path, "/blobs/")
	var w io.Writer = h
	if keep {
		w = io.MultiWriter(h, &buf)
	}
	if _, err := io.Copy(w, resp.Body); err != nil {
		return reply{status: resp.StatusCode, header: resp.Header}, fmt.Errorf("reading body: %w", err)
	}
	return reply{status: resp.StatusCode, header: resp.Header, body: buf.Bytes(), sum: "sha256:" + hex.EncodeToString(h.Sum(nil))}, nil
}

// outcomeOf classifies a write's answer: 2xx acknowledged, 5xx or no answer
// unknown, anything else a definite refusal.
func outcomeOf(r reply, err error) Outcome {
	switch {
	case err != nil || r.status >= 500 || r.status == http.StatusTooManyRequests:
		return OutcomeUnknown
	case r.status >= 200 && r.status < 300:
		return OutcomeOK
	}
	return OutcomeFail
}

// transient reports whether a request is worth retrying elsewhere.
func transient(r reply, err error) bool {
	return err != nil || r.status >= 500 || r.status == http.StatusTooManyRequests
}

// errText describes a failed request for the history.
func errText(r reply, err error) string {
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return "timeout: " + err.Error()
		}
		return err.Error()
	}
	if r.status >= 300 {
		msg := strings.TrimSpace(string(r.body))
		if len(msg) > 200 {
			msg = msg[:200] + "…"
		}
		return fmt.Sprintf("HTTP %d %s", r.status, msg)
	}
	return ""
}

// basicAuth is the Authorization header value of cred.
func basicAuth(cred Credentials) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(cred.User+":"+cred.Password))
}

func sha256Digest(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}
