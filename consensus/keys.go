package consensus

import (
	"bytes"
	"encoding/binary"
)

// State-store key layout, version 1.
//
// Every key starts with the layout version byte and a table byte, so a later
// layout can live beside this one while a cluster upgrades. Variable fields are
// separated by 0x00, which repository names, tags and digests never contain
// (the gateway validates them before they reach the log).
//
//	v 'L'                             layout version marker → uint32
//	v 'A'                             last applied Raft index → uint64 index, uint64 term
//	v 'K'                             first upload-token key (clusters before the ring) → raw bytes
//	v 'K' "ring"                      upload-token key ring → UploadKeyRing
//	v 'R' repo                        repository → uint64 created (unix nanos)
//	v 'M' repo 0 digest               manifest → ManifestRecord
//	v 'T' repo 0 tag                  tag → manifest digest
//	v 'X' repo 0 digest 0 tag         reverse tag index (tags of a manifest) → empty
//	v 'B' digest                      blob record (size, placements) → BlobRecord
//	v 'N' repo 0 digest               blob linked into a repository → empty
//	v 'F' repo 0 subject 0 digest     referrer of subject → Referrer
//	v 'Y' digest 0 repo               reverse link index (repositories of a blob) → empty
//	v 'G'                             region names of the cluster → SetRegions
//	v 'P' prefix                      replication policy of a name prefix → Policy
//	v 'W' region 0 digest             blob wanted in a region but not placed there → Wanted
//	v 'u' name                        user → User (bcrypt hash)
//	v 't' name                        team → Team
//	v 'r' name                        robot account → Robot (SHA-256 of its secret)
//	v 'g' subject 0 prefix            grant → Grant
//	v 'a' "version"                   log index of the last access change → uint64
//	v 'a' "token-keys"                registry-token signing keys → TokenKeyRing
//	v 'a' "bootstrapped"              the first admin was created → empty
//	v 'U' index (8 bytes, big endian) audit record of the entry at index → AuditRecord
//	v 'D' repo 0 blob 0 manifest      manifest references blob (config, layer) → empty
//	v 'I' repo 0 child 0 index        index lists child manifest → empty
//	v 'C' repo 0 digest               blob link no manifest references, since → uint64 (unix nanos)
//	v 'O' digest                      blob record with no link, since → uint64
//	v 'H' repo 0 digest               manifest with no tag, since → uint64
//	v 'Z' region 0 digest             condemned blob the region must remove → Wanted
//	v 'z' digest                      blob whose last copy collection removed → index, time (uint64s)
//	v 'c' "run"                       last garbage-collection run → GCRun
//	v 'c' "freed" 0 region            what collection freed in a region → GCRegion
//	v 'c' "removed-pruned"            newest index of a pruned 'z' row → uint64
//	v 'i' repositories 0 tags         tag immutability rule → ImmutableRule
//	v 'Q' repositories                quota and its usage → QuotaUsage
//	v 'e' repositories                retention rule → RetentionRule
//	v 'V' repo 0 tag                  when the tag was created or last moved → uint64
//	v 'p' repo 0 digest               when the manifest was last pulled (coarse) → uint64
//	v 'c' "retention"                 last retention run → RetentionRun
//	v 'w' name                        webhook → Webhook (secret included)
//	v 'q' name                        webhook's delivery cursor → WebhookCursor
//	v 'v' index (8) seq (4)           event of the entry at index, for webhooks → Event
//	v 'x' name 0 index (8) seq (4)    event a webhook gave up on → DeadLetter
//	v 'y' name 0 index (8) seq (4)    dead letter queued for replay → empty
//	v 'f'                             newest log format an applied entry had → uint64
//	v 'E'                             epoch of a restored log (random, set by restore) → text
const layoutVersion byte = 1

const (
	tableLayout    byte = 'L'
	tableApplied   byte = 'A'
	tableUploadKey byte = 'K'
	tableRepo      byte = 'R'
	tableManifest  byte = 'M'
	tableTag       byte = 'T'
	tableTagIndex  byte = 'X'
	tableBlob      byte = 'B'
	tableLink      byte = 'N'
	tableReferrer  byte = 'F'
	tableBlobRepos byte = 'Y'
	tableRegions   byte = 'G'
	tablePolicy    byte = 'P'
	tableWanted    byte = 'W'

	tableUser       byte = 'u'
	tableTeam       byte = 't'
	tableRobot      byte = 'r'
	tableGrant      byte = 'g'
	tableAccessMeta byte = 'a'
	tableAudit      byte = 'U'

	tableBlobRef    byte = 'D'
	tableChildRef   byte = 'I'
	tableUnrefLink  byte = 'C'
	tableOrphanBlob byte = 'O'
	tableUntagged   byte = 'H'
	tableRemoval    byte = 'Z'
	tableRemoved    byte = 'z'
	tableGC         byte = 'c'
	tableImmutable  byte = 'i'
	tableQuota      byte = 'Q'
	tableRetention  byte = 'e'
	tableTagTime    byte = 'V'
	tablePulled     byte = 'p'

	tableWebhook       byte = 'w'
	tableWebhookCursor byte = 'q'
	tableEvent         byte = 'v'
	tableDeadLetter    byte = 'x'
	tableEpoch         byte = 'E'
	tableReplayQueue   byte = 'y'
	tableLogFormat     byte = 'f'
)

const sep byte = 0

// key builds a fresh key: layout version, table, then fields joined by sep.
func key(table byte, fields ...string) []byte {
	n := 2
	for _, f := range fields {
		n += len(f) + 1
	}
	k := make([]byte, 0, n)
	k = append(k, layoutVersion, table)
	for i, f := range fields {
		if i > 0 {
			k = append(k, sep)
		}
		k = append(k, f...)
	}
	return k
}

// prefix is key(...) followed by a separator: the bounds of every key that
// extends fields with one more field.
func prefix(table byte, fields ...string) []byte {
	return append(key(table, fields...), sep)
}

// upperBound returns the smallest key greater than every key starting with p.
func upperBound(p []byte) []byte {
	end := bytes.Clone(p)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i] < 0xff {
			end[i]++
			return end[:i+1]
		}
	}
	return nil
}

// tableBounds returns the bounds of one whole table.
func tableBounds(table byte) (lower, upper []byte) {
	lower = []byte{layoutVersion, table}
	return lower, upperBound(lower)
}

// lastField returns the text after the final separator of k.
func lastField(k []byte) string {
	i := bytes.LastIndexByte(k, sep)
	return string(k[i+1:])
}

func encodeUint64s(vs ...uint64) []byte {
	b := make([]byte, 8*len(vs))
	for i, v := range vs {
		binary.BigEndian.PutUint64(b[8*i:], v)
	}
	return b
}
