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
	next := ""
	if more {
		next = page[len(page)-1]
	}
	writePageAfter(w, path, len(page), next, body)
}

// writePageAfter writes a JSON list page and, unless next is empty, a Link
// header to the page of up to n items after next.
func writePageAfter(w http.ResponseWriter, path string, n int, next string, body any) {
	if next != "" {
		q := url.Values{"n": {strconv.Itoa(n)}, "last": {next}}
		w.Header().Set("Link", "<"+path+"?"+q.Encode()+`>; rel="next"`)
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
	repos, next, err := g.pullableRepositories(r.Context(), last, n)
	if err != nil {
		return err
	}
	writePageAfter(w, "/v2/_catalog", n, next, struct {
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

// catalogScan bounds how many repositories one catalog request reads: a
// caller who may list few of many repositories gets a short page and a
// link to continue, not a scan of the whole catalog.
const catalogScan = 10000

// pullableRepositories returns up to n repositories after last that the
// caller may list, and the name to continue after when more may follow
// ("" at the end). It reads ahead in pages of the list limit.
func (g *Gateway) pullableRepositories(ctx context.Context, last string, n int) ([]string, string, error) {
	out := []string{}
	if n == 0 {
		return out, "", nil // an empty page, with no link to a next one
	}
	c := CallerFrom(ctx)
	size := max(n, g.cfg.ListLimit)
	for scanned := 0; ; {
		repos, err := g.meta.Repositories(ctx, last, size+1)
		if err != nil {
			return nil, "", err
		}
		end := len(repos) <= size
		if !end {
			repos = repos[:size]
		}
		for i, repo := range repos {
			last = repo
			scanned++
			if c != nil && !lists(c, repo) {
				continue
			}
			out = append(out, repo)
			if len(out) == n {
				if end && i == len(repos)-1 {
					return out, "", nil
				}
				return out, repo, nil
			}
		}
		if end {
			return out, "", nil
		}
		if scanned >= catalogScan {
			return out, last, nil
		}
	}
}

// lists reports whether the catalog shows repo to c.
func lists(c Caller, repo string) bool {
	if l, ok := c.(interface{ Lists(repo string) bool }); ok {
		return l.Lists(repo)
	}
	return c.Can(repo, ActionPull)
}
