package vmm

import (
	"testing"

	"github.com/godwit-vm/godwit/migration"
)

// TestFreePagesOnRealKVM migrates a churning guest with 70% of its memory free (stale content)
// in each mode and with each kind of dirty tracking. The pages it reports free are not sent,
// and the race that makes skipping them hard runs all along: every page the guest allocates
// during the migration was reported free before, and is written after; the destination guest
// verifies each allocated page (and its allocator), so a page whose new content went missing
// fails the test. With --free-pages off the same migration sends the free pages (compared once,
// by pre-copy with the ring).
func TestFreePagesOnRealKVM(t *testing.T) {
	for _, c := range []struct {
		mode, tracking string
	}{
		{migration.ModePrecopy, DirtyRing},
		{migration.ModePrecopy, DirtyBitmap},
		{migration.ModePostcopy, DirtyRing},
		{migration.ModeHybrid, DirtyBitmap},
	} {
		t.Run(c.mode+"/"+c.tracking, func(t *testing.T) {
			w := workload{kind: "churn", content: "random", touch: 0.3, rate: 20000, tracking: c.tracking}
			var bytes [2]int64
			runs := []bool{false, true}
			if c.mode != migration.ModePrecopy || c.tracking != DirtyRing {
				runs = runs[:1] // the comparison once is enough (the nested host is slow)
			}
			for i, ignore := range runs {
				src := newMachine(t, 256, 1, w)
				if err := src.Start(); err != nil {
					t.Fatal(err)
				}
				waitHeartbeats(t, src, 50)
				before := src.Stats().Heartbeats
				dst, srep, _ := migrateLocal(t, src, migration.SendOptions{Mode: c.mode, Force: true, HybridRounds: 2, IgnoreFreePages: ignore})
				during := src.Stats().Heartbeats - before
				r := verifyClean(t, dst)
				if r.PagesFree == 0 || r.PagesVersioned == 0 {
					t.Fatalf("destination verify %+v: want allocated and free pages", r)
				}
				bytes[i] = srep.BytesWire
				t.Logf("free pages %v: %d rounds, total %.0f ms, downtime %.2f ms, %d bytes, pages %+v, %d reported free, %d heartbeats (%d allocations) during the migration; destination: %d allocated, %d free pages verified",
					!ignore, srep.Rounds, srep.TotalMS, srep.DowntimeMS, srep.BytesWire, srep.Pages, srep.FreePagesReported, during, during*64, r.PagesVersioned, r.PagesFree)
				if during == 0 {
					t.Fatalf("the guest allocated nothing while the migration ran: the race was not exercised")
				}
				switch {
				case ignore && (srep.FreePages != "off" || srep.Pages.Free != 0):
					t.Fatalf("with IgnoreFreePages: free pages %q, %d skipped", srep.FreePages, srep.Pages.Free)
				case !ignore && (srep.FreePages != "reported by the guest" || srep.Pages.Free < r.PagesFree/2):
					t.Fatalf("free pages %q, %d skipped, want most of the %d free pages", srep.FreePages, srep.Pages.Free, r.PagesFree)
				}
			}
			if len(runs) == 2 && bytes[0]*2 > bytes[1] {
				t.Errorf("%d bytes with free pages skipped, %d without: want at most half", bytes[0], bytes[1])
			}
		})
	}
}
