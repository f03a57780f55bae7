package replication_test

import (
	"errors"
	"net/url"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meridian-registry/meridian/replication"
	"github.com/meridian-registry/meridian/replication/s3test"
)

func TestParseStoreURL(t *testing.T) {
	s3 := func(f func(*replication.S3Config)) replication.StoreURL {
		c := replication.S3Config{
			Endpoint: "minio.local:9000", Bucket: "blobs", Region: "us-east-1",
			Secure: true, PathStyle: true, PartSize: 16 << 20,
		}
		f(&c)
		return replication.StoreURL{Scheme: "s3", S3: c}
	}
	tests := []struct {
		raw  string
		want replication.StoreURL
	}{
		{"file:///var/lib/meridian", replication.StoreURL{Scheme: "file", Path: "/var/lib/meridian"}},
		{"file://data/eu", replication.StoreURL{Scheme: "file", Path: filepath.Clean("data/eu")}},
		{"file://./data/", replication.StoreURL{Scheme: "file", Path: "data"}},
		{"s3://minio.local:9000/blobs", s3(func(*replication.S3Config) {})},
		{"S3://AK:SK@minio.local:9000/blobs/", s3(func(c *replication.S3Config) { c.AccessKey, c.SecretKey = "AK", "SK" })},
		{
			"s3://AK:s%2Fk%40x%3A@minio.local:9000/blobs/eu/west/?secure=false&region=eu-west-1&path_style=false&part_size=32MiB",
			s3(func(c *replication.S3Config) {
				c.AccessKey, c.SecretKey, c.Prefix = "AK", "s/k@x:", "eu/west/"
				c.Secure, c.Region, c.PathStyle, c.PartSize = false, "eu-west-1", false, 32<<20
			}),
		},
		{"s3://minio.local:9000/blobs?part_size=5242880", s3(func(c *replication.S3Config) { c.PartSize = 5 << 20 })},
		{"s3://minio.local:9000/blobs?part_size=1GiB", s3(func(c *replication.S3Config) { c.PartSize = 1 << 30 })},
		{"s3://[::1]:9000/blobs", s3(func(c *replication.S3Config) { c.Endpoint = "[::1]:9000" })},
		{"s3://s3.amazonaws.com/blobs", s3(func(c *replication.S3Config) { c.Endpoint = "s3.amazonaws.com" })},
	}
	for _, tt := range tests {
		t.Run(tt.raw, func(t *testing.T) {
			got, err := replication.ParseStoreURL(tt.raw)
			if err != nil {
				t.Fatalf("ParseStoreURL: %v", err)
			}
			if got != tt.want {
				t.Fatalf("ParseStoreURL = %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

func TestParseStoreURLErrors(t *testing.T) {
	tests := []struct {
		raw, want string
	}{
		{"", "want file:///path or s3://host/bucket"},
		{"/var/lib/meridian", "want file:///path or s3://host/bucket"},
		{"http://AK:s3kr1t@host/b", `unknown scheme "http"`},
		{"file://", "no path"},
		{"file:///data?sync=1", "no query"},
		{"s3://AK:s3kr1t@/b", "no host"},
		{"s3://AK:s3kr1t@host:99999/b", `port "99999"`},
		{"s3://AK:s3kr1t@host:nine/b", `port "nine"`},
		{"s3://AK:s3kr1t@host:/b", `port ""`},
		{"s3://AK:s3kr1t@ho st/b", "not a host name"},
		{"s3://AK:s3kr1t@host:9000", "no bucket"},
		{"s3://AK:s3kr1t@host:9000/", "no bucket"},
		{"s3://AK:s3kr1t@host/Bad_Bucket", `bucket "Bad_Bucket"`},
		{"s3://AK:s3kr1t@host/b", `bucket "b"`}, // too short for S3
		{"s3://AK:s3kr1t@host/blobs/a//c", "prefix"},
		{"s3://AK:s3kr1t@host/blobs/../c", "prefix"},
		{"s3://AK:s3kr1t@host/blobs/%zz", "prefix"},
		{"s3://AK:s3kr1t@host/blobs?secure=maybe", `secure="maybe"`},
		{"s3://AK:s3kr1t@host/blobs?path_style=2", `path_style="2"`},
		{"s3://AK:s3kr1t@host/blobs?part_size=1MiB", "5MiB to 5GiB"},
		{"s3://AK:s3kr1t@host/blobs?part_size=lots", `part_size="lots"`},
		{"s3://AK:s3kr1t@host/blobs?part_size=-5MiB", `part_size="-5MiB"`},
		{"s3://AK:s3kr1t@host/blobs?region=", "region"},
		{"s3://AK:s3kr1t@host/blobs?colour=red", `unknown query parameter "colour"`},
		{"s3://AK:s3kr1t@host/blobs?secure=true&secure=false", "secure given 2 times"},
		{"s3://AK:s3kr1t@host/blobs?a=%zz", "query"},
		{"s3://AK:s3kr1t@host/blobs#x", "fragment"},
		{"s3://AK@host/blobs", "without a secret"},
		{"s3://AK:@host/blobs", "without a secret"},
		{"s3://:s3kr1t@host/blobs", "without an access key"},
		{"s3://AK:s3k%zzr1t@host/blobs", "secret key: bad percent-encoding"},
		{"s3://AK:s3k/r1t@host/blobs", "percent-encode the credentials"},
		{"s3://AK:s3k?r1t@host/blobs", "percent-encode the credentials"},
		{"s3://AK:s3k#r1t@host/blobs", "percent-encode the credentials"},
	}
	for _, tt := range tests {
		t.Run(tt.raw, func(t *testing.T) {
			_, err := replication.ParseStoreURL(tt.raw)
			if err == nil {
				t.Fatal("ParseStoreURL succeeded")
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not mention %q", err, tt.want)
			}
			if strings.Contains(err.Error(), "s3k") || strings.Contains(err.Error(), "r1t") {
				t.Errorf("error %q shows the secret", err)
			}
			if red := replication.RedactStoreURL(tt.raw); strings.Contains(red, "s3k") || strings.Contains(red, "r1t") {
				t.Errorf("RedactStoreURL = %q shows the secret", red)
			}
		})
	}
}

func TestRedactStoreURL(t *testing.T) {
	const canonical = "s3://host:9000/blobs/eu?part_size=16MiB&path_style=true&region=us-east-1&secure=true"
	same := []string{
		"s3://AK:s3kr1t@host:9000/blobs/eu",
		"s3://host:9000/blobs/eu/",
		"s3://OTHER:KEYS@host:9000/blobs/eu?region=us-east-1&secure=true",
		"s3://host:9000/blobs/eu?secure=1&path_style=true&part_size=16777216",
	}
	for _, raw := range same {
		if got := replication.RedactStoreURL(raw); got != canonical {
			t.Errorf("RedactStoreURL(%s) = %s; want %s", raw, got, canonical)
		}
	}
	different := []string{
		"s3://host:9000/blobs/us",
		"s3://host:9000/blobs",
		"s3://host:9000/blobs/eu?secure=false",
		"s3://host:9001/blobs/eu",
		"s3://host:9000/other/eu",
	}
	for _, raw := range different {
		if got := replication.RedactStoreURL(raw); got == canonical {
			t.Errorf("RedactStoreURL(%s) = %s, the same as another store's", raw, got)
		}
	}
	for raw, want := range map[string]string{
		"file:///data/eu":                        "file:///data/eu",
		"file://data//eu/":                       "file://" + filepath.Clean("data/eu"),
		"s3://host/blobs/a%20b":                  "s3://host/blobs/a%20b?part_size=16MiB&path_style=true&region=us-east-1&secure=true",
		"s3://AK:s3k/r1t@host:bad/blobs":         "s3://host:bad/blobs",
		"ftp://user:pw@host/x":                   "ftp://host/x",
		"no scheme at all":                       "no scheme at all",
		"user:pw@host":                           "(redacted)",
		"s3://AK:s3kr1t@host/blobs?part_size=1B": "s3://host/blobs?part_size=1B",
	} {
		if got := replication.RedactStoreURL(raw); got != want {
			t.Errorf("RedactStoreURL(%q) = %q; want %q", raw, got, want)
		}
	}
	// A parsed URL's canonical form parses to the same store.
	u, err := replication.ParseStoreURL("s3://AK:SK@host:9000/blobs/a%20b/c?part_size=6MiB&secure=false")
	if err != nil {
		t.Fatal(err)
	}
	again, err := replication.ParseStoreURL(u.String())
	if err != nil {
		t.Fatalf("canonical form %s does not parse: %v", u, err)
	}
	u.S3.AccessKey, u.S3.SecretKey = "", ""
	if again != u {
		t.Fatalf("canonical form %s parses to %+v, want %+v", u, again, u)
	}
}

func TestCredentialsFromEnv(t *testing.T) {
	env := map[string]string{
		"MERIDIAN_REGION_EU_WEST_1_ACCESS_KEY": "ak",
		"MERIDIAN_REGION_EU_WEST_1_SECRET_KEY": "sk",
		"MERIDIAN_REGION_US_ACCESS_KEY":        "only-access",
	}
	lookup := func(k string) (string, bool) { v, ok := env[k]; return v, ok }
	for _, tt := range []struct{ region, access, secret string }{
		{"eu-west.1", "ak", "sk"},
		{"EU-WEST-1", "ak", "sk"},
		{"us", "only-access", ""},
		{"ap", "", ""},
	} {
		if a, s := replication.CredentialsFromEnv(tt.region, lookup); a != tt.access || s != tt.secret {
			t.Errorf("CredentialsFromEnv(%q) = %q, %q; want %q, %q", tt.region, a, s, tt.access, tt.secret)
		}
	}
}

func TestOpenStore(t *testing.T) {
	ctx := t.Context()
	dir := t.TempDir()
	d, err := replication.OpenStore(ctx, replication.StoreConfig{Region: "eu", URL: "file://" + dir})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := d.(*replication.Filesystem); !ok {
		t.Fatalf("file URL opened a %T", d)
	}
	for _, tt := range []struct {
		name string
		cfg  replication.StoreConfig
		want []string
	}{
		{"bad URL", replication.StoreConfig{Region: "eu", URL: "s3://AK:s3kr1t@host:x/blobs"}, []string{`region "eu"`, "port"}},
		{"no credentials", replication.StoreConfig{Region: "eu-west", URL: "s3://host:9000/blobs"},
			[]string{`region "eu-west"`, "MERIDIAN_REGION_EU_WEST_ACCESS_KEY", "MERIDIAN_REGION_EU_WEST_SECRET_KEY"}},
		{"half the credentials", replication.StoreConfig{Region: "eu", URL: "s3://AK:s3kr1t@host:9000/blobs", AccessKey: "ak"},
			[]string{"set both"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := replication.OpenStore(ctx, tt.cfg)
			if err == nil {
				t.Fatal("OpenStore succeeded")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "s3kr1t") {
				t.Errorf("error %q shows the secret", err)
			}
		})
	}
}

func TestOpenStoreS3(t *testing.T) {
	srv := s3test.Start(t)
	srv.CreateBucket(t, "region-eu")
	ctx := t.Context()
	d, err := replication.OpenStore(ctx, replication.StoreConfig{Region: "eu", URL: srv.URL("region-eu") + "&part_size=5MiB"})
	if err != nil {
		t.Fatal(err)
	}
	if s, ok := d.(*replication.S3); !ok || s.Endpoint() != srv.Endpoint() {
		t.Fatalf("s3 URL opened %T %v", d, d)
	}
	// Credentials from the environment replace those in the URL.
	u, err := url.Parse(srv.URL("region-eu"))
	if err != nil {
		t.Fatal(err)
	}
	u.User = url.UserPassword("wrong", "wrong-secret")
	if _, err := replication.OpenStore(ctx, replication.StoreConfig{
		Region: "eu", URL: u.String(), AccessKey: srv.AccessKey(), SecretKey: srv.SecretKey(),
	}); err != nil {
		t.Fatalf("OpenStore with credentials from the environment: %v", err)
	}
	_, err = replication.OpenStore(ctx, replication.StoreConfig{Region: "eu", URL: u.String()})
	if err == nil || !strings.Contains(err.Error(), "credentials") || strings.Contains(err.Error(), "wrong-secret") {
		t.Fatalf("OpenStore with wrong credentials: %v; want an error about credentials, without the secret", err)
	}
	_, err = replication.OpenStore(ctx, replication.StoreConfig{Region: "us", URL: srv.URL("region-us")})
	if err == nil || !strings.Contains(err.Error(), `bucket "region-us" does not exist`) || !strings.Contains(err.Error(), `region "us"`) {
		t.Fatalf("OpenStore of a missing bucket: %v", err)
	}
	if errors.Is(err, replication.ErrBlobNotFound) {
		t.Fatal("a missing bucket is not a missing blob")
	}
}

// TestOpenStoreUnreachable: a store that is down when a process starts
// must not keep it from starting (one region's outage would otherwise stop
// every restart elsewhere); the driver works once the server is back.
func TestOpenStoreUnreachable(t *testing.T) {
	srv := s3test.Start(t)
	srv.CreateBucket(t, "region-eu")
	srv.Stop()
	ctx := t.Context()
	d, err := replication.OpenStore(ctx, replication.StoreConfig{Region: "eu", URL: srv.URL("region-eu")})
	if !errors.Is(err, replication.ErrStoreUnreachable) || d == nil {
		t.Fatalf("OpenStore of a stopped server: driver %v, error %v; want a driver and ErrStoreUnreachable", d, err)
	}
	if !strings.Contains(err.Error(), `region "eu"`) {
		t.Errorf("error %q does not name the region", err)
	}
	srv.Restart()
	id, err := d.StartUpload(ctx)
	if err != nil {
		t.Fatalf("StartUpload once the server is back: %v", err)
	}
	if err := d.CancelUpload(ctx, id); err != nil {
		t.Fatal(err)
	}
}
