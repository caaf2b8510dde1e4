package vmm

import (
	"testing"
	"time"

	"github.com/godwit-vm/godwit/internal/guest"
	"github.com/godwit-vm/godwit/migration"
)

// waitStats polls m's stats until ok says so, for at most 30 s.
func waitStats(t *testing.T, m *Machine, what string, ok func(Stats) bool) Stats {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		s := m.Stats()
		if ok(s) {
			return s
		}
		if s.State != StateRunning || time.Now().After(deadline) {
			t.Fatalf("waiting for %s: stats %+v", what, s)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestBalloonOnRealKVM fills the balloon of a churning guest with 70% of its memory free: the
// host gets that memory back (resident memory falls), a migration sends none of it, and at the
// destination the balloon, whose size migrated with the guest, lets it all go again on a new
// target of 0. Every step ends verified.
func TestBalloonOnRealKVM(t *testing.T) {
	for _, mode := range []string{migration.ModePrecopy, migration.ModePostcopy} {
		t.Run(mode, func(t *testing.T) {
			src := newMachine(t, 256, 1, workload{kind: "churn", content: "random", touch: 0.3, rate: 5000})
			if err := src.Start(); err != nil {
				t.Fatal(err)
			}
			waitHeartbeats(t, src, 20)
			before := src.Stats()
			if err := src.SetBalloon(Balloon{Auto: true, Share: 1}); err != nil {
				t.Fatal(err)
			}
			// 70% of the pool is free: the balloon takes nearly all of it.
			freeBytes := before.MemBytes * 6 / 10
			after := waitStats(t, src, "the balloon to fill", func(s Stats) bool { return s.BalloonBytes >= freeBytes })
			fall := int64(before.ResidentBytes) - int64(after.ResidentBytes)
			t.Logf("resident %d MiB -> %d MiB with %d MiB in the balloon (%d pages released)",
				before.ResidentBytes>>20, after.ResidentBytes>>20, after.BalloonBytes>>20, after.BalloonReleased)
			if fall < int64(after.BalloonBytes)*6/10 {
				t.Fatalf("resident memory fell by %d bytes with %d in the balloon: want at least 60%% of it", fall, after.BalloonBytes)
			}
			verifyClean(t, src)

			dst, srep, _ := migrateLocal(t, src, migration.SendOptions{Mode: mode, Force: true})
			t.Logf("%s: %d bytes on the wire, pages %+v", mode, srep.BytesWire, srep.Pages)
			if max := int64(before.MemBytes) / 2; srep.BytesWire > max {
				t.Fatalf("%d bytes on the wire for a guest with %d bytes in its balloon: want at most %d", srep.BytesWire, after.BalloonBytes, max)
			}
			verifyClean(t, dst)
			if s := dst.Stats(); s.BalloonBytes < freeBytes {
				t.Fatalf("destination balloon %d bytes: the guest's count did not migrate", s.BalloonBytes)
			}
			if err := dst.SetBalloon(Balloon{}); err != nil {
				t.Fatal(err)
			}
			waitStats(t, dst, "the balloon to empty", func(s Stats) bool { return s.BalloonBytes == 0 })
			waitHeartbeats(t, dst, dst.Stats().Heartbeats+20)
			r := verifyClean(t, dst)
			if r.PagesFree*guest.PageSize < freeBytes {
				t.Fatalf("after deflating: %+v, want the free pages back", r)
			}
		})
	}
}
