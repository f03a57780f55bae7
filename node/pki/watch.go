package pki

import (
	"log/slog"
	"os"
	"slices"
	"sync"
	"time"
)

// recheckEvery is how often a watched value looks at its files'
// modification times again: at most once per interval, when it is used
// (on a handshake).
const recheckEvery = time.Second

type stamp struct {
	mod  time.Time
	size int64
}

func stampsOf(files []string) ([]stamp, error) {
	out := make([]stamp, len(files))
	for i, f := range files {
		st, err := os.Stat(f)
		if err != nil {
			return nil, err
		}
		out[i] = stamp{st.ModTime(), st.Size()}
	}
	return out, nil
}

// watched is a value loaded from files and loaded again when one of them
// changes, so certificates rotate without a restart. A change that does
// not load (a certificate that does not match the new key yet, a
// half-written rotation) keeps the last good value and is logged once.
type watched[T any] struct {
	what  string // in logs: "cluster TLS", "HTTPS certificate"
	files []string
	// load reads the files; prev is the value in use (the zero value on
	// the first load), so a loader can refuse a change that is a mistake.
	load func(prev T) (T, error)
	log  *slog.Logger

	mu      sync.Mutex
	cur     T
	stamps  []stamp
	checked time.Time
	failed  string // the last reload error logged
}

func newWatched[T any](what string, log *slog.Logger, load func(prev T) (T, error), files ...string) (*watched[T], error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	w := &watched[T]{what: what, files: files, load: load, log: log}
	stamps, err := stampsOf(files)
	if err != nil {
		return nil, err
	}
	var zero T
	if w.cur, err = load(zero); err != nil {
		return nil, err
	}
	w.stamps, w.checked = stamps, time.Now()
	return w, nil
}

// get returns the value, loading it again first when a file changed.
func (w *watched[T]) get() T {
	w.mu.Lock()
	defer w.mu.Unlock()
	if time.Since(w.checked) < recheckEvery {
		return w.cur
	}
	w.checked = time.Now()
	stamps, err := stampsOf(w.files)
	if err == nil && slices.Equal(stamps, w.stamps) {
		return w.cur
	}
	var v T
	if err == nil {
		v, err = w.load(w.cur)
	}
	if err != nil {
		if msg := err.Error(); msg != w.failed {
			w.failed = msg
			w.log.Warn(w.what+" files changed but do not load; keeping the previous ones", "err", err)
		}
		return w.cur
	}
	w.cur, w.stamps, w.failed = v, stamps, ""
	w.log.Info(w.what + " reloaded")
	return w.cur
}
