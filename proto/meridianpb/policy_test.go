package meridianpb

import (
	"slices"
	"testing"
)

func TestResolvePolicy(t *testing.T) {
	regions := []string{"us-east", "eu-west", "ap-south"}
	policies := []*Policy{
		{Prefix: "prod/", MinRegions: 2},
		{Prefix: "", Regions: []string{"us-east", "eu-west"}},
		{Prefix: "prod/eu/", Regions: []string{"eu-west", "nowhere"}},
		{Prefix: "lab/", Regions: []string{"nowhere"}, MinRegions: 5},
	}
	tests := []struct {
		repo    string
		regions []string
		min     int
	}{
		{"app", []string{"eu-west", "us-east"}, 1},
		{"prod/app", []string{"eu-west", "us-east"}, 2},
		{"prod/eu/app", []string{"eu-west"}, 1}, // min 2 inherited, clamped to one region
		{"production", []string{"eu-west", "us-east"}, 1},
		{"lab/x", []string{"eu-west", "us-east"}, 2}, // unknown region ignored; min clamped
	}
	for _, tt := range tests {
		got := ResolvePolicy(policies, regions, tt.repo)
		if !slices.Equal(got.Regions, tt.regions) || got.MinRegions != tt.min {
			t.Errorf("%s: got %v min %d, want %v min %d", tt.repo, got.Regions, got.MinRegions, tt.regions, tt.min)
		}
	}
	if got := ResolvePolicy(nil, regions, "x"); len(got.Regions) != 3 || got.MinRegions != 1 {
		t.Errorf("no policies: got %+v, want every region, min 1", got)
	}
}
