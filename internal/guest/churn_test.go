package guest

import (
	"bytes"
	"testing"
)

// churnPool is the allocator's split of a slice: slot pages first, then the pages it hands out.
func churnPool(dataPages uint64) (meta, pool uint64) {
	meta = (dataPages*4 + PageSize - 1) / PageSize
	return meta, dataPages - meta
}

func churnConfig(touch uint64) Config {
	cfg := DefaultConfig()
	cfg.Workload, cfg.Content, cfg.TouchPermille, cfg.BatchPages = WorkloadChurn, ContentRandom, touch, 16
	return cfg
}

// TestChurnNative runs the churn allocator natively: its verify passes stay clean, the share of
// free pages is what --touch asked for, and every page it reports free is free when reported.
func TestChurnNative(t *testing.T) {
	const mem, vcpus = 32 << 20, 2
	r := runNative(t, churnConfig(300), mem, vcpus, NativeRun{Units: 60, VerifyAt: 40, ReportAt: 10})
	for v := 0; v < vcpus; v++ {
		meta, pool := churnPool(r.params.VCPUs[v].DataPages)
		keep := pool * 300 / 1000
		reps := r.verifies(v)
		if len(reps) != 2 {
			t.Fatalf("vCPU %d made %d verify reports, want 2", v, len(reps))
		}
		for _, rep := range reps {
			if rep.Mismatches != 0 || rep.PagesFree != pool-keep || rep.PagesVersioned != keep {
				t.Errorf("vCPU %d verify %d: %+v, want no mismatch, %d free and %d allocated pages", v, rep.VerifySeq, rep, pool-keep, keep)
			}
		}
		// The dump agrees: slot pages, then pages each written once at least, the free ones
		// flagged.
		var free uint64
		for idx := meta; idx < meta+pool; idx++ {
			ver := r.version(v, idx)
			if ver&VersionMask == 0 {
				t.Fatalf("vCPU %d page %d has version 0x%x: every pool page is written at start", v, idx, ver)
			}
			if ver&VersionFree != 0 {
				free++
			}
		}
		if free != pool-keep {
			t.Errorf("vCPU %d: %d pages flagged free in the dump, want %d", v, free, pool-keep)
		}
	}
	if len(r.res.Free) != vcpus {
		t.Fatalf("free page reports of %d vCPUs, want %d: %+v", len(r.res.Free), vcpus, r.res.Free)
	}
	for _, f := range r.res.Free {
		_, pool := churnPool(r.params.VCPUs[f.VCPU].DataPages)
		if f.Done != 1 || !f.Supported || f.NotFree != 0 || f.Reported < pool-pool*300/1000 {
			t.Errorf("vCPU %d free reporting %+v: want one done, supported, every reported page free, all %d free pages reported at least", f.VCPU, f, pool-pool*300/1000)
		}
	}
}

// TestReportFreeWithoutAllocator: workloads without an allocator answer CmdReportFree with
// "not supported" and report nothing.
func TestReportFreeWithoutAllocator(t *testing.T) {
	for _, w := range []uint64{WorkloadIdle, WorkloadDirty} {
		cfg := DefaultConfig()
		cfg.Workload, cfg.TouchPermille = w, 500
		r := runNative(t, cfg, 16<<20, 1, NativeRun{Units: 8, ReportAt: 3})
		if len(r.res.Free) != 1 || r.res.Free[0].Done != 1 || r.res.Free[0].Supported || r.res.Free[0].Reported != 0 {
			t.Errorf("%s: free reporting %+v, want one answer, not supported, nothing reported", WorkloadName(w), r.res.Free)
		}
	}
}

// TestChurnVerifyCatches: verify under churn sees a flipped byte in an allocated page and in the
// allocator's slots, and accepts anything in a free page.
func TestChurnVerifyCatches(t *testing.T) {
	const mem = 16 << 20
	p, err := NewParams(churnConfig(0), mem, 1, 0)
	if err != nil {
		t.Fatal(err)
	}
	v := p.VCPUs[0]
	meta, pool := churnPool(v.DataPages)
	for _, c := range []struct {
		name  string
		touch uint64 // 1000: every page allocated; 0: all but one free
		gpa   uint64
		bad   bool
	}{
		{"allocated page", 1000, v.DataGPA + (meta+pool/2)*PageSize + 100, true},
		{"free page", 0, v.DataGPA + (meta+pool/2)*PageSize + 100, false},
		{"slot", 300, v.DataGPA + 4*7 + 1, true},
		{"slot count", 300, v.DataGPA + 4*(pool-1), true},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := runNative(t, churnConfig(c.touch), mem, 1, NativeRun{Units: 6, VerifyAt: 3, Corrupt: true, CorruptGPA: c.gpa})
			reps := r.verifies(0)
			if len(reps) != 2 {
				t.Fatalf("%d verify reports, want 2", len(reps))
			}
			if got := reps[0].Mismatches != 0; got != c.bad {
				t.Errorf("verify with the flipped byte at 0x%x: %+v; want a mismatch: %v", c.gpa, reps[0], c.bad)
			}
			if reps[1].Mismatches != 0 {
				t.Errorf("verify after the byte was restored: %+v", reps[1])
			}
		})
	}
}

// TestBalloonNative runs the churn allocator with a balloon target: pages, a share of the free
// pages, and all of them (each free gives the allocator the one page it takes next, so the
// balloon never has to give one back). Only free pages go into the balloon, it reaches its
// target, and verify stays clean with the ballooned pages zeroed under it (as the VMM's
// release leaves them).
func TestBalloonNative(t *testing.T) {
	const mem = 32 << 20
	for _, c := range []struct {
		name   string
		target uint32
		want   func(free uint64) (lo, hi uint64)
	}{
		{"pages", 2000, func(uint64) (uint64, uint64) { return 2000, 2000 }},
		{"auto 90%", BalloonAuto | 900, func(free uint64) (uint64, uint64) { return free * 85 / 100, free * 9 / 10 }},
		{"auto all", BalloonAuto | 1000, func(free uint64) (uint64, uint64) { return free - 2*64, free }},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := runNative(t, churnConfig(300), mem, 1, NativeRun{Units: 60, VerifyAt: 40, Balloon: true, BalloonTarget: c.target})
			_, pool := churnPool(r.params.VCPUs[0].DataPages)
			free := pool - pool*300/1000
			for _, rep := range r.verifies(0) {
				if rep.Mismatches != 0 || rep.PagesFree != free {
					t.Errorf("verify %d: %+v, want clean with %d free pages", rep.VerifySeq, rep, free)
				}
			}
			if len(r.res.Free) != 1 {
				t.Fatalf("balloon reports %+v", r.res.Free)
			}
			f := r.res.Free[0]
			lo, hi := c.want(free)
			if f.NotFree != 0 || f.Balloon < lo || f.Balloon > hi || f.Inflated < f.Balloon {
				t.Errorf("balloon %+v: want only free pages inflated and %d..%d pages in the balloon (of %d free)", f, lo, hi, free)
			}
			t.Logf("%s: %d free pages, %d in the balloon, %d inflated in all", c.name, free, f.Balloon, f.Inflated)
		})
	}
}

// TestPatchContent: under patch content two consecutive versions of a page differ in one
// 64-byte slot, and verify passes.
func TestPatchContent(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Workload, cfg.Content, cfg.Pattern, cfg.WSSPages, cfg.BatchPages = WorkloadDirty, ContentPatch, PatternSequential, 1, 1
	var pages [2][]byte
	var versions [2]uint32
	for i, units := range []uint64{100, 101} {
		r := runNative(t, cfg, 16<<20, 1, NativeRun{Units: units, VerifyAt: 50})
		for _, rep := range r.verifies(0) {
			if rep.Mismatches != 0 {
				t.Fatalf("verify %+v", rep)
			}
		}
		pages[i], versions[i] = r.page(0, 0), r.version(0, 0)
	}
	if versions[1] != versions[0]+1 {
		t.Fatalf("versions %d and %d: want consecutive", versions[0], versions[1])
	}
	var diff []int
	for off := 0; off < PageSize; off += 64 {
		if !bytes.Equal(pages[0][off:off+64], pages[1][off:off+64]) {
			diff = append(diff, off/64)
		}
	}
	if len(diff) != 1 || diff[0] != int(versions[1]%64) {
		t.Fatalf("versions %d and %d differ in slots %v, want slot %d only", versions[0], versions[1], diff, versions[1]%64)
	}
}

// TestBalloonDeflateOnDemandNative: a guest whose need for memory grows (a swing from 30% to
// 80% allocated) into a balloon that holds most of its free pages takes them back on demand,
// and gives nothing up: verify stays clean through growth and shrinking, and the balloon
// refills to its target once the guest needs the memory no more.
func TestBalloonDeflateOnDemandNative(t *testing.T) {
	const mem = 32 << 20
	cfg := churnConfig(300)
	cfg.PeakPermille, cfg.BatchPages = 800, 64
	p, err := NewParams(cfg, mem, 1, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, pool := churnPool(p.VCPUs[0].DataPages)
	target := pool * 6 / 10 // of the 70% free at first; 20% stay free at the peak
	swing := pool*800/1000 - pool*300/1000
	units := 3*swing/64 + 20 // grow, shrink, grow part of the way again
	r := runNative(t, cfg, mem, 1, NativeRun{Units: units, VerifyAt: swing/64 + 5, Balloon: true, BalloonTarget: uint32(target)})
	for _, rep := range r.verifies(0) {
		if rep.Mismatches != 0 {
			t.Errorf("verify %d: %+v", rep.VerifySeq, rep)
		}
	}
	if len(r.res.Free) != 1 {
		t.Fatalf("balloon reports %+v", r.res.Free)
	}
	f := r.res.Free[0]
	t.Logf("pool %d, target %d, swing %d pages: %+v", pool, target, swing, f)
	// At the peak only 20% of the pool is free: the balloon gave up at least 40% of it.
	if f.NotFree != 0 || f.Demand < pool*4/10 || f.Deflated < f.Demand || f.Inflated-f.Deflated != f.Balloon || f.Inflated <= target {
		t.Errorf("balloon %+v: want at least %d pages deflated on demand, the counts agreeing, and the balloon inflated again", f, pool*4/10)
	}
}

// TestBalloonListNative: CmdBalloonList names every page in the balloon again, only those
// (the harness zeroes each: a page in use would fail verify), and the churn goes on.
func TestBalloonListNative(t *testing.T) {
	const mem = 32 << 20
	r := runNative(t, churnConfig(300), mem, 1, NativeRun{Units: 60, VerifyAt: 40, Balloon: true, BalloonTarget: 2000, ListAt: 10})
	for _, rep := range r.verifies(0) {
		if rep.Mismatches != 0 {
			t.Errorf("verify %d: %+v", rep.VerifySeq, rep)
		}
	}
	if len(r.res.Free) != 1 {
		t.Fatalf("balloon reports %+v", r.res.Free)
	}
	if f := r.res.Free[0]; f.NotFree != 0 || f.Relisted != 2000 || f.Balloon != 2000 {
		t.Errorf("balloon %+v: want the 2000 pages of the balloon named again, and only free ones", f)
	}
}
