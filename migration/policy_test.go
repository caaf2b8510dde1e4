package migration_test

import (
	"strings"
	"testing"
	"time"

	"github.com/godwit-vm/godwit/migration"
)

// link simulates pre-copy against the policy alone: a link of linkPages pages/s, a guest of
// memory pages that dirties dirtyRate distinct pages/s (scaled by the throttle), capped by its
// memory. Round 1 sends all of it.
func link(p *migration.PrecopyPolicy, memory, linkPages, dirtyRate float64) (decisions []migration.Decision) {
	pages := memory
	for round := 1; round <= 100; round++ {
		elapsed := pages / linkPages
		dirty := min(memory, dirtyRate*float64(100-p.Throttle())/100*elapsed)
		d := p.Step(migration.Observation{
			Round: round, Pages: uint64(pages), Bytes: uint64(pages * 4096),
			Elapsed: time.Duration(elapsed * float64(time.Second)), Dirty: uint64(dirty),
		})
		decisions = append(decisions, d)
		if d.Action != migration.SendRound {
			return decisions
		}
		pages = dirty
	}
	return decisions
}

func TestPolicyIdleGuestStopsAfterRoundOne(t *testing.T) {
	p := migration.NewPrecopyPolicy(migration.PolicyConfig{PageSize: 4096})
	ds := link(p, 262144, 30000, 0)
	if len(ds) != 1 || ds[0].Action != migration.StopAndCopy || !ds[0].Converged || ds[0].ExpectedDowntime != 0 {
		t.Fatalf("decisions %+v", ds)
	}
}

func TestPolicyModerateWriterConverges(t *testing.T) {
	// Dirtying at a third of the link rate: the set shrinks threefold per round.
	p := migration.NewPrecopyPolicy(migration.PolicyConfig{PageSize: 4096})
	ds := link(p, 262144, 30000, 10000)
	last := ds[len(ds)-1]
	if last.Action != migration.StopAndCopy || !last.Converged || last.ExpectedDowntime > 300*time.Millisecond || len(ds) > 8 {
		t.Fatalf("%d decisions, last %+v", len(ds), last)
	}
	for _, d := range ds {
		if d.Throttle != 0 {
			t.Fatalf("throttled without auto-converge: %+v", d)
		}
	}
}

func TestPolicyAutoConvergeSteps(t *testing.T) {
	p := migration.NewPrecopyPolicy(migration.PolicyConfig{PageSize: 4096, AutoConverge: true})
	ds := link(p, 262144, 30000, 300000)
	var steps []int
	for _, d := range ds {
		steps = append(steps, d.Throttle)
	}
	want := []int{20, 30, 40, 50, 60, 70, 80, 90, 99}
	if len(steps) < len(want) {
		t.Fatalf("throttle steps %v", steps)
	}
	for i, w := range want {
		if steps[i] != w {
			t.Fatalf("throttle steps %v, want %v...", steps, want)
		}
	}
	last := ds[len(ds)-1]
	if last.Action != migration.StopAndCopy || !last.Converged {
		t.Fatalf("last decision %+v", last)
	}
}

func TestPolicyGivesUpWithReason(t *testing.T) {
	// A guest that throttling does not slow down (say, a device writing by DMA), dirtying ten
	// times more pages per second than the link carries.
	p := migration.NewPrecopyPolicy(migration.PolicyConfig{PageSize: 4096, AutoConverge: true})
	var ds []migration.Decision
	for round := 1; round <= 30; round++ {
		d := p.Step(migration.Observation{Round: round, Pages: 30000, Bytes: 30000 * 4096, Elapsed: time.Second, Dirty: 300000})
		ds = append(ds, d)
		if d.Action != migration.SendRound {
			break
		}
	}
	last := ds[len(ds)-1]
	if last.Action != migration.GiveUp || last.Converged {
		t.Fatalf("last decision %+v", last)
	}
	if last.Reason != "dirty rate 300000 pages/s exceeds link 30000 pages/s; throttle reached 99%" {
		t.Fatalf("reason %q", last.Reason)
	}
	if len(ds) != 9+3 {
		t.Fatalf("%d rounds, want 9 to reach 99%% and 3 stalled ones", len(ds))
	}
}

func TestPolicySaturatedWorkingSet(t *testing.T) {
	// A guest rewriting all its memory faster than the link: the distinct dirty rate can
	// only equal the link rate, and the reason says the set is stuck.
	p := migration.NewPrecopyPolicy(migration.PolicyConfig{PageSize: 4096})
	ds := link(p, 262144, 30000, 300000)
	last := ds[len(ds)-1]
	if last.Action != migration.GiveUp || len(ds) != 1+3 || !strings.Contains(last.Reason, "keeps up with link 30000 pages/s (dirty set stuck at 262144 pages") {
		t.Fatalf("%d decisions, last %+v", len(ds), last)
	}
}

func TestPolicyForceAndMaxRounds(t *testing.T) {
	p := migration.NewPrecopyPolicy(migration.PolicyConfig{PageSize: 4096, Force: true})
	ds := link(p, 262144, 30000, 300000)
	last := ds[len(ds)-1]
	if last.Action != migration.StopAndCopy || last.Converged || !strings.Contains(last.Reason, "auto-converge off") {
		t.Fatalf("last decision %+v", last)
	}

	// The dirty set shrinks by just over a tenth per round: never stalled, but too slow.
	p = migration.NewPrecopyPolicy(migration.PolicyConfig{PageSize: 4096, MaxRounds: 5})
	ds = link(p, 262144, 30000, 30000*0.85)
	last = ds[len(ds)-1]
	if len(ds) != 5 || last.Action != migration.GiveUp || !strings.HasPrefix(last.Reason, "after 5 rounds ") {
		t.Fatalf("%d decisions, last %+v", len(ds), last)
	}
}

func TestPolicyIsDeterministic(t *testing.T) {
	a := link(migration.NewPrecopyPolicy(migration.PolicyConfig{PageSize: 4096, AutoConverge: true}), 100000, 25000, 70000)
	b := link(migration.NewPrecopyPolicy(migration.PolicyConfig{PageSize: 4096, AutoConverge: true}), 100000, 25000, 70000)
	if len(a) != len(b) {
		t.Fatalf("%d vs %d decisions", len(a), len(b))
	}
	for i := range a {
		if a[i] != b[i] {
			t.Fatalf("decision %d: %+v vs %+v", i, a[i], b[i])
		}
	}
}

func TestBitmapRuns(t *testing.T) {
	b := migration.NewBitmap(200)
	b.SetRange(0, 3)
	b.SetRange(63, 2)
	b.SetRange(128, 64)
	b.Set(199)
	b.Set(250) // in the last word, beyond the region's 200 pages: ignored
	var got [][2]uint64
	b.Runs(200, func(f, n uint64) bool { got = append(got, [2]uint64{f, n}); return true })
	want := [][2]uint64{{0, 3}, {63, 2}, {128, 64}, {199, 1}}
	if len(got) != len(want) {
		t.Fatalf("runs %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("runs %v, want %v", got, want)
		}
	}
	if c := b.Count(200); c != 3+2+64+1 {
		t.Fatalf("count %d", c)
	}
}

func TestPolicyFixedCost(t *testing.T) {
	// 100 MB/s measured over send and acknowledgement; 1 MB of state takes 10ms, plus a 5ms
	// round trip and 20ms to save, restore and start.
	cfg := migration.PolicyConfig{PageSize: 4096, DowntimeLimit: 40 * time.Millisecond, StateBytes: 1e6, SwitchCost: 20 * time.Millisecond}
	round1 := migration.Observation{Round: 1, Pages: 24414, Bytes: 100e6, Elapsed: time.Second, RTT: 5 * time.Millisecond}
	d := migration.NewPrecopyPolicy(cfg).Step(round1)
	if d.Action != migration.StopAndCopy || !d.Converged || d.FixedCost != 35*time.Millisecond || d.ExpectedDowntime != 35*time.Millisecond {
		t.Fatalf("decision %+v", d)
	}

	// With a 30ms limit nothing can converge: every round stalls at an empty dirty set, and
	// the reason names the fixed part.
	cfg.DowntimeLimit = 30 * time.Millisecond
	p := migration.NewPrecopyPolicy(cfg)
	var ds []migration.Decision
	for o := round1; o.Round <= 10; o = (migration.Observation{Round: o.Round + 1, RTT: 5 * time.Millisecond}) {
		if d = p.Step(o); d.Action != migration.SendRound {
			break
		}
		ds = append(ds, d)
	}
	want := "the fixed part of the downtime alone, 35ms (state 1000000 bytes at 100000000 bytes/s, round trip 5ms, switch cost 20ms), exceeds the limit 30ms"
	if d.Action != migration.GiveUp || len(ds) != 3 || d.Reason != want {
		t.Fatalf("after %d rounds: %+v, want GiveUp with %q", len(ds)+1, d, want)
	}
}

func TestPolicyProjectsTheLag(t *testing.T) {
	// 10000 pages/s absorbed; 1000 pages dirtied in 500ms, and fetched 250ms before the
	// decision: the final round would carry about 1500 pages, 150ms.
	o := migration.Observation{Round: 1, Pages: 10000, Bytes: 10000 * 4096, Elapsed: time.Second, Dirty: 1000, DirtyTime: 500 * time.Millisecond, Lag: 250 * time.Millisecond}
	d := migration.NewPrecopyPolicy(migration.PolicyConfig{PageSize: 4096}).Step(o)
	if d.DirtyRate != 2000 || d.ExpectedDowntime < 149*time.Millisecond || d.ExpectedDowntime > 151*time.Millisecond {
		t.Fatalf("decision %+v, want a dirty rate of 2000 pages/s and 150ms", d)
	}
	// Without DirtyTime the dirty rate is over Elapsed.
	o.DirtyTime, o.Lag = 0, 0
	d = migration.NewPrecopyPolicy(migration.PolicyConfig{PageSize: 4096}).Step(o)
	if d.DirtyRate != 1000 || d.ExpectedDowntime < 99*time.Millisecond || d.ExpectedDowntime > 101*time.Millisecond {
		t.Fatalf("decision %+v, want a dirty rate of 1000 pages/s and 100ms", d)
	}
}

// TestPolicyHybridSwitches: hybrid switches after HybridRounds, after HybridAfter, or where
// pre-copy would give up; a guest that converges first still stops and copies.
func TestPolicyHybridSwitches(t *testing.T) {
	hybrid := func(rounds int, after time.Duration) *migration.PrecopyPolicy {
		return migration.NewPrecopyPolicy(migration.PolicyConfig{PageSize: 4096, Hybrid: true, HybridRounds: rounds, HybridAfter: after})
	}
	// A guest dirtying at a third of the link rate needs several rounds: two rounds switch.
	ds := link(hybrid(2, 0), 262144, 30000, 10000)
	if last := ds[len(ds)-1]; len(ds) != 2 || last.Action != migration.SwitchToPostcopy || last.SwitchReason != "after 2 live rounds" {
		t.Fatalf("%d decisions, last %+v; want a switch after round 2", len(ds), last)
	}
	// An idle guest converges in round 1: no switch.
	if ds := link(hybrid(2, 0), 262144, 30000, 0); len(ds) != 1 || ds[0].Action != migration.StopAndCopy || !ds[0].Converged {
		t.Fatalf("idle guest under hybrid: %+v", ds)
	}
	// A guest faster than the link: where pre-copy would give up, hybrid switches.
	ds = link(hybrid(100, 0), 262144, 30000, 300000)
	last := ds[len(ds)-1]
	if last.Action != migration.SwitchToPostcopy || !strings.HasPrefix(last.SwitchReason, "not converging: ") || last.Reason == "" {
		t.Fatalf("%d decisions, last %+v; want a switch for not converging", len(ds), last)
	}
	// The time bound: pre-copy that has run for HybridAfter switches.
	p := hybrid(100, time.Second)
	d := p.Step(migration.Observation{Round: 1, Pages: 1000, Bytes: 1000 * 4096, Elapsed: time.Second, Dirty: 5000, Since: 1500 * time.Millisecond})
	if d.Action != migration.SwitchToPostcopy || !strings.Contains(d.SwitchReason, "pre-copy ran for 1.5s (limit 1s)") {
		t.Fatalf("decision %+v; want a switch for the time bound", d)
	}
	// Pre-copy alone never switches.
	for _, d := range link(migration.NewPrecopyPolicy(migration.PolicyConfig{PageSize: 4096}), 262144, 30000, 300000) {
		if d.Action == migration.SwitchToPostcopy {
			t.Fatalf("pre-copy switched: %+v", d)
		}
	}
}
