package gateway

import (
	"context"
	"encoding/json"
	"io"
	"mime"
	"net/http"
	"slices"
	"strings"

	"github.com/opencontainers/go-digest"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// Manifest media types the registry stores.
const (
	mediaTypeOCIManifest    = "application/vnd.oci.image.manifest.v1+json"
	mediaTypeOCIIndex       = "application/vnd.oci.image.index.v1+json"
	mediaTypeDockerManifest = "application/vnd.docker.distribution.manifest.v2+json"
	mediaTypeDockerList     = "application/vnd.docker.distribution.manifest.list.v2+json"
)

// manifestKinds maps each accepted media type to whether it is an index.
var manifestKinds = map[string]bool{
	mediaTypeOCIManifest:    false,
	mediaTypeDockerManifest: false,
	mediaTypeOCIIndex:       true,
	mediaTypeDockerList:     true,
}

type descriptor struct {
	MediaType    string            `json:"mediaType"`
	Digest       string            `json:"digest"`
	Size         int64             `json:"size"`
	ArtifactType string            `json:"artifactType,omitempty"`
	Annotations  map[string]string `json:"annotations,omitempty"`
	URLs         []string          `json:"urls,omitempty"`
}

// manifestDoc covers the fields of image manifests and indexes that the
// registry validates or indexes.
type manifestDoc struct {
	SchemaVersion int               `json:"schemaVersion"`
	MediaType     string            `json:"mediaType"`
	ArtifactType  string            `json:"artifactType"`
	Config        *descriptor       `json:"config"`
	Layers        []descriptor      `json:"layers"`
	Manifests     []descriptor      `json:"manifests"`
	Subject       *descriptor       `json:"subject"`
	Annotations   map[string]string `json:"annotations"`
}

// parsedManifest is a validated manifest and what it refers to.
type parsedManifest struct {
	mediaType    string
	blobs        []string // must be linked in the repository
	manifests    []string // must exist in the repository
	subject      string
	artifactType string
	annotations  map[string]string
}

// parseManifest validates a manifest body against its media type (from the
// Content-Type header or, failing that, the body) and collects its references.
func parseManifest(contentType string, body []byte) (*parsedManifest, error) {
	var doc manifestDoc
	if err := json.Unmarshal(body, &doc); err != nil {
		return nil, errorf(CodeManifestInvalid, "manifest is not valid JSON: %v", err)
	}
	mt := contentType
	if mt != "" {
		parsed, _, err := mime.ParseMediaType(mt)
		if err != nil {
			return nil, errorf(CodeManifestInvalid, "invalid Content-Type %q", contentType)
		}
		mt = parsed
	}
	switch {
	case mt == "" && doc.MediaType == "":
		return nil, errorf(CodeManifestInvalid, "manifest media type is missing (no Content-Type, no mediaType field)")
	case mt == "":
		mt = doc.MediaType
	case doc.MediaType != "" && doc.MediaType != mt:
		return nil, errorf(CodeManifestInvalid, "Content-Type %s does not match the manifest's mediaType %s", mt, doc.MediaType)
	}
	isIndex, known := manifestKinds[mt]
	if !known {
		return nil, errorf(CodeManifestInvalid, "unsupported manifest media type %q", truncate(mt, 200))
	}
	if doc.SchemaVersion != 2 {
		return nil, errorf(CodeManifestInvalid, "schemaVersion must be 2")
	}
	p := &parsedManifest{mediaType: mt, artifactType: doc.ArtifactType, annotations: doc.Annotations}
	if isIndex {
		if doc.Config != nil || doc.Layers != nil {
			return nil, errorf(CodeManifestInvalid, "an index has no config or layers")
		}
		for _, m := range doc.Manifests {
			if err := checkDescriptor(m, "manifests"); err != nil {
				return nil, err
			}
			p.manifests = append(p.manifests, m.Digest)
		}
	} else {
		if doc.Config == nil {
			return nil, errorf(CodeManifestInvalid, "an image manifest needs a config descriptor")
		}
		if doc.Manifests != nil {
			return nil, errorf(CodeManifestInvalid, "an image manifest has no manifests list")
		}
		if err := checkDescriptor(*doc.Config, "config"); err != nil {
			return nil, err
		}
		p.blobs = append(p.blobs, doc.Config.Digest)
		for _, l := range doc.Layers {
			if err := checkDescriptor(l, "layers"); err != nil {
				return nil, err
			}
			if !isNonDistributable(l.MediaType) {
				p.blobs = append(p.blobs, l.Digest)
			}
		}
		if p.artifactType == "" {
			p.artifactType = doc.Config.MediaType
		}
	}
	if doc.Subject != nil {
		if err := checkDescriptor(*doc.Subject, "subject"); err != nil {
			return nil, err
		}
		p.subject = doc.Subject.Digest
	}
	return p, nil
}

func checkDescriptor(d descriptor, field string) error {
	if _, err := digest.Parse(d.Digest); err != nil {
		return errorf(CodeManifestInvalid, "%s: invalid digest %q", field, truncate(d.Digest, 200))
	}
	if d.Size < 0 {
		return errorf(CodeManifestInvalid, "%s: negative size for %s", field, d.Digest)
	}
	if d.MediaType == "" {
		return errorf(CodeManifestInvalid, "%s: descriptor %s has no mediaType", field, d.Digest)
	}
	return nil
}

// isNonDistributable reports layers the spec lets a registry not hold.
func isNonDistributable(mediaType string) bool {
	return strings.Contains(mediaType, ".nondistributable.") ||
		strings.Contains(mediaType, ".foreign.")
}

// putManifest stores a manifest under its digest and the tags the request
// names, honouring If-Match / If-None-Match on a tag.
func (g *Gateway) putManifest(w http.ResponseWriter, r *http.Request, rt route) error {
	max := g.cfg.MaxManifestSize
	if r.ContentLength > max {
		return errorf(CodeTooLarge, "manifests are limited to %d bytes", max)
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, max+1))
	if err != nil {
		return errorf(CodeManifestInvalid, "reading manifest: %v", err)
	}
	if int64(len(body)) > max {
		return errorf(CodeTooLarge, "manifests are limited to %d bytes", max)
	}
	var (
		d    digest.Digest
		tags []string
	)
	if isDigestRef(rt.ref) {
		want, err := parseDigest(rt.ref)
		if err != nil {
			return err
		}
		if d = want.Algorithm().FromBytes(body); d != want {
			return errorf(CodeDigestInvalid, "manifest has digest %s, not %s", d, want)
		}
		for _, t := range r.URL.Query()["tag"] {
			if err := validateTag(t); err != nil {
				return err
			}
			if !slices.Contains(tags, t) {
				tags = append(tags, t)
			}
		}
	} else {
		if err := validateTag(rt.ref); err != nil {
			return err
		}
		d, tags = digest.SHA256.FromBytes(body), []string{rt.ref}
	}
	m, err := parseManifest(r.Header.Get("Content-Type"), body)
	if err != nil {
		return err
	}
	cmd := &pb.PutManifest{
		Repository: rt.name, Digest: d.String(), MediaType: m.mediaType, Content: body, Tags: tags,
		Blobs: m.blobs, Manifests: m.manifests, Subject: m.subject,
		ArtifactType: m.artifactType, Annotations: m.annotations,
	}
	if err := conditions(r, cmd); err != nil {
		return err
	}
	if err := g.meta.Commit(r.Context(), &pb.Command{Intent: &pb.Command_PutManifest{PutManifest: cmd}}); err != nil {
		return err
	}
	h := w.Header()
	h.Set("Location", "/v2/"+rt.name+"/manifests/"+d.String())
	h.Set("Docker-Content-Digest", d.String())
	if m.subject != "" {
		h.Set("OCI-Subject", m.subject)
	}
	if isDigestRef(rt.ref) {
		for _, t := range tags {
			h.Add("OCI-Tag", t)
		}
	}
	h.Set("Content-Length", "0")
	w.WriteHeader(http.StatusCreated)
	return nil
}

// conditions copies a tag PUT's If-Match / If-None-Match into cmd.
func conditions(r *http.Request, cmd *pb.PutManifest) error {
	ifMatch, ifNone := r.Header.Get("If-Match"), r.Header.Get("If-None-Match")
	if ifMatch == "" && ifNone == "" {
		return nil
	}
	if len(cmd.Tags) != 1 {
		return errorf(CodeManifestInvalid, "If-Match and If-None-Match apply to a single tag")
	}
	if ifNone != "" {
		if strings.TrimSpace(ifNone) != "*" {
			return errorf(CodeManifestInvalid, `If-None-Match on a manifest PUT supports only "*"`)
		}
		cmd.IfNoneMatch = true
	}
	if ifMatch != "" {
		v := strings.TrimPrefix(strings.TrimSpace(ifMatch), "W/")
		v = strings.Trim(v, `"`)
		if v != "*" {
			if _, err := digest.Parse(v); err != nil {
				return errorf(CodeManifestInvalid, `If-Match must be "*" or a quoted digest, not %q`, truncate(ifMatch, 200))
			}
		}
		cmd.IfMatch = v
	}
	return nil
}

// resolve turns a manifest reference into a digest.
func (g *Gateway) resolve(r *http.Request, rt route) (string, error) {
	if isDigestRef(rt.ref) {
		d, err := parseDigest(rt.ref)
		return d.String(), err
	}
	if err := validateTag(rt.ref); err != nil {
		return "", err
	}
	return g.meta.Tag(r.Context(), rt.name, rt.ref)
}

// tagManifestReader is implemented by metadata that can read a manifest by
// tag in one step (a standalone gateway's upstream: one round trip
// instead of two).
type tagManifestReader interface {
	ManifestByTag(ctx context.Context, repo, tag string) (*pb.ManifestRecord, error)
}

// getManifest serves GET and HEAD of a manifest by tag or digest.
func (g *Gateway) getManifest(w http.ResponseWriter, r *http.Request, rt route) error {
	var m *pb.ManifestRecord
	if tm, ok := g.meta.(tagManifestReader); ok && !isDigestRef(rt.ref) {
		if err := validateTag(rt.ref); err != nil {
			return err
		}
		var err error
		if m, err = tm.ManifestByTag(r.Context(), rt.name, rt.ref); err != nil {
			return err
		}
	} else {
		d, err := g.resolve(r, rt)
		if err != nil {
			return err
		}
		if m, err = g.meta.Manifest(r.Context(), rt.name, d); err != nil {
			return err
		}
	}
	if g.pulls != nil && r.Method == http.MethodGet {
		g.pulls.Pulled(rt.name, m.Digest)
	}
	h := w.Header()
	etag := `"` + m.Digest + `"`
	h.Set("Docker-Content-Digest", m.Digest)
	h.Set("ETag", etag)
	h.Set("Content-Type", m.MediaType)
	if inm := r.Header.Get("If-None-Match"); inm != "" && etagMatches(inm, etag) {
		w.WriteHeader(http.StatusNotModified)
		return nil
	}
	h.Set("Content-Length", itoa(int64(len(m.Content))))
	if r.Method == http.MethodHead {
		w.WriteHeader(http.StatusOK)
		return nil
	}
	w.WriteHeader(http.StatusOK)
	w.Write(m.Content)
	return nil
}

func etagMatches(header, etag string) bool {
	for _, v := range strings.Split(header, ",") {
		v = strings.TrimPrefix(strings.TrimSpace(v), "W/")
		if v == etag || v == "*" {
			return true
		}
	}
	return false
}

// deleteManifest deletes by digest (the manifest and its tags) or by tag
// (only the tag).
func (g *Gateway) deleteManifest(w http.ResponseWriter, r *http.Request, rt route) error {
	var e *pb.Command
	if isDigestRef(rt.ref) {
		d, err := parseDigest(rt.ref)
		if err != nil {
			return err
		}
		e = &pb.Command{Intent: &pb.Command_DeleteManifest{DeleteManifest: &pb.DeleteManifest{Repository: rt.name, Digest: d.String()}}}
	} else {
		if err := validateTag(rt.ref); err != nil {
			return err
		}
		e = &pb.Command{Intent: &pb.Command_DeleteTag{DeleteTag: &pb.DeleteTag{Repository: rt.name, Tag: rt.ref}}}
	}
	if err := g.meta.Commit(r.Context(), e); err != nil {
		return err
	}
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(http.StatusAccepted)
	return nil
}
