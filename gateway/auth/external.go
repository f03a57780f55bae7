package auth

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"os"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// External is an outside token issuer (an enterprise IdP) whose tokens
// Meridian accepts: their access claim (distribution token spec) decides
// what the bearer may do.
type External struct {
	// Issuer must equal the tokens' iss claim.
	Issuer string
	// Audience must be among the tokens' aud claim.
	Audience string
	keys     map[string]crypto.PublicKey
	methods  []string
}

// LoadExternal reads the issuer's public keys from a JWKS file (RSA and
// EC P-256/P-384 keys, each with a kid).
func LoadExternal(issuer, audience, jwksFile string) (*External, error) {
	if issuer == "" || audience == "" {
		return nil, errors.New("external issuer: issuer and audience are required")
	}
	b, err := os.ReadFile(jwksFile)
	if err != nil {
		return nil, err
	}
	var set struct {
		Keys []struct {
			Kty string `json:"kty"`
			Kid string `json:"kid"`
			Crv string `json:"crv"`
			X   string `json:"x"`
			Y   string `json:"y"`
			N   string `json:"n"`
			E   string `json:"e"`
		} `json:"keys"`
	}
	if err := json.Unmarshal(b, &set); err != nil {
		return nil, fmt.Errorf("%s: not a JWKS: %w", jwksFile, err)
	}
	ext := &External{Issuer: issuer, Audience: audience, keys: map[string]crypto.PublicKey{}}
	seen := map[string]bool{}
	for _, k := range set.Keys {
		if k.Kid == "" {
			return nil, fmt.Errorf("%s: a key without kid", jwksFile)
		}
		switch k.Kty {
		case "RSA":
			n, e := b64int(k.N), b64int(k.E)
			if n == nil || e == nil || n.BitLen() < 2048 {
				return nil, fmt.Errorf("%s: key %s: bad or short RSA key", jwksFile, k.Kid)
			}
			ext.keys[k.Kid] = &rsa.PublicKey{N: n, E: int(e.Int64())}
			for _, m := range []string{"RS256", "RS384", "RS512", "PS256"} {
				if !seen[m] {
					ext.methods, seen[m] = append(ext.methods, m), true
				}
			}
		case "EC":
			var curve elliptic.Curve
			method := ""
			switch k.Crv {
			case "P-256":
				curve, method = elliptic.P256(), "ES256"
			case "P-384":
				curve, method = elliptic.P384(), "ES384"
			default:
				return nil, fmt.Errorf("%s: key %s: curve %q not supported", jwksFile, k.Kid, k.Crv)
			}
			x, y := b64int(k.X), b64int(k.Y)
			if x == nil || y == nil || !curve.IsOnCurve(x, y) {
				return nil, fmt.Errorf("%s: key %s: not a point of %s", jwksFile, k.Kid, k.Crv)
			}
			ext.keys[k.Kid] = &ecdsa.PublicKey{Curve: curve, X: x, Y: y}
			if !seen[method] {
				ext.methods, seen[method] = append(ext.methods, method), true
			}
		default:
			return nil, fmt.Errorf("%s: key %s: kty %q not supported (RSA or EC)", jwksFile, k.Kid, k.Kty)
		}
	}
	if len(ext.keys) == 0 {
		return nil, fmt.Errorf("%s: no keys", jwksFile)
	}
	return ext, nil
}

func b64int(s string) *big.Int {
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil || len(b) == 0 {
		return nil
	}
	return new(big.Int).SetBytes(b)
}

// verify checks signature (by kid, with the algorithms its keys allow:
// an RSA key never verifies an HMAC), issuer, audience and times.
func (e *External) verify(raw string, leeway time.Duration, now func() time.Time) (*claims, error) {
	c := &claims{}
	_, err := jwt.ParseWithClaims(raw, c, func(t *jwt.Token) (any, error) {
		kid, _ := t.Header["kid"].(string)
		k := e.keys[kid]
		if k == nil {
			return nil, fmt.Errorf("unknown key %q of %s", kid, e.Issuer)
		}
		switch k.(type) {
		case *rsa.PublicKey:
			if _, ok := t.Method.(*jwt.SigningMethodRSA); !ok {
				if _, ok := t.Method.(*jwt.SigningMethodRSAPSS); !ok {
					return nil, fmt.Errorf("key %q is RSA; token uses %s", kid, t.Method.Alg())
				}
			}
		case *ecdsa.PublicKey:
			if _, ok := t.Method.(*jwt.SigningMethodECDSA); !ok {
				return nil, fmt.Errorf("key %q is EC; token uses %s", kid, t.Method.Alg())
			}
		}
		return k, nil
	},
		jwt.WithValidMethods(e.methods),
		jwt.WithIssuer(e.Issuer),
		jwt.WithAudience(e.Audience),
		jwt.WithLeeway(leeway),
		jwt.WithExpirationRequired(),
		jwt.WithTimeFunc(now),
	)
	if err != nil {
		return nil, err
	}
	if c.Subject == "" {
		return nil, errors.New("token has no subject")
	}
	return c, nil
}

// externalFor returns the external issuer named by the token's iss, read
// without verification (verification follows with that issuer's keys).
func (a *Authority) externalFor(raw string) *External {
	if len(a.cfg.External) == 0 {
		return nil
	}
	c := &jwt.RegisteredClaims{}
	if _, _, err := jwt.NewParser().ParseUnverified(raw, c); err != nil {
		return nil
	}
	for _, e := range a.cfg.External {
		if e.Issuer == c.Issuer {
			return e
		}
	}
	return nil
}
