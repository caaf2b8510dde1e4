package vmm

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/godwit-vm/godwit/internal/guest"
	"github.com/godwit-vm/godwit/internal/transport"
	"github.com/godwit-vm/godwit/migration"
	"github.com/godwit-vm/godwit/migration/wire"
)

// handoverTo hands src over to dst on a Unix socket made by package transport, as two VMM
// processes on one host would, and returns both outcomes.
func handoverTo(t *testing.T, src migration.Source, dst migration.Destination, opts migration.SendOptions) (srep, drep *migration.Report, serr, derr error) {
	t.Helper()
	addr, _ := transport.Parse("unix:" + filepath.Join(t.TempDir(), "handover.sock"))
	opts.Mode = migration.ModeHandover
	return migrateVia(t, addr, src, dst, opts, time.Minute)
}

// inode is the identity of the file behind fd.
func inode(t *testing.T, fd int) uint64 {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// TestHandoverOnRealKVM hands a heavy writer over to a new machine: the destination runs on the
// very memory the source had (the same memfd), no page travels, the source's machine closes
// without touching it, and the guest verifies its memory at the destination.
func TestHandoverOnRealKVM(t *testing.T) {
	src := newMachine(t, 128, 2, workload{kind: "dirty", content: "random", pattern: "random", wssMiB: 64, rate: 0})
	if err := src.Start(); err != nil {
		t.Fatal(err)
	}
	waitHeartbeats(t, src, 50)
	dst := &MigrationDestination{Template: Config{Name: "dst"}}
	srep, drep, serr, derr := handoverTo(t, MigrationSource{M: src}, dst, migration.SendOptions{})
	if serr != nil || derr != nil {
		t.Fatalf("handover failed: source %v, destination %v", serr, derr)
	}
	defer dst.M.Close()
	if srep.Mode != migration.ModeHandover || drep.Mode != migration.ModeHandover || srep.Handover == nil || srep.Handover.Files != 1 || srep.Handover.Bytes != 128<<20 {
		t.Fatalf("reports: source %+v (%+v), destination mode %q", srep, srep.Handover, drep.Mode)
	}
	if srep.Pages != (migration.PageCounts{}) || srep.BytesWire > 64<<10 {
		t.Fatalf("a handover sent pages %+v, %d bytes", srep.Pages, srep.BytesWire)
	}
	if a, b := inode(t, src.mem.Fd()), inode(t, dst.M.mem.Fd()); a != b {
		t.Fatalf("the destination's memory is inode %d, the source's %d: copied, not handed over", b, a)
	}
	src.Close() // as the source process exits: its guest lives on at the destination
	waitHeartbeats(t, dst.M, dst.M.Stats().Heartbeats+50)
	r := verifyClean(t, dst.M)
	t.Logf("handover of %d MiB: downtime %.2f ms (%+v), total %.2f ms, memory mapped after %.2f ms, %d bytes on the wire; verified %d pages",
		srep.Handover.Bytes>>20, srep.DowntimeMS, srep.Downtime, srep.TotalMS, srep.Handover.MappedMS, srep.BytesWire, r.PagesChecked)
}

// failingRestore is a destination that fails before it runs the VM.
type failingRestore struct{ *MigrationDestination }

func (failingRestore) RestoreState([]migration.Section) error {
	return errors.New("injected: restore failed")
}

// declining is a destination that cannot take memory handed over (it is only a Destination).
type declining struct{ migration.Destination }

// TestHandoverFailureLeavesSourceRunning: a destination that fails after it mapped the memory
// and before it ran, and one that declines the handover: the source runs on, and its guest
// verifies its memory.
func TestHandoverFailureLeavesSourceRunning(t *testing.T) {
	src := newMachine(t, 64, 1, workload{kind: "dirty", content: "random", pattern: "random", wssMiB: 32, rate: 0})
	if err := src.Start(); err != nil {
		t.Fatal(err)
	}
	waitHeartbeats(t, src, 50)
	for _, c := range []struct {
		name string
		dst  migration.Destination
		want error
	}{
		{"restore fails", failingRestore{&MigrationDestination{Template: Config{Name: "dst"}}}, wire.ErrPeer},
		{"declines", declining{&MigrationDestination{Template: Config{Name: "dst"}}}, migration.ErrNoHandover},
	} {
		t.Run(c.name, func(t *testing.T) {
			srep, _, serr, derr := handoverTo(t, MigrationSource{M: src}, c.dst, migration.SendOptions{})
			if serr == nil || derr == nil {
				t.Fatalf("handover to a failing destination: source %v, destination %v", serr, derr)
			}
			if !errors.Is(serr, c.want) {
				t.Fatalf("source: %v, want %v", serr, c.want)
			}
			if errors.Is(serr, migration.ErrHandoverUndecided) {
				t.Fatalf("source: %v: the destination said it failed before it ran", serr)
			}
			t.Logf("source: %v (%s)", serr, srep.Result)
			waitHeartbeats(t, src, src.Stats().Heartbeats+50)
			verifyClean(t, src)
		})
	}
}

// TestLocalizeOnRealKVM moves a writer's memory out of its memory file on shared memory into
// memory of its own while it runs; then the file is overwritten, and the guest still verifies
// its memory: it no longer uses the file.
func TestLocalizeOnRealKVM(t *testing.T) {
	requireKVM(t)
	path := filepath.Join("/dev/shm", fmt.Sprintf("godwit-test-localize-%d", os.Getpid()))
	defer os.Remove(path)
	w := workload{kind: "dirty", content: "random", pattern: "random", wssMiB: 64, rate: 0}
	params, err := testParams(128<<20, 2, w)
	if err != nil {
		t.Fatal(err)
	}
	m, err := New(Config{Name: "localize", MemBytes: 128 << 20, VCPUs: 2, Image: guest.Image, Params: params, MemoryFile: path})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Start(); err != nil {
		t.Fatal(err)
	}
	waitHeartbeats(t, m, 100)
	// A migration's dirty log and Localize exclude each other.
	src := MigrationSource{M: m}
	if err := src.StartDirtyLog(); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Localize(t.Context()); err == nil || !strings.Contains(err.Error(), "a migration uses the dirty log") {
		t.Fatalf("localize during a migration: %v", err)
	}
	if err := src.StartDirtyLog(); err == nil {
		t.Fatal("a second user of the dirty log: want an error")
	}
	if err := src.StopDirtyLog(); err != nil {
		t.Fatal(err)
	}
	// The guest may still be touching its working set: what is populated now is a floor for
	// what the first round copies.
	pop, err := src.Populated()
	if err != nil {
		t.Fatal(err)
	}
	populated := pop[0].Count(m.mem.Pages())
	rep, err := m.Localize(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("localized: %+v", rep)
	if rep.Pages < populated || populated < 16<<20/guest.PageSize || rep.Rounds < 1 || rep.PauseMS <= 0 || rep.From != path {
		t.Fatalf("report %+v", rep)
	}
	if s := m.Stats(); s.MemoryFile != "" || s.Localized == nil {
		t.Fatalf("stats after localize: memory file %q, localized %+v", s.MemoryFile, s.Localized)
	}
	// Scribble over the file: the guest must not notice.
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	junk := bytes.Repeat([]byte{0xa5}, 1<<20)
	for off := int64(0); off < 128<<20; off += int64(len(junk)) {
		f.WriteAt(junk, off)
	}
	f.Close()
	waitHeartbeats(t, m, m.Stats().Heartbeats+100)
	verifyClean(t, m)
	if _, err := m.Localize(t.Context()); err == nil {
		t.Fatal("a second localize: want an error, the memory is its own")
	}
}
