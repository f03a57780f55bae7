package webhook

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"strings"
	"time"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

const (
	// ContentType is CloudEvents' structured-mode JSON.
	ContentType = "application/cloudevents+json"
	// SignatureHeader carries "sha256=" and the hex HMAC-SHA256 of the
	// request body under the webhook's secret.
	SignatureHeader = "X-Meridian-Signature-256"
	// WebhookHeader names the webhook a delivery is for.
	WebhookHeader = "X-Meridian-Webhook"
	// TypePrefix precedes an event's kind in its CloudEvents type.
	TypePrefix = "io.meridian."
)

// CloudEvent is one delivery's body.
type CloudEvent struct {
	SpecVersion     string `json:"specversion"`
	ID              string `json:"id"`
	Source          string `json:"source"`
	Type            string `json:"type"`
	Subject         string `json:"subject,omitempty"`
	Time            string `json:"time"`
	DataContentType string `json:"datacontenttype"`
	Data            Data   `json:"data"`
}

// Data is what happened, in the event's own words.
type Data struct {
	// Index is the Raft log index of the change: events of one cluster
	// are delivered in index order.
	Index          uint64   `json:"index"`
	Repository     string   `json:"repository,omitempty"`
	Repositories   []string `json:"repositories,omitempty"`
	Digest         string   `json:"digest,omitempty"`
	Tag            string   `json:"tag,omitempty"`
	PreviousDigest string   `json:"previousDigest,omitempty"`
	MediaType      string   `json:"mediaType,omitempty"`
	Size           int64    `json:"size,omitempty"`
	Region         string   `json:"region,omitempty"`
	Actor          string   `json:"actor,omitempty"`
	Detail         string   `json:"detail,omitempty"`
}

// Source is the CloudEvents source of a cluster's events.
func Source(clusterID string) string { return "/meridian/" + clusterID }

// FromEvent renders a stored event; id is its "index-seq" name.
func FromEvent(clusterID, id string, ev *pb.Event) CloudEvent {
	d := Data{Index: ev.Index, Digest: ev.Digest, Tag: ev.Tag, PreviousDigest: ev.PreviousDigest,
		MediaType: ev.MediaType, Size: ev.Size, Region: ev.Region, Actor: ev.Principal, Detail: ev.Detail}
	if len(ev.Repositories) == 1 {
		d.Repository = ev.Repositories[0]
	} else {
		d.Repositories = ev.Repositories
	}
	subject := ""
	switch {
	case d.Repository != "" && ev.Tag != "" && !strings.Contains(ev.Tag, ","):
		subject = d.Repository + ":" + ev.Tag
	case d.Repository != "" && ev.Digest != "":
		subject = d.Repository + "@" + ev.Digest
	case d.Repository != "":
		subject = d.Repository
	default:
		subject = ev.Digest
	}
	return CloudEvent{
		SpecVersion: "1.0", ID: id, Source: Source(clusterID), Type: TypePrefix + ev.Kind, Subject: subject,
		Time: time.Unix(0, ev.TimeUnixNano).UTC().Format(time.RFC3339Nano), DataContentType: "application/json", Data: d,
	}
}

// Marshal encodes a delivery body.
func Marshal(ev CloudEvent) ([]byte, error) { return json.Marshal(ev) }

// Sign is the SignatureHeader value of body under secret.
func Sign(secret string, body []byte) string {
	m := hmac.New(sha256.New, []byte(secret))
	m.Write(body)
	return "sha256=" + hex.EncodeToString(m.Sum(nil))
}

// Verify reports whether header is body's signature under secret, in
// constant time.
func Verify(secret string, body []byte, header string) bool {
	return hmac.Equal([]byte(Sign(secret, body)), []byte(header))
}
