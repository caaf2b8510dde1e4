// Package template keeps VM templates: the memory and machine state of a paused VM, named by
// their content hash, from which VMs are cloned (godwit run --template). A clone maps the
// template's memory copy-on-write, so clones share every page none of them wrote; a migration
// of a clone to a host that holds the same template sends only the pages the clone changed.
//
// A store is a directory with one directory per template, named by its id:
//
//	ID/memory         the guest's memory, byte for byte (exactly mem_bytes long)
//	ID/state          the machine's state sections (format in state.go)
//	ID/template.json  Meta
//
// The id is the SHA-256 of the memory followed by the state file, in hex: a template with an
// id is that content, wherever it was copied, and saving the same content twice keeps one.
// Templates are written under a temporary name and renamed into place, so a template that
// exists is complete.
package template

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/godwit-vm/godwit/migration/pages"
)

// ID is a template's content hash.
type ID [32]byte

func (id ID) String() string { return hex.EncodeToString(id[:]) }

// Short is the id's first 12 hex digits, which name a template in a store unless two share them.
func (id ID) Short() string { return id.String()[:12] }

// ParseID reads a full 64-digit id.
func ParseID(s string) (ID, error) {
	var id ID
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != len(id) {
		return id, fmt.Errorf("template: %q is not a template id (64 hex digits)", s)
	}
	copy(id[:], b)
	return id, nil
}

// Meta describes a template.
type Meta struct {
	ID         string         `json:"id"`
	MemBytes   uint64         `json:"mem_bytes"`
	VCPUs      int            `json:"vcpus"`
	StateBytes int64          `json:"state_bytes"`
	From       string         `json:"from"` // the VM it was saved from
	Saved      time.Time      `json:"saved"`
	Workload   map[string]any `json:"workload,omitempty"`
}

// Files of a template directory.
const (
	memoryFile = "memory"
	stateFile  = "state"
	metaFile   = "template.json"
)

// Store is a directory of templates.
type Store struct{ Dir string }

// Template is one template in a store.
type Template struct {
	Meta Meta
	ID   ID
	Dir  string
}

// MemoryPath is the file clones map.
func (t *Template) MemoryPath() string { return filepath.Join(t.Dir, memoryFile) }

// Sections reads the template's machine state.
func (t *Template) Sections() ([]Section, error) {
	b, err := os.ReadFile(filepath.Join(t.Dir, stateFile))
	if err != nil {
		return nil, fmt.Errorf("template %s: %w", t.ID.Short(), err)
	}
	secs, err := DecodeState(b)
	if err != nil {
		return nil, fmt.Errorf("template %s: %w", t.ID.Short(), err)
	}
	return secs, nil
}

// Save stores a template: memory writes the guest's memBytes of memory to the writer it is
// given, secs is the machine state. It returns the template, which may have existed already
// (the same content saved before).
func (s Store) Save(meta Meta, secs []Section, memory func(io.Writer) error) (*Template, error) {
	state, err := EncodeState(secs)
	if err != nil {
		return nil, err
	}
	tmp, err := s.begin()
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	f, err := os.OpenFile(filepath.Join(tmp, memoryFile), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o400)
	if err != nil {
		return nil, fmt.Errorf("template: %w", err)
	}
	h := sha256.New()
	cw := &countingWriter{w: io.MultiWriter(&sparseWriter{f: f}, h)}
	err = memory(cw)
	if err == nil { // the zero pages at the end, skipped, still belong to the file
		err = f.Truncate(cw.n)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("template: writing memory: %w", err)
	}
	if cw.n != int64(meta.MemBytes) {
		return nil, fmt.Errorf("template: memory of %d bytes written, the VM has %d", cw.n, meta.MemBytes)
	}
	h.Write(state)
	meta.StateBytes = int64(len(state))
	return s.commit(tmp, meta, state, ID(h.Sum(nil)))
}

// begin makes a temporary directory in the store for a template being written.
func (s Store) begin() (string, error) {
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return "", fmt.Errorf("template: store %s: %w", s.Dir, err)
	}
	tmp, err := os.MkdirTemp(s.Dir, ".incoming-")
	if err != nil {
		return "", fmt.Errorf("template: store %s: %w", s.Dir, err)
	}
	return tmp, nil
}

// commit writes the state and meta beside the memory in tmp and renames tmp to the id.
func (s Store) commit(tmp string, meta Meta, state []byte, id ID) (*Template, error) {
	meta.ID = id.String()
	if meta.Saved.IsZero() {
		meta.Saved = time.Now().UTC()
	}
	mj, _ := json.MarshalIndent(meta, "", "  ")
	if err := os.WriteFile(filepath.Join(tmp, stateFile), state, 0o400); err != nil {
		return nil, fmt.Errorf("template: %w", err)
	}
	if err := os.WriteFile(filepath.Join(tmp, metaFile), append(mj, '\n'), 0o400); err != nil {
		return nil, fmt.Errorf("template: %w", err)
	}
	dir := filepath.Join(s.Dir, id.String())
	if err := os.Rename(tmp, dir); err != nil {
		if _, serr := os.Stat(dir); serr == nil { // the same content is there already
			return s.Get(id)
		}
		return nil, fmt.Errorf("template: %w", err)
	}
	return s.Get(id)
}

// Get returns the template id if the store holds it.
func (s Store) Get(id ID) (*Template, error) {
	dir := filepath.Join(s.Dir, id.String())
	b, err := os.ReadFile(filepath.Join(dir, metaFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("template %s is not in %s", id.Short(), s.Dir)
	}
	if err != nil {
		return nil, fmt.Errorf("template %s: %w", id.Short(), err)
	}
	var m Meta
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("template %s: %s: %w", id.Short(), metaFile, err)
	}
	if m.ID != id.String() {
		return nil, fmt.Errorf("template %s: its %s names %s", id.Short(), metaFile, m.ID)
	}
	return &Template{Meta: m, ID: id, Dir: dir}, nil
}

// Find returns the template named by an id or by a prefix of at least 4 digits that only one
// template's id starts with.
func (s Store) Find(name string) (*Template, error) {
	if id, err := ParseID(name); err == nil {
		return s.Get(id)
	}
	if len(name) < 4 {
		return nil, fmt.Errorf("template %q: name a template by its id or at least 4 of its first digits", name)
	}
	all, err := s.List()
	if err != nil {
		return nil, err
	}
	var found []Meta
	for _, m := range all {
		if strings.HasPrefix(m.ID, strings.ToLower(name)) {
			found = append(found, m)
		}
	}
	switch len(found) {
	case 0:
		return nil, fmt.Errorf("no template %q in %s (godwit template ls lists them)", name, s.Dir)
	case 1:
		id, _ := ParseID(found[0].ID)
		return s.Get(id)
	}
	return nil, fmt.Errorf("template %q: %d templates in %s start so; give more digits", name, len(found), s.Dir)
}

// List returns the store's templates, oldest first. A store that does not exist is empty.
func (s Store) List() ([]Meta, error) {
	ents, err := os.ReadDir(s.Dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("template: store %s: %w", s.Dir, err)
	}
	var out []Meta
	for _, e := range ents {
		id, err := ParseID(e.Name())
		if err != nil || !e.IsDir() {
			continue // temporary directories and anything else
		}
		t, err := s.Get(id)
		if err != nil {
			return nil, err
		}
		out = append(out, t.Meta)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Saved.Before(out[j].Saved) })
	return out, nil
}

// Remove deletes a template. Running clones keep their mapping of its memory.
func (s Store) Remove(id ID) error {
	if _, err := s.Get(id); err != nil {
		return err
	}
	return os.RemoveAll(filepath.Join(s.Dir, id.String()))
}

// sparseWriter writes a file front to back, leaving holes where whole zero pages would go: a
// template of a VM that touched a quarter of its memory takes a quarter of its size, and its
// clones read the holes as zero pages that take no memory.
type sparseWriter struct {
	f   *os.File
	off int64
}

func (s *sparseWriter) Write(p []byte) (int, error) {
	const page = 4096
	for done := 0; done < len(p); {
		n := min(page-int(s.off%page), len(p)-done)
		chunk := p[done : done+n]
		if n < page || !pages.IsZero(chunk) {
			if _, err := s.f.WriteAt(chunk, s.off); err != nil {
				return done, err
			}
		}
		s.off += int64(n)
		done += n
	}
	return len(p), nil
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}
