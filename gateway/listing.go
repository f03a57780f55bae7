package gateway

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"strconv"
)

// page reads the n and last pagination parameters. n absent or above the
// configured limit is capped at the limit.
func (g *Gateway) page(r *http.Request) (n int, last string, err error) {
	q := r.URL.Query()
	n = g.cfg.ListLimit
	if v, ok := q["n"]; ok {
		parsed, perr := strconv.Atoi(v[0])
		if perr != nil || parsed < 0 {
			return 0, "", errorf(CodePaginationInvalid, "n must be a non-negative integer")
		}
		n = min(parsed, g.cfg.ListLimit)
	}
	return n, q.Get("last"), nil
}

// onePage cuts a page of at most n items from items, which were fetched
// with one extra, and reports whether another page follows. n = 0 asks for
// an empty page and gets no link to a next one.
func onePage(items []string, n int) ([]string, bool) {
	if len(items) > n {
		return items[:n], n > 0
	}
	return items, false
}

// writePage writes a JSON list page and, when more follow, a Link header to
// the next page.
func writePage(w http.ResponseWriter, path string, page []string, more bool, body any) {
	if more {
		next := url.Values{"n": {strconv.Itoa(len(page))}, "last": {page[len(page)-1]}}
		w.Header().Set("Link", "<"+path+"?"+next.Encode()+`>; rel="next"`)
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(body)
}

// listTags serves GET …/tags/list with n/last pagination.
func (g *Gateway) listTags(w http.ResponseWriter, r *http.Request, rt route) error {
	n, last, err := g.page(r)
	if err != nil {
		return err
	}
	tags, err := g.meta.Tags(r.Context(), rt.name, last, n+1)
	if err != nil {
		return err
	}
	tags, more := onePage(tags, n)
	writePage(w, "/v2/"+rt.name+"/tags/list", tags, more, struct {
		Name string   `json:"name"`
		Tags []string `json:"tags"`
	}{rt.name, tags})
	return nil
}

// catalog serves GET /v2/_catalog with n/last pagination.
func (g *Gateway) catalog(w http.ResponseWriter, r *http.Request, _ route) error {
	n, last, err := g.page(r)
	if err != nil {
		return err
	}
	repos, more, err := g.pullableRepositories(r.Context(), last, n)
	if err != nil {
		return err
	}
	writePage(w, "/v2/_catalog", repos, more, struct {
		Repositories []string `json:"repositories"`
	}{repos})
	return nil
}

// referrers serves GET …/referrers/<digest>: always an image index, empty
// when nothing refers to the digest, optionally filtered by artifactType.
func (g *Gateway) referrers(w http.ResponseWriter, r *http.Request, rt route) error {
	d, err := parseDigest(rt.ref)
	if err != nil {
		return err
	}
	refs, err := g.meta.Referrers(r.Context(), rt.name, d.String())
	if err != nil {
		return err
	}
	filter, filtered := r.URL.Query()["artifactType"]
	list := make([]descriptor, 0, len(refs))
	for _, ref := range refs {
		if filtered && ref.ArtifactType != filter[0] {
			continue
		}
		list = append(list, descriptor{
			MediaType: ref.MediaType, Digest: ref.Digest, Size: ref.Size,
			ArtifactType: ref.ArtifactType, Annotations: ref.Annotations,
		})
	}
	if filtered {
		w.Header().Set("OCI-Filters-Applied", "artifactType")
	}
	w.Header().Set("Content-Type", mediaTypeOCIIndex)
	json.NewEncoder(w).Encode(struct {
		SchemaVersion int          `json:"schemaVersion"`
		MediaType     string       `json:"mediaType"`
		Manifests     []descriptor `json:"manifests"`
	}{2, mediaTypeOCIIndex, list})
	return nil
}

// pullableRepositories returns up to n repositories after last that the
// caller may pull, and whether more follow. It reads ahead in pages, so a
// caller who may pull few of many repositories still gets full pages.
func (g *Gateway) pullableRepositories(ctx context.Context, last string, n int) ([]string, bool, error) {
	c := CallerFrom(ctx)
	out := []string{}
	for {
		repos, err := g.meta.Repositories(ctx, last, n+1)
		if err != nil {
			return nil, false, err
		}
		for _, repo := range repos {
			if c != nil && !lists(c, repo) {
				continue
			}
			if len(out) == n {
				// n = 0 asks for an empty page, with no link to a next one.
				return out, n > 0, nil
			}
			out = append(out, repo)
		}
		if len(repos) <= n {
			return out, false, nil
		}
		last = repos[len(repos)-1]
	}
}

// lists reports whether the catalog shows repo to c.
func lists(c Caller, repo string) bool {
	if l, ok := c.(interface{ Lists(repo string) bool }); ok {
		return l.Lists(repo)
	}
	return c.Can(repo, ActionPull)
}
