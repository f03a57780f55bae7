package replication

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"unicode"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/minio/minio-go/v7/pkg/s3utils"
)

// StoreConfig says where a region keeps its blobs.
type StoreConfig struct {
	// Region is the Meridian region's name, used in messages.
	Region string
	// URL is a store URL (see ParseStoreURL).
	URL string
	// AccessKey and SecretKey replace the credentials of an s3:// URL when
	// set (both or neither); Meridian reads them with CredentialsFromEnv.
	AccessKey string
	SecretKey string
}

// StoreURL is a parsed store URL.
type StoreURL struct {
	Scheme string   // "file" or "s3"
	Path   string   // file: the directory, as written (relative to the working directory unless absolute)
	S3     S3Config // s3: everything, credentials included if the URL had them
}

// Store URL query parameters of s3:// URLs and their defaults.
const (
	defaultStoreRegion    = "us-east-1"
	defaultStoreSecure    = true
	defaultStorePathStyle = true // most S3-compatible servers want it; AWS accepts it
)

// ParseStoreURL parses a store URL:
//
//	file:///abs/path                 a directory (NewFilesystem)
//	file://rel/path                  the same, relative to the process's working directory
//	s3://ACCESS:SECRET@HOST[:PORT]/BUCKET[/prefix][?secure=…&region=…&path_style=…&part_size=…]
//
// A file URL's path is everything after "file://", taken literally (no
// percent-decoding, no query). In s3:// URLs the credentials are optional
// (see StoreConfig) and percent-encoded: a '/', '?', '#', '@' or '%' in a
// key must be written %2F, %3F, %23, %40, %25. Query parameters: secure
// (HTTPS, default true), region (default us-east-1), path_style (default
// true), part_size (bytes, or with a KiB, MiB or GiB suffix; default 16MiB,
// at least 5MiB). Errors never contain the secret.
func ParseStoreURL(raw string) (StoreURL, error) {
	scheme, rest, ok := strings.Cut(raw, "://")
	if !ok {
		return StoreURL{}, storeURLError(raw, "want file:///path or s3://host/bucket")
	}
	switch strings.ToLower(scheme) {
	case "file":
		return parseFileURL(raw, rest)
	case "s3":
		return parseS3URL(raw, rest)
	}
	return StoreURL{}, storeURLError(raw, fmt.Sprintf("unknown scheme %q (want file or s3)", scheme))
}

func parseFileURL(raw, path string) (StoreURL, error) {
	switch {
	case path == "":
		return StoreURL{}, storeURLError(raw, "no path (file:///abs/path or file://relative/path)")
	case strings.ContainsAny(path, "?#"):
		return StoreURL{}, storeURLError(raw, "a file URL takes no query or fragment")
	}
	return StoreURL{Scheme: "file", Path: filepath.Clean(path)}, nil
}

func parseS3URL(raw, rest string) (StoreURL, error) {
	// Split the authority off by hand rather than with url.Parse, whose
	// errors quote the input: a secret with an unencoded '/' would end up
	// in a log.
	authEnd := strings.IndexAny(rest, "/?#")
	if authEnd < 0 {
		authEnd = len(rest)
	}
	if strings.Contains(rest[authEnd:], "@") {
		return StoreURL{}, storeURLError(raw, "'@' after the host: percent-encode the credentials ('/' as %2F, '?' as %3F, '#' as %23, '@' as %40)")
	}
	authority, tail := rest[:authEnd], rest[authEnd:]
	cfg := S3Config{Region: defaultStoreRegion, Secure: defaultStoreSecure, PathStyle: defaultStorePathStyle, PartSize: DefaultS3PartSize}
	if at := strings.LastIndex(authority, "@"); at >= 0 {
		var err error
		if cfg.AccessKey, cfg.SecretKey, err = parseUserinfo(authority[:at]); err != nil {
			return StoreURL{}, storeURLError(raw, err.Error())
		}
		authority = authority[at+1:]
	}
	if err := checkHostPort(authority); err != nil {
		return StoreURL{}, storeURLError(raw, err.Error())
	}
	cfg.Endpoint = authority
	path, query, _ := strings.Cut(tail, "?")
	if strings.Contains(tail, "#") {
		return StoreURL{}, storeURLError(raw, "a store URL takes no fragment")
	}
	bucket, prefix, _ := strings.Cut(strings.TrimPrefix(path, "/"), "/")
	if bucket == "" {
		return StoreURL{}, storeURLError(raw, "no bucket (s3://host:port/BUCKET[/prefix])")
	}
	if err := s3utils.CheckValidBucketNameStrict(bucket); err != nil {
		return StoreURL{}, storeURLError(raw, fmt.Sprintf("bucket %q: %v", bucket, err))
	}
	cfg.Bucket = bucket
	if prefix = strings.TrimSuffix(prefix, "/"); prefix != "" {
		p, err := url.PathUnescape(prefix)
		if err != nil {
			return StoreURL{}, storeURLError(raw, fmt.Sprintf("prefix %q: bad percent-encoding", prefix))
		}
		for _, seg := range strings.Split(p, "/") {
			if seg == "" || seg == "." || seg == ".." {
				return StoreURL{}, storeURLError(raw, fmt.Sprintf("prefix %q has an empty, . or .. segment", p))
			}
		}
		cfg.Prefix = p + "/"
	}
	if err := parseS3Query(&cfg, query); err != nil {
		return StoreURL{}, storeURLError(raw, err.Error())
	}
	return StoreURL{Scheme: "s3", S3: cfg}, nil
}

func parseUserinfo(userinfo string) (access, secret string, err error) {
	user, pass, hasPass := strings.Cut(userinfo, ":")
	if access, err = url.PathUnescape(user); err != nil {
		return "", "", errors.New("access key: bad percent-encoding")
	}
	if secret, err = url.PathUnescape(pass); err != nil {
		return "", "", errors.New("secret key: bad percent-encoding")
	}
	switch {
	case access == "":
		return "", "", errors.New("credentials without an access key (want ACCESS:SECRET@host)")
	case !hasPass || secret == "":
		return "", "", errors.New("an access key without a secret key (want ACCESS:SECRET@host)")
	}
	return access, secret, nil
}

func checkHostPort(hostport string) error {
	if hostport == "" {
		return errors.New("no host (s3://host:port/bucket)")
	}
	host, port := hostport, ""
	if strings.HasPrefix(hostport, "[") || strings.Count(hostport, ":") == 1 {
		var err error
		if host, port, err = net.SplitHostPort(hostport); err != nil {
			return fmt.Errorf("host %q: want host or host:port", hostport)
		}
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return fmt.Errorf("port %q is not a number from 1 to 65535", port)
		}
	}
	if host == "" || strings.ContainsFunc(host, func(r rune) bool {
		return !(r == '.' || r == '-' || r == ':' || r == '_' || r < unicode.MaxASCII && (unicode.IsLetter(r) || unicode.IsDigit(r)))
	}) {
		return fmt.Errorf("host %q is not a host name or IP address", host)
	}
	return nil
}

func parseS3Query(cfg *S3Config, query string) error {
	values, err := url.ParseQuery(query)
	if err != nil {
		return fmt.Errorf("query: %v", err)
	}
	for key, vs := range values {
		if len(vs) != 1 {
			return fmt.Errorf("query parameter %s given %d times", key, len(vs))
		}
		v := vs[0]
		switch key {
		case "secure", "path_style":
			b, err := strconv.ParseBool(v)
			if err != nil {
				return fmt.Errorf("%s=%q: want true or false", key, v)
			}
			if key == "secure" {
				cfg.Secure = b
			} else {
				cfg.PathStyle = b
			}
		case "region":
			if v == "" || strings.ContainsAny(v, " /") {
				return fmt.Errorf("region=%q is not an S3 region", v)
			}
			cfg.Region = v
		case "part_size":
			n, err := parseSize(v)
			if err != nil {
				return fmt.Errorf("part_size=%q: %v", v, err)
			}
			if n < S3MinPartSize || n > s3MaxPartSize {
				return fmt.Errorf("part_size=%q: S3 parts are 5MiB to 5GiB", v)
			}
			cfg.PartSize = n
		default:
			return fmt.Errorf("unknown query parameter %q (known: secure, region, path_style, part_size)", key)
		}
	}
	return nil
}

var sizeUnits = []struct {
	suffix string
	n      int64
}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"B", 1}, {"", 1}}

// parseSize parses a byte count with an optional KiB, MiB or GiB suffix.
func parseSize(s string) (int64, error) {
	for _, u := range sizeUnits {
		num, ok := strings.CutSuffix(s, u.suffix)
		if !ok {
			continue
		}
		n, err := strconv.ParseInt(num, 10, 64)
		if err != nil || n < 0 || n > (1<<62)/u.n {
			return 0, errors.New("want a byte count such as 16MiB, 8388608 or 512KiB")
		}
		return n * u.n, nil
	}
	panic("unreachable: the empty suffix matches")
}

func formatSize(n int64) string {
	for _, u := range sizeUnits[:3] {
		if n%u.n == 0 {
			return strconv.FormatInt(n/u.n, 10) + u.suffix
		}
	}
	return strconv.FormatInt(n, 10)
}

// String is the URL in canonical form without credentials: the same store
// always gives the same string, whatever the order of the query
// parameters, defaults written or not, or where the credentials came from.
func (u StoreURL) String() string {
	if u.Scheme == "file" {
		return "file://" + u.Path
	}
	c := u.S3
	path := "/" + c.Bucket
	if p := strings.TrimSuffix(c.Prefix, "/"); p != "" {
		path += "/" + (&url.URL{Path: p}).EscapedPath()
	}
	q := url.Values{
		"part_size":  {formatSize(c.PartSize)},
		"path_style": {strconv.FormatBool(c.PathStyle)},
		"region":     {c.Region},
		"secure":     {strconv.FormatBool(c.Secure)},
	}
	return "s3://" + c.Endpoint + path + "?" + q.Encode()
}

// RedactStoreURL returns raw without credentials, for logs, status pages and
// comparing the region lists of nodes: a valid URL in canonical form (see
// StoreURL.String), an invalid one with everything up to its last '@'
// removed. It is deterministic.
func RedactStoreURL(raw string) string {
	if u, err := ParseStoreURL(raw); err == nil {
		return u.String()
	}
	return redactRaw(raw)
}

// redactRaw drops what could be credentials from a URL that does not parse.
// Whatever the secret holds, it lies before the last '@'.
func redactRaw(raw string) string {
	scheme, rest, ok := strings.Cut(raw, "://")
	if !ok {
		if strings.Contains(raw, "@") {
			return "(redacted)"
		}
		return raw
	}
	if at := strings.LastIndex(rest, "@"); at >= 0 {
		rest = rest[at+1:]
	}
	return scheme + "://" + rest
}

func storeURLError(raw, problem string) error {
	return fmt.Errorf("replication: store URL %s: %s", redactRaw(raw), problem)
}

// CredentialsFromEnv returns the S3 credentials of region from the
// variables MERIDIAN_REGION_<NAME>_ACCESS_KEY and _SECRET_KEY, where NAME is
// the region's name upper-cased with '-' and '.' turned into '_' (region
// "eu-west.1" reads MERIDIAN_REGION_EU_WEST_1_ACCESS_KEY). Unset variables
// give empty strings. lookup is os.LookupEnv outside tests.
func CredentialsFromEnv(region string, lookup func(string) (string, bool)) (access, secret string) {
	accessVar, secretVar := credentialVars(region)
	access, _ = lookup(accessVar)
	secret, _ = lookup(secretVar)
	return access, secret
}

func credentialVars(region string) (accessVar, secretVar string) {
	name := strings.Map(func(r rune) rune {
		if r == '-' || r == '.' {
			return '_'
		}
		return unicode.ToUpper(r)
	}, region)
	return "MERIDIAN_REGION_" + name + "_ACCESS_KEY", "MERIDIAN_REGION_" + name + "_SECRET_KEY"
}

// OpenStore opens the driver of a region's store: NewFilesystem for file://
// URLs, NewS3 (which checks the bucket and credentials) for s3:// URLs.
// With an error wrapping ErrStoreUnreachable it also returns the driver,
// which works once the store answers.
func OpenStore(ctx context.Context, cfg StoreConfig) (Driver, error) {
	u, err := ParseStoreURL(cfg.URL)
	if err != nil {
		return nil, fmt.Errorf("%w (region %q)", err, cfg.Region)
	}
	switch u.Scheme {
	case "file":
		d, err := NewFilesystem(u.Path)
		if err != nil {
			return nil, fmt.Errorf("%w (region %q)", err, cfg.Region)
		}
		return d, nil
	default:
		s3cfg, err := s3ConfigOf(cfg, u)
		if err != nil {
			return nil, err
		}
		d, err := NewS3(ctx, s3cfg)
		if err != nil {
			err = fmt.Errorf("%w (region %q)", err, cfg.Region)
			if d != nil {
				return d, err // unreachable for now, usable later
			}
			return nil, err
		}
		return d, nil
	}
}

// s3ConfigOf is the S3 configuration of an s3:// store, with the
// credentials of cfg in place of the URL's when cfg has them.
func s3ConfigOf(cfg StoreConfig, u StoreURL) (S3Config, error) {
	s3cfg := u.S3
	accessVar, secretVar := credentialVars(cfg.Region)
	switch {
	case (cfg.AccessKey == "") != (cfg.SecretKey == ""):
		return S3Config{}, fmt.Errorf("replication: region %q: store %s: set both %s and %s, or neither", cfg.Region, u, accessVar, secretVar)
	case cfg.AccessKey != "":
		s3cfg.AccessKey, s3cfg.SecretKey = cfg.AccessKey, cfg.SecretKey
	case s3cfg.AccessKey == "":
		return S3Config{}, fmt.Errorf("replication: region %q: store %s has no credentials: set %s and %s, or put ACCESS:SECRET@ in the URL",
			cfg.Region, u, accessVar, secretVar)
	}
	return s3cfg, nil
}

// EnsureBucket creates the bucket of an s3:// store unless it exists, and
// reports whether it created it; a file:// store needs nothing (its
// directory is made when a process opens it). Nodes never create buckets
// (NewS3 refuses a missing one, which is usually a typo); this is for
// setting up a new cluster's stores, as `meridian store init` does.
func EnsureBucket(ctx context.Context, cfg StoreConfig) (created bool, err error) {
	u, err := ParseStoreURL(cfg.URL)
	if err != nil {
		return false, fmt.Errorf("%w (region %q)", err, cfg.Region)
	}
	if u.Scheme == "file" {
		return false, nil
	}
	s3cfg, err := s3ConfigOf(cfg, u)
	if err != nil {
		return false, err
	}
	s3cfg = s3cfg.withDefaults()
	lookup := minio.BucketLookupAuto
	if s3cfg.PathStyle {
		lookup = minio.BucketLookupPath
	}
	client, err := minio.New(s3cfg.Endpoint, &minio.Options{
		Creds:        credentials.NewStaticV4(s3cfg.AccessKey, s3cfg.SecretKey, ""),
		Secure:       s3cfg.Secure,
		Region:       s3cfg.Region,
		BucketLookup: lookup,
		MaxRetries:   1, // the caller decides how long to keep trying
	})
	if err != nil {
		return false, fmt.Errorf("replication: region %q: s3 store %s: %w", cfg.Region, s3cfg, err)
	}
	err = client.MakeBucket(ctx, s3cfg.Bucket, minio.MakeBucketOptions{Region: s3cfg.Region})
	switch code := s3Code(err); {
	case err == nil:
		return true, nil
	case code == "BucketAlreadyOwnedByYou" || code == "BucketAlreadyExists":
		// BucketAlreadyExists can also mean another account owns it; the
		// nodes' start check (NewS3) then reports the credentials.
		return false, nil
	default:
		return false, fmt.Errorf("replication: region %q: s3 store %s: create bucket %q: %w", cfg.Region, s3cfg, s3cfg.Bucket, err)
	}
}
