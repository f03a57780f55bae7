package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// profileDuring records CPU profiles of the members named in bases (name →
// base URL) from their /debug/pprof/profile endpoints, with the cluster
// admin's credentials, for the next d, into dir as NAME.pprof. The
// returned wait blocks until they are written and returns the first
// error. With dir empty it records nothing.
func (c *benchCluster) profileDuring(ctx context.Context, dir string, d time.Duration, bases map[string]string) (wait func() error) {
	if dir == "" {
		return func() error { return nil }
	}
	var wg sync.WaitGroup
	errs := make(chan error, len(bases))
	for name, base := range bases {
		wg.Go(func() {
			if err := c.profileOne(ctx, base, d, filepath.Join(dir, name+".pprof")); err != nil {
				errs <- fmt.Errorf("bench: profile of %s: %w", name, err)
			}
		})
	}
	return func() error {
		wg.Wait()
		close(errs)
		return <-errs
	}
}

func (c *benchCluster) profileOne(ctx context.Context, base string, d time.Duration, path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	secs := max(1, int(d.Round(time.Second)/time.Second))
	hc := c.adminClient(base, 1)
	defer hc.CloseIdleConnections()
	hc.Timeout = time.Duration(secs)*time.Second + 30*time.Second
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("%s/debug/pprof/profile?seconds=%d", base, secs), nil)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("%s: %s", resp.Status, b)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
