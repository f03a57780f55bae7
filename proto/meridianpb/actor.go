package meridianpb

import "context"

type actorKey struct{}

// WithActor returns ctx carrying who asked for the work done under it; a
// commit made with that context records the actor in its log entry.
func WithActor(ctx context.Context, a *Actor) context.Context {
	return context.WithValue(ctx, actorKey{}, a)
}

// ActorFrom returns the actor WithActor put in ctx, or nil.
func ActorFrom(ctx context.Context) *Actor {
	a, _ := ctx.Value(actorKey{}).(*Actor)
	return a
}
