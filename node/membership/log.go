package membership

import (
	"context"
	"log"
	"log/slog"
	"strings"
)

// memberlistLogger turns memberlist's *log.Logger output into slog records.
// memberlist prefixes each line with its level ("[DEBUG] memberlist: …"), so
// the level is kept instead of logging everything at one level: connection
// chatter stays at debug while address conflicts come out as errors.
func memberlistLogger(l *slog.Logger) *log.Logger {
	return log.New(levelWriter{l}, "", 0)
}

type levelWriter struct{ log *slog.Logger }

var memberlistLevels = []struct {
	prefix string
	level  slog.Level
}{
	{"[DEBUG] ", slog.LevelDebug},
	{"[INFO] ", slog.LevelInfo},
	{"[WARN] ", slog.LevelWarn},
	{"[ERR] ", slog.LevelError},
	{"[ERROR] ", slog.LevelError},
}

func (w levelWriter) Write(p []byte) (int, error) {
	msg := strings.TrimRight(string(p), "\n")
	level := slog.LevelWarn // unprefixed lines are rare and about errors
	for _, l := range memberlistLevels {
		if rest, ok := strings.CutPrefix(msg, l.prefix); ok {
			msg, level = rest, l.level
			break
		}
	}
	msg = strings.TrimPrefix(msg, "memberlist: ")
	if strings.Contains(msg, "use of closed network connection") {
		// memberlist's goroutines report the shutdown they are part of.
		level = slog.LevelDebug
	}
	w.log.Log(context.Background(), level, msg)
	return len(p), nil
}
