package gateway

import (
	"bytes"
	"encoding/base64"
	"strings"
	"testing"
	"time"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

var (
	tokenKey   = &pb.UploadKey{Id: 7, Key: bytes.Repeat([]byte{7}, 32)}
	tokenNow   = time.Unix(1_800_000_000, 0)
	tokenState = uploadState{
		Repo: "library/alpine", Region: "eu-west", ID: "0123456789abcdef0123456789abcdef",
		Offset: 1024, Hash: []byte{1, 2, 3, 250}, Expires: tokenNow.Add(time.Hour).Unix(),
	}
)

func TestTokenRoundTrip(t *testing.T) {
	tok := sealToken(tokenKey, tokenState)
	if strings.ContainsAny(tok, "/?#%&= +") {
		t.Errorf("token %q is not safe as a URL path segment", tok)
	}
	got, err := openToken(ring(tokenKey), tok, tokenState.Repo, tokenNow)
	if err != nil {
		t.Fatalf("parseToken: %v", err)
	}
	want := tokenState
	want.V = tokenVersion
	if got.V != want.V || got.Repo != want.Repo || got.Region != want.Region || got.ID != want.ID ||
		got.Offset != want.Offset || !bytes.Equal(got.Hash, want.Hash) || got.Expires != want.Expires {
		t.Errorf("round trip = %+v, want %+v", got, want)
	}
	if _, err := openToken(ring(tokenKey), tok, tokenState.Repo, tokenNow.Add(59*time.Minute)); err != nil {
		t.Errorf("token refused before it expires: %v", err)
	}
}

// ring is a key ring holding keys, as openToken looks keys up.
func ring(keys ...*pb.UploadKey) func(uint32) []byte {
	return func(id uint32) []byte {
		for _, k := range keys {
			if k.Id == id {
				return k.Key
			}
		}
		return nil
	}
}

// sealRaw seals an arbitrary payload for repo, as a gateway with the key
// would: what a forger holding the key could make.
func sealRaw(t *testing.T, key *pb.UploadKey, repo, payload string, format byte) string {
	t.Helper()
	aead, err := tokenAEAD(key.Key)
	if err != nil {
		t.Fatal(err)
	}
	nonce := bytes.Repeat([]byte{1}, aead.NonceSize())
	out := append([]byte{format, 0, 0, 0, byte(key.Id)}, nonce...)
	return base64.RawURLEncoding.EncodeToString(aead.Seal(out, nonce, []byte(payload), []byte(repo)))
}

// A token, decoded, shows nothing of the session: not the repository, not
// the store's upload id, not the hash state that holds the client's last
// unhashed bytes.
func TestTokenRevealsNothing(t *testing.T) {
	secret := []byte("THE-CLIENT'S-OWN-BYTES")
	st := tokenState
	st.Hash = append([]byte("sha\x03"), secret...)
	tok := sealToken(tokenKey, st)
	raw, err := base64.RawURLEncoding.DecodeString(tok)
	if err != nil {
		t.Fatal(err)
	}
	for _, leak := range [][]byte{secret, []byte(st.Repo), []byte(st.ID), []byte(st.Region), []byte(`"o":`), []byte(`"h":`)} {
		if bytes.Contains(raw, leak) || strings.Contains(tok, string(leak)) {
			t.Errorf("the token shows %q", leak)
		}
	}
	if tok == sealToken(tokenKey, st) {
		t.Error("two seals of one state are equal: the nonce is not fresh")
	}
}

func TestTokenRejected(t *testing.T) {
	good := sealToken(tokenKey, tokenState)
	raw, _ := base64.RawURLEncoding.DecodeString(good)
	flipByte := func(i int) string {
		b := bytes.Clone(raw)
		b[i] ^= 0x01
		return base64.RawURLEncoding.EncodeToString(b)
	}
	expired := tokenState
	expired.Expires = tokenNow.Unix()
	tests := []struct {
		name  string
		token string
		repo  string
	}{
		{"flipped format byte", flipByte(0), tokenState.Repo},
		{"flipped key id", flipByte(4), tokenState.Repo},
		{"flipped nonce byte", flipByte(7), tokenState.Repo},
		{"flipped ciphertext byte", flipByte(len(raw) / 2), tokenState.Repo},
		{"flipped tag byte", flipByte(len(raw) - 1), tokenState.Repo},
		{"truncated", base64.RawURLEncoding.EncodeToString(raw[:len(raw)-1]), tokenState.Repo},
		{"header only", base64.RawURLEncoding.EncodeToString(raw[:5]), tokenState.Repo},
		{"a retired key's token", sealToken(&pb.UploadKey{Id: 6, Key: tokenKey.Key}, tokenState), tokenState.Repo},
		{"wrong key", sealToken(&pb.UploadKey{Id: 7, Key: bytes.Repeat([]byte{8}, 32)}, tokenState), tokenState.Repo},
		{"empty key", sealToken(&pb.UploadKey{Id: 7}, tokenState), tokenState.Repo},
		{"token for another repository", good, "library/busybox"},
		{"token for a parent repository", good, "library"},
		{"sealed for one repository, naming another", sealRaw(t, tokenKey, "victim/repo", `{"v":1,"r":"library/alpine","i":"x","e":4000000000}`, tokenFormat), "victim/repo"},
		{"expired at the second", sealToken(tokenKey, expired), tokenState.Repo},
		{"expired long ago", sealToken(tokenKey, uploadState{Repo: tokenState.Repo, ID: tokenState.ID, Expires: 1}), tokenState.Repo},
		{"no expiry", sealToken(tokenKey, uploadState{Repo: tokenState.Repo, ID: tokenState.ID}), tokenState.Repo},
		{"wrong payload version", sealRaw(t, tokenKey, "library/alpine", `{"v":2,"r":"library/alpine","i":"x","e":4000000000}`, tokenFormat), tokenState.Repo},
		{"no payload version", sealRaw(t, tokenKey, "library/alpine", `{"r":"library/alpine","i":"x","e":4000000000}`, tokenFormat), tokenState.Repo},
		{"other sealing format", sealRaw(t, tokenKey, "library/alpine", `{"v":1,"r":"library/alpine","i":"x","e":4000000000}`, 1), tokenState.Repo},
		{"sealed garbage", sealRaw(t, tokenKey, "library/alpine", "not json", tokenFormat), tokenState.Repo},
		{"sealed wrong types", sealRaw(t, tokenKey, "library/alpine", `{"v":"1","r":1}`, tokenFormat), tokenState.Repo},
		{"the old signed JSON format", base64.RawURLEncoding.EncodeToString([]byte(`{"v":1,"r":"library/alpine"}`)) + ".c2ln", tokenState.Repo},
		{"garbage", "hello", tokenState.Repo},
		{"empty", "", tokenState.Repo},
		{"bad base64", "!!!!????", tokenState.Repo},
		{"overlong", sealRaw(t, tokenKey, "library/alpine", `{"v":1,"r":"library/alpine","i":"x","e":4000000000,"pad":"`+strings.Repeat("x", 4096)+`"}`, tokenFormat), tokenState.Repo},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := openToken(ring(tokenKey), tt.token, tt.repo, tokenNow)
			if err == nil {
				t.Fatal("token accepted")
			}
			if e := asError(err); e.Code != CodeBlobUploadUnknown {
				t.Errorf("code = %s (%d), want BLOB_UPLOAD_UNKNOWN (404)", e.Code.Value, e.Code.Status)
			}
		})
	}
	// The table's forgeries are refused for what they are, not because
	// sealRaw is broken: the same helper makes a token that opens.
	if _, err := openToken(ring(tokenKey), sealRaw(t, tokenKey, "library/alpine", `{"v":1,"r":"library/alpine","i":"x","e":4000000000}`, tokenFormat), "library/alpine", tokenNow); err != nil {
		t.Errorf("a well-formed sealed token was refused: %v", err)
	}
}

// Every refusal reads the same, so probing tells a client nothing.
func TestTokenRefusalsAreIndistinguishable(t *testing.T) {
	good := sealToken(tokenKey, tokenState)
	_, forged := openToken(ring(tokenKey), good+"x", tokenState.Repo, tokenNow)
	_, expired := openToken(ring(tokenKey), good, tokenState.Repo, tokenNow.Add(2*time.Hour))
	_, foreign := openToken(ring(tokenKey), good, "other", tokenNow)
	if forged.Error() != expired.Error() || expired.Error() != foreign.Error() {
		t.Errorf("refusals differ: %q, %q, %q", forged, expired, foreign)
	}
}

// After a rotation the newest key seals and every key in the ring opens:
// a session begun under the old key goes on, and a token naming a key the
// ring no longer holds is an unknown session.
func TestTokenKeyRotation(t *testing.T) {
	oldKey := &pb.UploadKey{Id: 1, Key: bytes.Repeat([]byte{1}, 32)}
	newKey := &pb.UploadKey{Id: 2, Key: bytes.Repeat([]byte{2}, 32)}
	old := sealToken(oldKey, tokenState)
	if _, err := openToken(ring(oldKey, newKey), old, tokenState.Repo, tokenNow); err != nil {
		t.Errorf("a token of the previous key after rotation: %v", err)
	}
	fresh := sealToken(newKey, tokenState)
	if _, err := openToken(ring(oldKey, newKey), fresh, tokenState.Repo, tokenNow); err != nil {
		t.Errorf("a token of the new key: %v", err)
	}
	if _, err := openToken(ring(newKey), old, tokenState.Repo, tokenNow); err == nil {
		t.Error("a token of a retired key was accepted")
	}
	// The id is authenticated too: the old token relabelled with the new
	// key's id does not open.
	raw, _ := base64.RawURLEncoding.DecodeString(old)
	raw[4] = 2
	if _, err := openToken(ring(oldKey, newKey), base64.RawURLEncoding.EncodeToString(raw), tokenState.Repo, tokenNow); err == nil {
		t.Error("a relabelled token was accepted")
	}
}
