package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"time"
)

// The OCI Distribution API calls of the workload, as a client would make
// them: every body streamed, every response read to the end so that the
// connection is reused.

func sha256Digest(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// uploadsURL is where uploads to the bench repository start.
func uploadsURL(base string) string { return base + "/v2/" + benchRepo + "/blobs/uploads/" }

// pushSmall pushes a small blob with POST ?digest= and reports whether the
// registry stored it that way (201). A registry that opens a session instead
// (202, as the spec allows) gets the blob with a PUT to that session.
func pushSmall(ctx context.Context, c *http.Client, base string, blob []byte, digest string) (bool, error) {
	resp, err := send(ctx, c, http.MethodPost, uploadsURL(base)+"?digest="+digest, bytes.NewReader(blob), int64(len(blob)), nil)
	if err != nil {
		return false, err
	}
	switch resp.StatusCode {
	case http.StatusCreated:
		return true, nil
	case http.StatusAccepted:
		loc, err := location(resp, base, digest)
		if err != nil {
			return false, err
		}
		resp, err := send(ctx, c, http.MethodPut, loc, bytes.NewReader(blob), int64(len(blob)), nil)
		if err != nil {
			return false, err
		}
		return false, expect(resp, http.StatusCreated, "PUT")
	}
	return false, statusError("POST ?digest=", resp)
}

// pushMonolithic sends the whole blob in one request body: POST ?digest=, or
// POST then PUT ?digest= when the registry does not take the former. It
// returns when the last body byte went to the socket.
func pushMonolithic(ctx context.Context, c *http.Client, base string, b blobSpec, postDigest bool) (time.Time, error) {
	method, loc := http.MethodPost, uploadsURL(base)+"?digest="+b.digest
	if !postDigest {
		var err error
		if loc, err = startSession(ctx, c, base, b.digest); err != nil {
			return time.Time{}, err
		}
		method = http.MethodPut
	}
	body := b.reader()
	resp, err := send(ctx, c, method, loc, body, b.size, nil)
	if err != nil {
		return time.Time{}, err
	}
	return body.done, expect(resp, http.StatusCreated, method+" ?digest=")
}

// pushChunked sends the blob as PATCHes of chunk bytes with Content-Range,
// following each response's Location, then completes it with an empty PUT.
// It returns when the last PATCH was answered.
func pushChunked(ctx context.Context, c *http.Client, base string, b blobSpec, chunk int64) (time.Time, error) {
	fail := func(err error) (time.Time, error) { return time.Time{}, err }
	loc, err := startSession(ctx, c, base, "")
	if err != nil {
		return fail(err)
	}
	r := b.reader()
	for off := int64(0); off < b.size; off += chunk {
		n := min(chunk, b.size-off)
		hdr := http.Header{"Content-Range": {strconv.FormatInt(off, 10) + "-" + strconv.FormatInt(off+n-1, 10)}}
		resp, err := send(ctx, c, http.MethodPatch, loc, io.LimitReader(r, n), n, hdr)
		if err != nil {
			return fail(err)
		}
		if resp.StatusCode != http.StatusAccepted {
			return fail(statusError("PATCH", resp))
		}
		if loc, err = location(resp, base, ""); err != nil {
			return fail(err)
		}
	}
	dataDone := time.Now()
	loc, err = withDigest(loc, b.digest)
	if err != nil {
		return fail(err)
	}
	resp, err := send(ctx, c, http.MethodPut, loc, nil, 0, nil)
	if err != nil {
		return fail(err)
	}
	return dataDone, expect(resp, http.StatusCreated, "PUT ?digest=")
}

// startSession opens an upload session and returns its Location, with
// ?digest= added when digest is set.
func startSession(ctx context.Context, c *http.Client, base, digest string) (string, error) {
	resp, err := send(ctx, c, http.MethodPost, uploadsURL(base), nil, 0, nil)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusAccepted {
		return "", statusError("POST", resp)
	}
	return location(resp, base, digest)
}

// location resolves a response's Location against base (registries send
// absolute or path-only URLs) and adds ?digest= when digest is set.
func location(resp *http.Response, base, digest string) (string, error) {
	loc := resp.Header.Get("Location")
	if loc == "" {
		return "", fmt.Errorf("%s answered %s without a Location", resp.Request.Method, resp.Status)
	}
	b, err := url.Parse(base)
	if err != nil {
		return "", err
	}
	u, err := b.Parse(loc)
	if err != nil {
		return "", fmt.Errorf("bad Location %q: %w", loc, err)
	}
	if digest == "" {
		return u.String(), nil
	}
	return withDigest(u.String(), digest)
}

func withDigest(loc, digest string) (string, error) {
	u, err := url.Parse(loc)
	if err != nil {
		return "", err
	}
	q := u.Query()
	q.Set("digest", digest)
	u.RawQuery = q.Encode()
	return u.String(), nil
}

// send makes one request with a streamed body of n bytes and returns the
// response with its body read and closed, so the connection is reused.
func send(ctx context.Context, c *http.Client, method, url string, body io.Reader, n int64, hdr http.Header) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, url, body)
	if err != nil {
		return nil, err
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	req.ContentLength = n
	if n == 0 {
		req.Body = http.NoBody
	}
	if body != nil && n > 0 && req.Header.Get("Content-Type") == "" {
		req.Header.Set("Content-Type", "application/octet-stream")
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	// Keep the start of an error body for the message; drain the rest.
	resp.Body = readBody(resp.Body)
	return resp, nil
}

func readBody(rc io.ReadCloser) io.ReadCloser {
	defer rc.Close()
	b, _ := io.ReadAll(io.LimitReader(rc, 64<<10))
	io.Copy(io.Discard, rc)
	return io.NopCloser(bytes.NewReader(b))
}

func expect(resp *http.Response, status int, what string) error {
	if resp.StatusCode != status {
		return statusError(what, resp)
	}
	return nil
}

func statusError(what string, resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	return fmt.Errorf("%s %s: %s: %s", what, resp.Request.URL.Redacted(), resp.Status, bytes.TrimSpace(b))
}

const mediaTypeManifest = "application/vnd.oci.image.manifest.v1+json"

// imageManifest is an OCI image manifest with one config and one layer.
func imageManifest(configDigest string, configSize int64, layer blobSpec) []byte {
	type desc struct {
		MediaType string `json:"mediaType"`
		Digest    string `json:"digest"`
		Size      int64  `json:"size"`
	}
	m, _ := json.Marshal(struct {
		SchemaVersion int    `json:"schemaVersion"`
		MediaType     string `json:"mediaType"`
		Config        desc   `json:"config"`
		Layers        []desc `json:"layers"`
	}{2, mediaTypeManifest,
		desc{"application/vnd.oci.image.config.v1+json", configDigest, configSize},
		[]desc{{"application/vnd.oci.image.layer.v1.tar", layer.digest, layer.size}}})
	return m
}

func putManifest(ctx context.Context, c *http.Client, base string, m []byte) error {
	resp, err := send(ctx, c, http.MethodPut, base+"/v2/"+benchRepo+"/manifests/"+benchTag, bytes.NewReader(m), int64(len(m)),
		http.Header{"Content-Type": {mediaTypeManifest}})
	if err != nil {
		return err
	}
	return expect(resp, http.StatusCreated, "PUT manifest")
}

var errShortManifest = errors.New("manifest body has the wrong length")

func getManifest(ctx context.Context, c *http.Client, url, authorization string, buf []byte, wantLen int) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", mediaTypeManifest)
	if authorization != "" {
		req.Header.Set("Authorization", authorization)
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return statusError("GET manifest", resp)
	}
	n, err := io.ReadFull(resp.Body, buf)
	if err != io.ErrUnexpectedEOF || n != wantLen {
		if err == nil || err == io.EOF {
			err = errShortManifest
		}
		return fmt.Errorf("GET manifest: %d bytes: %w", n, err)
	}
	return nil
}
