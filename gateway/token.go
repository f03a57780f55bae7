package gateway

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"time"
)

// uploadState is everything a gateway needs to continue an upload session.
// It travels in the session's Location URL as a sealed token, so sessions
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
	// sha256 state over exactly those bytes (it carries up to 63 bytes of
	// the upload itself, which is why tokens are encrypted).
	Offset int64  `json:"o"`
	Hash   []byte `json:"h,omitempty"`
	// Expires is when the session stops being accepted (unix seconds).
	Expires int64 `json:"e"`
}

// tokenVersion is the payload's format; the first byte of a token is the
// sealing format, tokenFormat.
const (
	tokenVersion = 1
	tokenFormat  = 2 // AES-256-GCM under a key derived from the upload key
	maxTokenLen  = 4096
)

// tokenAEAD derives the token cipher from the cluster's upload key. The
// derivation is fixed, so every gateway with the key opens every token.
func tokenAEAD(key []byte) (cipher.AEAD, error) {
	m := hmac.New(sha256.New, key)
	m.Write([]byte("meridian-upload-token-aes-256-gcm"))
	block, err := aes.NewCipher(m.Sum(nil))
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// sealToken encrypts and authenticates s with key: the token reveals
// nothing of the session (repository, store ids, the hash state with its
// unhashed tail of the client's bytes) to whoever sees the URL, and any
// change to it makes it unreadable. The repository is also bound as
// associated data.
func sealToken(key []byte, s uploadState) string {
	s.V = tokenVersion
	payload, _ := json.Marshal(s)
	aead, err := tokenAEAD(key)
	if err != nil {
		panic(err) // a 32-byte AES key always makes a cipher
	}
	out := make([]byte, 1, 1+aead.NonceSize()+len(payload)+aead.Overhead())
	out[0] = tokenFormat
	nonce := make([]byte, aead.NonceSize())
	rand.Read(nonce)
	out = append(out, nonce...)
	out = aead.Seal(out, nonce, payload, []byte(s.Repo))
	return base64.RawURLEncoding.EncodeToString(out)
}

// openToken decrypts and checks a token for repo. Forged, altered,
// expired and foreign-repository tokens all read as an unknown upload: a
// client can learn nothing by probing.
func openToken(key []byte, token, repo string, now time.Time) (uploadState, error) {
	unknown := errorf(CodeBlobUploadUnknown, "upload session is unknown, expired or finished")
	if len(token) > maxTokenLen {
		return uploadState{}, unknown
	}
	raw, err := base64.RawURLEncoding.DecodeString(token)
	if err != nil || len(raw) < 1 || raw[0] != tokenFormat {
		return uploadState{}, unknown
	}
	aead, err := tokenAEAD(key)
	if err != nil || len(raw) < 1+aead.NonceSize() {
		return uploadState{}, unknown
	}
	nonce, sealed := raw[1:1+aead.NonceSize()], raw[1+aead.NonceSize():]
	payload, err := aead.Open(nil, nonce, sealed, []byte(repo))
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
