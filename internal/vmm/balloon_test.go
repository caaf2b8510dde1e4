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

// TestBalloonOnDemandOnRealKVM: a churning guest whose need for memory swings from 30% to 80%
// of its pool, with a balloon target of 60% of memory, takes pages back out of its balloon
// when it grows (deflate on demand, counted by the guest) and refills the balloon when it
// shrinks, with the memory it has not needed for the last second or two. It migrates in the
// middle of the swing, and the destination verifies clean: pages the guest took back from the
// balloon and wrote reach it with their content.
func TestBalloonOnDemandOnRealKVM(t *testing.T) {
	for _, mode := range []string{migration.ModePrecopy, migration.ModePostcopy} {
		t.Run(mode, func(t *testing.T) {
			src := newMachine(t, 256, 1, workload{kind: "churn", content: "random", touch: 0.3, peak: 0.8, rate: 10000})
			if err := src.Start(); err != nil {
				t.Fatal(err)
			}
			mem := src.Stats().MemBytes
			if err := src.SetBalloon(Balloon{Bytes: mem * 6 / 10}); err != nil {
				t.Fatal(err)
			}
			// At the peak only a fifth of the pool is free: the balloon gives up its pages.
			s := waitStats(t, src, "deflates on demand", func(s Stats) bool { return s.BalloonOnDemand*guest.PageSize >= mem/8 })
			t.Logf("source: balloon %d MiB, %d pages deflated (%d on demand), resident %d MiB",
				s.BalloonBytes>>20, s.BalloonDeflated, s.BalloonOnDemand, s.ResidentBytes>>20)
			dst, srep, _ := migrateLocal(t, src, migration.SendOptions{Mode: mode, Force: true})
			t.Logf("%s: %d bytes on the wire, pages %+v", mode, srep.BytesWire, srep.Pages)
			verifyClean(t, dst)
			// The swing goes on at the destination: down to 30%, where the balloon refills past
			// the fifth of memory that was free at the peak, and up again, deflating on demand
			// once more.
			before := dst.Stats().BalloonOnDemand
			waitStats(t, dst, "the balloon to refill", func(s Stats) bool { return s.BalloonBytes >= mem*3/10 })
			s = waitStats(t, dst, "more deflates on demand", func(s Stats) bool { return s.BalloonOnDemand > before })
			t.Logf("destination: balloon %d MiB, %d pages deflated (%d on demand)", s.BalloonBytes>>20, s.BalloonDeflated, s.BalloonOnDemand)
			verifyClean(t, dst)
		})
	}
}

// TestBalloonDuringPostcopyOnRealKVM: pages that go into the balloon while the destination is
// still receiving by post-copy cannot be released then (a hole would read as missing). Once
// every page is there the VMM asks the guest to name its balloon again and releases it: the
// destination's resident memory falls to what the guest uses.
func TestBalloonDuringPostcopyOnRealKVM(t *testing.T) {
	src := newMachine(t, 256, 1, workload{kind: "churn", content: "random", touch: 0.3, rate: 500})
	if err := src.Start(); err != nil {
		t.Fatal(err)
	}
	waitHeartbeats(t, src, 5)
	if err := src.SetBalloon(Balloon{Auto: true, Share: 1}); err != nil {
		t.Fatal(err)
	}
	// The balloon fills at a few lists per unit of work, over seconds: most of it at the
	// destination, during a post-copy that the bandwidth cap keeps going for as long. Free
	// pages go too (not skipped as reported free), so that those the guest then puts into its
	// balloon are memory at the destination, which only their release gives back.
	dst, srep, _ := migrateLocal(t, src, migration.SendOptions{Mode: migration.ModePostcopy, MaxBandwidth: 96 << 20, IgnoreFreePages: true, Force: true})
	pc, _ := dst.PostcopyStats()
	mid := dst.Stats()
	t.Logf("post-copy: %d bytes on the wire, %d pages placed; destination now: balloon %d MiB, %d pages inflated, %d released, resident %d MiB",
		srep.BytesWire, pc.PagesPlaced, mid.BalloonBytes>>20, mid.BalloonInflated, mid.BalloonReleased, mid.ResidentBytes>>20)
	if mid.BalloonInflated == 0 {
		t.Fatal("nothing went into the balloon at the destination during post-copy: the test shows nothing")
	}
	freeBytes := mid.MemBytes * 6 / 10
	s := waitStats(t, dst, "the balloon released", func(s Stats) bool {
		return s.BalloonBytes >= freeBytes && s.ResidentBytes+s.BalloonBytes*9/10 <= s.MemBytes
	})
	t.Logf("destination: balloon %d MiB, %d pages inflated, %d released, resident %d MiB", s.BalloonBytes>>20, s.BalloonInflated, s.BalloonReleased, s.ResidentBytes>>20)
	verifyClean(t, dst)
}
