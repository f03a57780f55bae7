package node

import (
	"slices"
	"testing"
)

func TestInBatches(t *testing.T) {
	got := inBatches([]int{1, 2, 3, 4, 5}, 2)
	if len(got) != 3 || !slices.Equal(got[0], []int{1, 2}) || !slices.Equal(got[2], []int{5}) {
		t.Fatalf("inBatches = %v", got)
	}
	if got := inBatches([]int(nil), 2); len(got) != 0 {
		t.Fatalf("inBatches of nothing = %v", got)
	}
}
