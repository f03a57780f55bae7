package gateway

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"time"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
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

// tokenVersion is the payload's format. A token is the sealing format
// byte, the id of the ring key that sealed it (4 bytes), the nonce and the
// sealed payload.
const (
	tokenVersion = 1
	tokenFormat  = 3 // AES-256-GCM under a key derived from a ring key
	tokenHeader  = 1 + 4
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

// sealToken encrypts and authenticates s with ring key k: the token
// reveals nothing of the session (repository, store ids, the hash state
// with its unhashed tail of the client's bytes) to whoever sees the URL,
// and any change to it makes it unreadable. The repository is also bound
// as associated data.
func sealToken(k *pb.UploadKey, s uploadState) string {
	s.V = tokenVersion
	payload, _ := json.Marshal(s)
	aead, err := tokenAEAD(k.GetKey())
	if err != nil {
		panic(err) // a 32-byte AES key always makes a cipher
	}
	out := make([]byte, tokenHeader, tokenHeader+aead.NonceSize()+len(payload)+aead.Overhead())
	out[0] = tokenFormat
	binary.BigEndian.PutUint32(out[1:], k.GetId())
	nonce := make([]byte, aead.NonceSize())
	rand.Read(nonce)
	out = append(out, nonce...)
	out = aead.Seal(out, nonce, payload, []byte(s.Repo))
	return base64.RawURLEncoding.EncodeToString(out)
}

// openToken decrypts and checks a token for repo with the ring key its
// header names (keyOf returns nil for an id it does not hold). Forged,
// altered, expired, foreign-repository tokens and tokens of retired keys
// all read as an unknown upload: a client can learn nothing by probing.
func openToken(keyOf func(id uint32) []byte, token, repo string, now time.Time) (uploadState, error) {
	unknown := errorf(CodeBlobUploadUnknown, "upload session is unknown, expired or finished")
	if len(token) > maxTokenLen {
		return uploadState{}, unknown
	}
	raw, err := base64.RawURLEncoding.DecodeString(token)
	if err != nil || len(raw) < tokenHeader || raw[0] != tokenFormat {
		return uploadState{}, unknown
	}
	key := keyOf(binary.BigEndian.Uint32(raw[1:tokenHeader]))
	if key == nil {
		return uploadState{}, unknown
	}
	aead, err := tokenAEAD(key)
	if err != nil || len(raw) < tokenHeader+aead.NonceSize() {
		return uploadState{}, unknown
	}
	nonce, sealed := raw[tokenHeader:tokenHeader+aead.NonceSize()], raw[tokenHeader+aead.NonceSize():]
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
