package gateway

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"strings"
	"time"
)

// uploadState is everything a gateway needs to continue an upload session.
// It travels in the session's Location URL as a signed token, so sessions
// survive restarts and any gateway can take the next chunk.
type uploadState struct {
	// Version of this token format.
	V int `json:"v"`
	// Repo binds the session to its repository.
	Repo string `json:"r"`
	// Region whose store holds the bytes, and the store's upload id.
	Region string `json:"g"`
	ID     string `json:"i"`
	// Offset is how many bytes the session holds; Hash is the serialized
	// sha256 state over exactly those bytes.
	Offset int64  `json:"o"`
	Hash   []byte `json:"h,omitempty"`
	// Expires is when the session stops being accepted (unix seconds).
	Expires int64 `json:"e"`
}

const tokenVersion = 1

// signToken encodes and signs s with key.
func signToken(key []byte, s uploadState) string {
	s.V = tokenVersion
	payload, _ := json.Marshal(s)
	p := base64.RawURLEncoding.EncodeToString(payload)
	return p + "." + base64.RawURLEncoding.EncodeToString(tokenMAC(key, p))
}

// parseToken verifies and decodes a token for repo. Forged, altered, expired
// and foreign-repository tokens all read as an unknown upload: a client can
// learn nothing by probing.
func parseToken(key []byte, token, repo string, now time.Time) (uploadState, error) {
	unknown := errorf(CodeBlobUploadUnknown, "upload session is unknown, expired or finished")
	p, sig, ok := strings.Cut(token, ".")
	if !ok || len(token) > 4096 {
		return uploadState{}, unknown
	}
	got, err := base64.RawURLEncoding.DecodeString(sig)
	if err != nil || !hmac.Equal(got, tokenMAC(key, p)) {
		return uploadState{}, unknown
	}
	payload, err := base64.RawURLEncoding.DecodeString(p)
	if err != nil {
		return uploadState{}, unknown
	}
	var s uploadState
	if err := json.Unmarshal(payload, &s); err != nil || s.V != tokenVersion {
		return uploadState{}, unknown
	}
	if s.Repo != repo || now.Unix() >= s.Expires {
		return uploadState{}, unknown
	}
	return s, nil
}

func tokenMAC(key []byte, payload string) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte("meridian-upload-v1\x00"))
	m.Write([]byte(payload))
	return m.Sum(nil)
}
