package consensus

import (
	"bytes"
	"context"
	"log/slog"

	"github.com/hashicorp/go-hclog"
)

// newHCLogger gives hashicorp/raft a logger whose warnings and errors land in
// the node's slog output; raft's info-level chatter is dropped.
func newHCLogger(l *slog.Logger) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{
		Name:            "raft",
		Level:           hclog.Warn,
		Output:          slogWriter{l.With("component", "raft")},
		DisableTime:     true,
		IncludeLocation: false,
	})
}

// slogWriter turns each line hclog writes into one slog record.
type slogWriter struct{ l *slog.Logger }

func (w slogWriter) Write(p []byte) (int, error) {
	for _, line := range bytes.Split(bytes.TrimRight(p, "\n"), []byte("\n")) {
		level := slog.LevelWarn
		if bytes.Contains(line, []byte("[ERROR]")) {
			level = slog.LevelError
		}
		w.l.Log(context.Background(), level, string(bytes.TrimSpace(line)))
	}
	return len(p), nil
}
