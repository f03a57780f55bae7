package gateway

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

var (
	tokenKey   = bytes.Repeat([]byte{7}, 32)
	tokenNow   = time.Unix(1_800_000_000, 0)
	tokenState = uploadState{
		Repo: "library/alpine", Region: "eu-west", ID: "0123456789abcdef0123456789abcdef",
		Offset: 1024, Hash: []byte{1, 2, 3, 250}, Expires: tokenNow.Add(time.Hour).Unix(),
	}
)

func TestTokenRoundTrip(t *testing.T) {
	tok := signToken(tokenKey, tokenState)
	if strings.ContainsAny(tok, "/?#%&= +") {
		t.Errorf("token %q is not safe as a URL path segment", tok)
	}
	got, err := parseToken(tokenKey, tok, tokenState.Repo, tokenNow)
	if err != nil {
		t.Fatalf("parseToken: %v", err)
	}
	want := tokenState
	want.V = tokenVersion
	if got.V != want.V || got.Repo != want.Repo || got.Region != want.Region || got.ID != want.ID ||
		got.Offset != want.Offset || !bytes.Equal(got.Hash, want.Hash) || got.Expires != want.Expires {
		t.Errorf("round trip = %+v, want %+v", got, want)
	}
	if _, err := parseToken(tokenKey, tok, tokenState.Repo, tokenNow.Add(59*time.Minute)); err != nil {
		t.Errorf("token refused before it expires: %v", err)
	}
}

// reseal returns tok with its payload replaced by edit(payload), keeping the
// original signature: what a client that edits its own token would send.
func reseal(t *testing.T, tok string, edit func(map[string]any)) string {
	t.Helper()
	p, sig, _ := strings.Cut(tok, ".")
	raw, err := base64.RawURLEncoding.DecodeString(p)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatal(err)
	}
	edit(m)
	raw, _ = json.Marshal(m)
	return base64.RawURLEncoding.EncodeToString(raw) + "." + sig
}

// signed returns a correctly signed token over an arbitrary payload.
func signed(key []byte, payload string) string {
	p := base64.RawURLEncoding.EncodeToString([]byte(payload))
	return p + "." + base64.RawURLEncoding.EncodeToString(tokenMAC(key, p))
}

func TestTokenRejected(t *testing.T) {
	good := signToken(tokenKey, tokenState)
	payload, sig, _ := strings.Cut(good, ".")
	flip := func(s string, i int) string {
		b := []byte(s)
		if b[i] == 'A' {
			b[i] = 'B'
		} else {
			b[i] = 'A'
		}
		return string(b)
	}
	expired := tokenState
	expired.Expires = tokenNow.Unix()
	tests := []struct {
		name  string
		token string
		repo  string
	}{
		{"forged signature", payload + "." + flip(sig, 3), tokenState.Repo},
		{"signature of another payload", payload + "." + strings.Split(signToken(tokenKey, expired), ".")[1], tokenState.Repo},
		{"truncated signature", payload + "." + sig[:len(sig)-2], tokenState.Repo},
		{"no signature", payload + ".", tokenState.Repo},
		{"altered payload byte", flip(payload, 10) + "." + sig, tokenState.Repo},
		{"raised offset", reseal(t, good, func(m map[string]any) { m["o"] = 1 << 40 }), tokenState.Repo},
		{"extended expiry", reseal(t, good, func(m map[string]any) { m["e"] = 1 << 40 }), tokenState.Repo},
		{"other repository in payload", reseal(t, good, func(m map[string]any) { m["r"] = "victim/repo" }), "victim/repo"},
		{"wrong key", signToken(bytes.Repeat([]byte{8}, 32), tokenState), tokenState.Repo},
		{"empty key", signToken(nil, tokenState), tokenState.Repo},
		{"token for another repository", good, "library/busybox"},
		{"token for a parent repository", good, "library"},
		{"expired at the second", signToken(tokenKey, expired), tokenState.Repo},
		{"expired long ago", signToken(tokenKey, uploadState{Repo: tokenState.Repo, ID: tokenState.ID, Expires: 1}), tokenState.Repo},
		{"no expiry", signToken(tokenKey, uploadState{Repo: tokenState.Repo, ID: tokenState.ID}), tokenState.Repo},
		{"wrong version", signed(tokenKey, `{"v":2,"r":"library/alpine","i":"x","e":4000000000}`), tokenState.Repo},
		{"no version", signed(tokenKey, `{"r":"library/alpine","i":"x","e":4000000000}`), tokenState.Repo},
		{"signed garbage", signed(tokenKey, "not json"), tokenState.Repo},
		{"signed wrong types", signed(tokenKey, `{"v":"1","r":1}`), tokenState.Repo},
		{"garbage", "hello", tokenState.Repo},
		{"empty", "", tokenState.Repo},
		{"only a dot", ".", tokenState.Repo},
		{"bad base64", "!!!!.????", tokenState.Repo},
		{"overlong", signed(tokenKey, `{"v":1,"r":"library/alpine","i":"x","e":4000000000,"pad":"`+strings.Repeat("x", 4096)+`"}`), tokenState.Repo},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseToken(tokenKey, tt.token, tt.repo, tokenNow)
			if err == nil {
				t.Fatal("token accepted")
			}
			if e := asError(err); e.Code != CodeBlobUploadUnknown {
				t.Errorf("code = %s (%d), want BLOB_UPLOAD_UNKNOWN (404)", e.Code.Value, e.Code.Status)
			}
		})
	}
}

// Every refusal reads the same, so probing tells a client nothing.
func TestTokenRefusalsAreIndistinguishable(t *testing.T) {
	good := signToken(tokenKey, tokenState)
	_, forged := parseToken(tokenKey, good+"x", tokenState.Repo, tokenNow)
	_, expired := parseToken(tokenKey, good, tokenState.Repo, tokenNow.Add(2*time.Hour))
	_, foreign := parseToken(tokenKey, good, "other", tokenNow)
	if forged.Error() != expired.Error() || expired.Error() != foreign.Error() {
		t.Errorf("refusals differ: %q, %q, %q", forged, expired, foreign)
	}
}
