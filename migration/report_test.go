package migration

import (
	"testing"
	"time"

	"github.com/godwit-vm/godwit/migration/wire"
)

// TestSplitDowntime: the parts tile the span from the pause to the destination's resume,
// whatever the marks and clocks look like.
func TestSplitDowntime(t *testing.T) {
	pause := time.Unix(1000, 0)
	at := func(ms float64) time.Time { return pause.Add(time.Duration(ms * float64(time.Millisecond))) }
	resumed := func(resumeMS float64, arm, restore, start time.Duration) *wire.Resumed {
		return &wire.Resumed{ResumeUnixNano: at(resumeMS).UnixNano(),
			ArmNanos: uint64(arm), RestoreNanos: uint64(restore), StartNanos: uint64(start)}
	}
	for _, c := range []struct {
		name                   string
		final, complete, ack   float64 // source marks, ms after the pause
		res                    *wire.Resumed
		want                   float64 // the downtime
		wantFinal, wantState   float64
		wantDelivery, wantDest float64 // wantDest: arm + restore + start
	}{
		// Resumed came back 300 ms after the destination ran (figures from a demo run).
		{"slow acknowledgement", 84.46, 106.43, 447.85, resumed(150.19, 0, 3*time.Millisecond, 10*time.Millisecond),
			150.19, 84.46, 21.97, 30.76, 13},
		// The source marked Complete written after the destination had already restored.
		{"late mark", 3.45, 45, 45.05, resumed(31.2, 0, 20*time.Millisecond, time.Millisecond),
			31.2, 3.45, 6.75, 0, 21},
		// A destination clock behind the source's: the destination's share is a floor.
		{"destination clock behind", 10, 20, 60, resumed(-5, time.Millisecond, 3*time.Millisecond, 2*time.Millisecond),
			6, 0, 0, 0, 6},
		// A destination clock ahead: no longer than the source saw to Resumed.
		{"destination clock ahead", 10, 20, 60, resumed(500, 0, 3*time.Millisecond, 2*time.Millisecond),
			60, 10, 10, 35, 5},
		// Nonsense from the peer stays inside the window it claims to describe.
		{"huge destination figures", 10, 20, 60, &wire.Resumed{ResumeUnixNano: at(50).UnixNano(), ArmNanos: 1 << 63, RestoreNanos: ^uint64(0)},
			120, 0, 0, 0, 120},
	} {
		t.Run(c.name, func(t *testing.T) {
			d, p := splitDowntime(pause, at(c.final), at(c.complete), at(c.ack), c.res)
			r := Report{Side: "source", DowntimeMS: ms(d), Downtime: p}
			if err := CheckDowntimeParts(r); err != nil {
				t.Fatal(err)
			}
			near := func(a, b float64) bool { return a-b < 1e-6 && b-a < 1e-6 }
			if !near(r.DowntimeMS, c.want) || !near(p.FinalRoundMS, c.wantFinal) || !near(p.StateMS, c.wantState) ||
				!near(p.DeliveryMS, c.wantDelivery) || !near(p.ArmMS+p.RestoreMS+p.StartMS, c.wantDest) {
				t.Fatalf("downtime %.3f ms, parts %+v; want %.3f ms, final %.3f, state %.3f, delivery %.3f, destination %.3f",
					r.DowntimeMS, p, c.want, c.wantFinal, c.wantState, c.wantDelivery, c.wantDest)
			}
		})
	}
}

// TestCheckDowntimeParts: the check catches a part larger than the whole and parts that do not
// add up.
func TestCheckDowntimeParts(t *testing.T) {
	ok := Report{Side: "source", DowntimeMS: 150, Downtime: DowntimeParts{FinalRoundMS: 84, StateMS: 22, DeliveryMS: 31, RestoreMS: 3, StartMS: 10}}
	if err := CheckDowntimeParts(ok); err != nil {
		t.Fatal(err)
	}
	big := ok
	big.Downtime.DeliveryMS = 448
	short := ok
	short.Downtime.DeliveryMS = 1
	negative := ok
	negative.Downtime.StateMS, negative.Downtime.DeliveryMS = -1, 54
	for name, r := range map[string]Report{"part larger than the whole": big, "parts short of the whole": short, "negative part": negative} {
		if CheckDowntimeParts(r) == nil {
			t.Errorf("%s: passed the check: %+v", name, r.Downtime)
		}
	}
	// The destination knows only its own parts.
	dst := Report{Side: "destination", DowntimeMS: 150, Downtime: DowntimeParts{RestoreMS: 3, StartMS: 10}}
	if err := CheckDowntimeParts(dst); err != nil {
		t.Fatal(err)
	}
}
