package auth

import (
	"encoding/json"
	"net/http"
)

// AdminOnly serves h to cluster admins only (Basic credentials or an
// admin's token): no credentials or bad ones get 401 with a Basic
// challenge, anyone else 403. Errors are JSON {"error": "..."}, for the
// operational endpoints outside /v2/ (the audit log, profiles).
func (a *Authority) AdminOnly(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fail := func(code int, msg string) {
			if code == http.StatusUnauthorized {
				w.Header().Set("WWW-Authenticate", `Basic realm="meridian admin"`)
			}
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(code)
			json.NewEncoder(w).Encode(map[string]string{"error": msg})
		}
		c, err := a.Authenticate(r)
		switch {
		case err != nil:
			fail(http.StatusUnauthorized, "invalid credentials")
		case c.Anonymous():
			fail(http.StatusUnauthorized, "credentials required")
		case !a.IsAdmin(c.Actor().Principal):
			fail(http.StatusForbidden, c.Actor().Principal+" is not a cluster admin")
		default:
			h.ServeHTTP(w, r)
		}
	})
}
