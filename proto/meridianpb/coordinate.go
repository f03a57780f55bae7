package meridianpb

import "github.com/hashicorp/serf/coordinate"

// CoordinateToProto converts a Vivaldi coordinate for the wire.
func CoordinateToProto(c *coordinate.Coordinate) *Coordinate {
	if c == nil {
		return nil
	}
	return &Coordinate{Vec: c.Vec, Error: c.Error, Adjustment: c.Adjustment, Height: c.Height}
}

// CoordinateFromProto converts a wire coordinate; nil stays nil.
func CoordinateFromProto(c *Coordinate) *coordinate.Coordinate {
	if c == nil {
		return nil
	}
	return &coordinate.Coordinate{Vec: c.Vec, Error: c.Error, Adjustment: c.Adjustment, Height: c.Height}
}
