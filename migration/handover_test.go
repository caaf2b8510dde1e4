package migration_test

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/godwit-vm/godwit/migration"
	mt "github.com/godwit-vm/godwit/migration/migrationtest"
	"github.com/godwit-vm/godwit/migration/wire"
)

// sharedGuest is a fake guest whose memory is, by its word, in a memory file both hosts map.
type sharedGuest struct{ *mt.Guest }

func (sharedGuest) SharedMemoryID() ([16]byte, bool) { return [16]byte{9}, true }

// scriptedDestination plays a destination on conn that takes a migration on shared memory
// through Complete, and then, instead of Resumed, does what end says.
func scriptedDestination(t *testing.T, conn net.Conn, end func(w *wire.Writer)) {
	t.Helper()
	r, w := wire.NewReader(conn, wire.AtDestination), wire.NewWriter(conn)
	if _, err := r.ReadPreamble(); err != nil {
		t.Error(err)
		return
	}
	w.WritePreamble()
	m, err := r.Next()
	hello, ok := m.(*wire.Hello)
	if err != nil || !ok || hello.Caps&wire.CapShared == 0 {
		t.Errorf("hello %+v: %v", m, err)
		return
	}
	r.SetCaps(wire.CapShared)
	w.WriteWelcome(&wire.Welcome{Caps: wire.CapShared})
	for {
		m, err := r.Next()
		if err != nil {
			t.Error(err)
			return
		}
		switch m.(type) {
		case *wire.Memory:
			w.WriteMemoryAck()
		case *wire.Complete:
			end(w)
			return
		}
	}
}

// TestSharedMemoryUndecided: once the state of a migration on shared memory is out, a
// destination that vanishes may have run the VM on that very memory: the source stays paused
// and says so. One that answers with an error ran nothing: the source resumes.
func TestSharedMemoryUndecided(t *testing.T) {
	for _, c := range []struct {
		name   string
		end    func(w *wire.Writer)
		resume bool
	}{
		{"vanishes", func(*wire.Writer) {}, false},
		{"says it failed", func(w *wire.Writer) { w.WriteError(wire.ErrCodeDestination, "restore failed") }, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			g := sharedGuest{newGuest(1*MiB, 5)}
			sc, dc := net.Pipe()
			done := make(chan struct{})
			go func() {
				defer close(done)
				defer dc.Close()
				scriptedDestination(t, dc, c.end)
			}()
			ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
			defer cancel()
			rep, err := migration.Send(ctx, g, sc, migration.SendOptions{Mode: migration.ModeSharedMemory})
			sc.Close()
			<-done
			if err == nil || rep.Result == migration.ResultOK {
				t.Fatalf("migration succeeded: %+v", rep)
			}
			if undecided := errors.Is(err, migration.ErrHandoverUndecided); undecided == c.resume {
				t.Fatalf("error %v: undecided %v", err, undecided)
			}
			if resumed := g.Calls("Resume") > 0; resumed != c.resume {
				t.Fatalf("resumed %v, want %v (error %v)", resumed, c.resume, err)
			}
			t.Log(err)
		})
	}
}
