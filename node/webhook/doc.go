// Package webhook is the wire format of Meridian's webhook deliveries:
// events as CloudEvents 1.0 JSON (structured mode), and the HMAC-SHA256
// signature header receivers check them with. The node delivers (see
// node/webhooks.go); receivers written in Go can use Verify.
package webhook
