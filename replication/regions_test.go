package replication

import (
	"errors"
	"slices"
	"testing"
	"time"
)

func TestRegionsNearest(t *testing.T) {
	r := NewRegions("eu")
	for _, n := range []string{"us", "eu", "ap", "sa"} {
		r.Add(n, nil)
	}
	if got := r.Nearest([]string{"us", "ap", "eu", "nowhere"}); !slices.Equal(got, []string{"eu", "ap", "us"}) {
		t.Fatalf("unknown distances: got %v, want local first then names", got)
	}
	r.Observe("us", 5*time.Millisecond, nil)
	r.Observe("ap", 80*time.Millisecond, nil)
	if got := r.Nearest([]string{"ap", "us", "sa", "eu"}); !slices.Equal(got, []string{"eu", "us", "ap", "sa"}) {
		t.Fatalf("measured: got %v, want [eu us ap sa]", got)
	}
	// A failing store goes to the back, the local one included, and comes
	// back with its first success.
	r.Observe("us", 0, errors.New("down"))
	r.Observe("eu", 0, errors.New("down"))
	if got := r.Nearest([]string{"eu", "us", "ap"}); !slices.Equal(got, []string{"ap", "eu", "us"}) {
		t.Fatalf("failing: got %v, want [ap eu us]", got)
	}
	r.Observe("us", 4*time.Millisecond, nil)
	r.Observe("eu", time.Millisecond, nil)
	if got := r.Nearest([]string{"ap", "us", "eu"}); !slices.Equal(got, []string{"eu", "us", "ap"}) {
		t.Fatalf("recovered: got %v, want [eu us ap]", got)
	}
}
