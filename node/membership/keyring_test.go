package membership

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
)

func newKey(t *testing.T) []byte {
	t.Helper()
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		t.Fatal(err)
	}
	return k
}

func withKeys(keys ...[]byte) func(*Config) {
	return func(c *Config) { c.Keys = keys }
}

func TestParseKeys(t *testing.T) {
	k1, k2 := EncodeKey(make([]byte, 32)), EncodeKey(make([]byte, 16))
	keys, err := ParseKeys([]byte("# rotated 2026-12\n" + k1 + "\n\n  " + k2 + "  \n"))
	if err != nil || len(keys) != 2 || len(keys[0]) != 32 || len(keys[1]) != 16 {
		t.Fatalf("ParseKeys: %d keys, %v", len(keys), err)
	}
	if got, _ := ParseKeys(FormatKeys(keys)); len(got) != 2 {
		t.Errorf("round trip lost keys: %d", len(got))
	}
	for _, bad := range []string{"", "# only a comment\n", "not base64!\n", EncodeKey(make([]byte, 20)) + "\n", k1 + "\n" + k1 + "\n"} {
		if _, err := ParseKeys([]byte(bad)); err == nil {
			t.Errorf("ParseKeys(%q) accepted", bad)
		}
	}
	if _, err := New(Config{Meta: Meta{ID: "a", ClusterID: "c", Role: RoleServer}, BindAddr: "127.0.0.1:0", Keys: [][]byte{make([]byte, 7)}}); !errors.Is(err, ErrBadKey) {
		t.Errorf("New with a 7-byte key: %v, want ErrBadKey", err)
	}
}

// An attacker on the gossip port, without the key or with a wrong one,
// can neither join nor read the members' metadata.
func TestEncryptedGossipRefusesStrangers(t *testing.T) {
	key := newKey(t)
	a := startMember(t, "n1", withKeys(key))
	b := startMember(t, "n2", withKeys(key))
	joinTo(t, b, a)
	waitFor(t, 5*time.Second, "n1 sees n2", func() error { return sees(a, "n2", StateAlive, b.Addr()) })
	if !a.Encrypted() {
		t.Fatal("n1 reports plaintext gossip")
	}

	for _, tc := range []struct {
		name string
		keys [][]byte
	}{
		{"no key", nil},
		{"wrong key", [][]byte{newKey(t)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rogue := startMember(t, "rogue-"+strings.ReplaceAll(tc.name, " ", "-"), withKeys(tc.keys...))
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			defer cancel()
			if err := rogue.Join(ctx, []string{a.Addr()}); err == nil {
				t.Fatal("a member without the cluster's key joined")
			}
			if n := len(rogue.Members()); n != 1 {
				t.Errorf("the rogue member learned %d members: %+v", n, rogue.Members())
			}
		})
	}

	// A bare memberlist process, speaking the protocol with no keyring,
	// the way a generic tool would.
	cfg := memberlist.DefaultLocalConfig()
	cfg.Name, cfg.BindAddr, cfg.BindPort = "raw-prober", "127.0.0.1", 0
	cfg.TCPTimeout = time.Second
	cfg.Logger = log.New(io.Discard, "", 0)
	raw, err := memberlist.Create(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Shutdown()
	if n, err := raw.Join([]string{a.Addr()}); err == nil || n > 0 {
		t.Errorf("a plain memberlist joined %d members (err %v)", n, err)
	}
	for _, m := range raw.Members() {
		if m.Name != "raw-prober" {
			t.Errorf("a plain memberlist learned member %s with metadata %q", m.Name, m.Meta)
		}
	}

	// Meanwhile the cluster never admitted anyone else.
	for _, m := range []testMember{a, b} {
		for _, x := range m.Members() {
			if x.ID != "n1" && x.ID != "n2" {
				t.Errorf("%s admitted %s", m.Local().ID, x.ID)
			}
		}
	}
}

// Rotation the Serf way: install the new key everywhere, use it, remove
// the old one. Members keep seeing each other throughout; afterwards only
// the new key gets in.
func TestGossipKeyRotation(t *testing.T) {
	oldKey, newK := newKey(t), newKey(t)
	var ms []testMember
	for i := range 3 {
		m := startMember(t, fmt.Sprintf("n%d", i+1), withKeys(oldKey))
		if i > 0 {
			joinTo(t, m, ms[0])
		}
		ms = append(ms, m)
	}
	allAlive := func() error {
		for _, m := range ms {
			for _, o := range ms {
				if err := sees(m, o.Local().ID, StateAlive, ""); err != nil {
					return err
				}
			}
		}
		return nil
	}
	waitFor(t, 5*time.Second, "convergence", allAlive)

	step := func(what string, f func(testMember) error) {
		t.Helper()
		for _, m := range ms {
			if err := f(m); err != nil {
				t.Fatalf("%s on %s: %v", what, m.Local().ID, err)
			}
		}
		// Several probe rounds with every member on the new ring.
		stillTrue(t, time.Second, "members alive after "+what, allAlive)
	}
	step("install", func(m testMember) error { return m.InstallKey(newK) })
	step("use", func(m testMember) error { return m.UseKey(newK) })
	if err := ms[0].RemoveKey(newK); err == nil {
		t.Error("the primary key could be removed")
	}
	step("remove", func(m testMember) error { return m.RemoveKey(oldKey) })
	keys, err := ms[1].Keys()
	if err != nil || len(keys) != 1 || string(keys[0]) != string(newK) {
		t.Fatalf("keys after rotation: %d, %v", len(keys), err)
	}

	late := startMember(t, "late", withKeys(newK))
	joinTo(t, late, ms[2])
	stale := startMember(t, "stale", withKeys(oldKey))
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := stale.Join(ctx, []string{ms[0].Addr()}); err == nil {
		t.Error("a member with the removed key joined")
	}
	if err := startMember(t, "plain").InstallKey(newK); !errors.Is(err, ErrNotEncrypted) {
		t.Errorf("InstallKey on a plaintext member: %v, want ErrNotEncrypted", err)
	}
}

// One member asked rotates every member's keyring: install, use, remove,
// each answered by all, each recorded through OnKeysChanged.
func TestChangeKeyringAcrossMembers(t *testing.T) {
	oldKey, newK := newKey(t), newKey(t)
	var mu sync.Mutex
	saved := map[string][][]byte{}
	record := func(id string) func(*Config) {
		return func(c *Config) {
			c.Keys = [][]byte{oldKey}
			c.OnKeysChanged = func(keys [][]byte) error {
				mu.Lock()
				defer mu.Unlock()
				saved[id] = keys
				return nil
			}
		}
	}
	var ms []testMember
	for i := range 3 {
		id := fmt.Sprintf("n%d", i+1)
		m := startMember(t, id, record(id))
		if i > 0 {
			joinTo(t, m, ms[0])
		}
		ms = append(ms, m)
	}
	for _, m := range ms {
		for _, o := range ms {
			waitFor(t, 5*time.Second, "convergence", func() error { return sees(m, o.Local().ID, StateAlive, "") })
		}
	}
	change := func(op KeyOp, key []byte, wantKeys int, wantPrimary []byte) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		answers, err := ms[1].ChangeKeyring(ctx, op, key)
		if err != nil {
			t.Fatalf("%v: %v", op, err)
		}
		if len(answers) != 3 {
			t.Fatalf("%v: %d answers, want 3: %+v", op, len(answers), answers)
		}
		for _, a := range answers {
			if a.Err != "" || len(a.Keys) != wantKeys || !bytes.Equal(a.Keys[0], wantPrimary) {
				t.Errorf("%v: %s answered %q with %d keys", op, a.Member, a.Err, len(a.Keys))
			}
		}
	}
	change(KeyInstall, newK, 2, oldKey)
	change(KeyUse, newK, 2, newK)
	change(KeyRemove, oldKey, 1, newK)
	change(KeyList, nil, 1, newK)
	mu.Lock()
	for _, m := range ms {
		if keys := saved[m.Local().ID]; len(keys) != 1 || !bytes.Equal(keys[0], newK) {
			t.Errorf("%s recorded %d keys after the rotation", m.Local().ID, len(keys))
		}
	}
	mu.Unlock()

	// The primary cannot go; the operation stops before anyone is asked.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := ms[0].ChangeKeyring(ctx, KeyRemove, newK); err == nil {
		t.Error("removing the primary key succeeded")
	}
	// Only the new key gets in now.
	late := startMember(t, "late", withKeys(newK))
	joinTo(t, late, ms[2])
	stale := startMember(t, "stale", withKeys(oldKey))
	jctx, jcancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer jcancel()
	if err := stale.Join(jctx, []string{ms[0].Addr()}); err == nil {
		t.Error("a member with the removed key joined")
	}
}
