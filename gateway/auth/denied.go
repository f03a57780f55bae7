package auth

import (
	"bufio"
	"os"
	"sync"

	"google.golang.org/protobuf/encoding/protojson"

	pb "github.com/meridian-registry/meridian/proto/meridianpb"
)

// DeniedLog keeps the requests a member refused, one JSON record per
// line, in a file it rotates at MaxBytes (one previous file is kept as
// PATH.1). Refusals are not cluster changes, so they stay with the member
// that refused them.
type DeniedLog struct {
	path     string
	maxBytes int64
	mu       sync.Mutex
	f        *os.File
	size     int64
}

// OpenDeniedLog opens (or creates, mode 0600) the log at path.
func OpenDeniedLog(path string, maxBytes int64) (*DeniedLog, error) {
	if maxBytes <= 0 {
		maxBytes = 16 << 20
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &DeniedLog{path: path, maxBytes: maxBytes, f: f, size: st.Size()}, nil
}

// Record appends r; a failure to write is dropped (refusing the request
// already happened).
func (d *DeniedLog) Record(r *pb.AuditRecord) {
	line, err := protojson.Marshal(r)
	if err != nil {
		return
	}
	line = append(line, '\n')
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.f == nil {
		return
	}
	if d.size+int64(len(line)) > d.maxBytes {
		d.f.Close()
		os.Rename(d.path, d.path+".1")
		f, err := os.OpenFile(d.path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
		if err != nil {
			d.f = nil
			return
		}
		d.f, d.size = f, 0
	}
	n, _ := d.f.Write(line)
	d.size += int64(n)
}

// Read returns the records that pass keep, oldest first (the rotated file
// first).
func (d *DeniedLog) Read(keep func(*pb.AuditRecord) bool) ([]*pb.AuditRecord, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []*pb.AuditRecord
	for _, p := range []string{d.path + ".1", d.path} {
		f, err := os.Open(p)
		if os.IsNotExist(err) {
			continue
		}
		if err != nil {
			return nil, err
		}
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			r := &pb.AuditRecord{}
			if protojson.Unmarshal(sc.Bytes(), r) == nil && keep(r) {
				out = append(out, r)
			}
		}
		f.Close()
	}
	return out, nil
}

// Close closes the file.
func (d *DeniedLog) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.f == nil {
		return nil
	}
	err := d.f.Close()
	d.f = nil
	return err
}
