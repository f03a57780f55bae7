package membership

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/hashicorp/memberlist"
)

// Gossip encryption. With keys configured, memberlist encrypts and
// authenticates every UDP packet and TCP stream with AES-GCM under the
// primary key, and accepts what any key of the ring opens; packets it
// cannot open are dropped, so a process without a key can neither read the
// members' metadata nor join. Keys rotate the Serf/Consul way: install the
// new key everywhere, make it primary everywhere, then remove the old one.

// Errors of keyring handling.
var (
	// ErrNotEncrypted: the keyring operation needs gossip encryption,
	// which this member runs without.
	ErrNotEncrypted = errors.New("membership: gossip is not encrypted (no gossip key configured)")
	// ErrBadKey: a gossip key is not 16, 24 or 32 bytes (AES-128/192/256).
	ErrBadKey = errors.New("membership: a gossip key is 16, 24 or 32 bytes, base64-encoded")
)

// ParseKeys reads a gossip key file: one base64 key per line, the first
// the primary. Blank lines and lines starting with # are skipped.
func ParseKeys(b []byte) ([][]byte, error) {
	var keys [][]byte
	sc := bufio.NewScanner(bytes.NewReader(b))
	for line := 1; sc.Scan(); line++ {
		s := strings.TrimSpace(sc.Text())
		if s == "" || strings.HasPrefix(s, "#") {
			continue
		}
		k, err := DecodeKey(s)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", line, err)
		}
		for _, o := range keys {
			if bytes.Equal(o, k) {
				return nil, fmt.Errorf("line %d: the key is listed twice", line)
			}
		}
		keys = append(keys, k)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(keys) == 0 {
		return nil, errors.New("no gossip key in the file")
	}
	return keys, nil
}

// ReadKeyFile reads and parses a gossip key file.
func ReadKeyFile(path string) ([][]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("gossip key file: %w", err)
	}
	keys, err := ParseKeys(b)
	if err != nil {
		return nil, fmt.Errorf("gossip key file %s: %w", path, err)
	}
	return keys, nil
}

// FormatKeys is the key file for keys, the primary first.
func FormatKeys(keys [][]byte) []byte {
	var b bytes.Buffer
	for _, k := range keys {
		b.WriteString(EncodeKey(k))
		b.WriteByte('\n')
	}
	return b.Bytes()
}

// DecodeKey parses one base64 gossip key and checks its length.
func DecodeKey(s string) ([]byte, error) {
	k, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadKey, err)
	}
	if err := checkKey(k); err != nil {
		return nil, err
	}
	return k, nil
}

// EncodeKey is the base64 form of a gossip key.
func EncodeKey(k []byte) string { return base64.StdEncoding.EncodeToString(k) }

func checkKey(k []byte) error {
	switch len(k) {
	case 16, 24, 32:
		return nil
	}
	return fmt.Errorf("%w (got %d bytes)", ErrBadKey, len(k))
}

// newKeyring builds memberlist's keyring, keys[0] primary; nil without
// keys (no encryption).
func newKeyring(keys [][]byte) (*memberlist.Keyring, error) {
	if len(keys) == 0 {
		return nil, nil
	}
	for _, k := range keys {
		if err := checkKey(k); err != nil {
			return nil, err
		}
	}
	return memberlist.NewKeyring(keys[1:], keys[0])
}

// keyring returns the running keyring, or an error when there is none.
func (m *Membership) keyring() (*memberlist.Keyring, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ring == nil {
		return nil, ErrNotEncrypted
	}
	return m.ring, nil
}

// Encrypted reports whether gossip is encrypted.
func (m *Membership) Encrypted() bool {
	_, err := m.keyring()
	return err == nil
}

// Keys returns this member's gossip keys, the primary first.
func (m *Membership) Keys() ([][]byte, error) {
	ring, err := m.keyring()
	if err != nil {
		return nil, err
	}
	primary := ring.GetPrimaryKey()
	keys := [][]byte{primary}
	for _, k := range ring.GetKeys() {
		if !bytes.Equal(k, primary) {
			keys = append(keys, k)
		}
	}
	return keys, nil
}

// InstallKey adds key to the ring: this member now opens what is sealed
// with it, and still seals with the primary.
func (m *Membership) InstallKey(key []byte) error {
	ring, err := m.keyring()
	if err != nil {
		return err
	}
	if err := checkKey(key); err != nil {
		return err
	}
	return ring.AddKey(key)
}

// UseKey makes an installed key the primary.
func (m *Membership) UseKey(key []byte) error {
	ring, err := m.keyring()
	if err != nil {
		return err
	}
	return ring.UseKey(key)
}

// RemoveKey drops a key that is not the primary.
func (m *Membership) RemoveKey(key []byte) error {
	ring, err := m.keyring()
	if err != nil {
		return err
	}
	return ring.RemoveKey(key)
}
