package migration

import (
	"testing"
	"time"

	"github.com/godwit-vm/godwit/migration/wire"
)

// TestDowntimePartsAddUp: the parts partition the span from the pause to the destination's
// resume, even when Resumed comes back long after the destination runs (the case where the
// old acknowledgement part was larger than the whole).
func TestDowntimePartsAddUp(t *testing.T) {
	pause := time.Unix(1000, 0)
	final := pause.Add(84 * time.Millisecond)
	complete := final.Add(22 * time.Millisecond)
	// The destination reads Complete 30 ms later, then arms 1, restores 3, starts 10 ms.
	resume := complete.Add(44 * time.Millisecond)
	ack := resume.Add(400 * time.Millisecond)
	res := &wire.Resumed{ResumeUnixNano: resume.UnixNano(), ArmNanos: 1e6, RestoreNanos: 3e6, StartNanos: 10e6}
	r := Report{DowntimeMS: ms(resume.Sub(pause)), Downtime: downtimeParts(pause, final, complete, ack, res)}
	if err := CheckDowntimeParts(r); err != nil {
		t.Fatal(err)
	}
	if d := r.Downtime; d.DeliveryMS != 30 || d.AckMS != 444 || d.Sum() != 150 {
		t.Fatalf("parts %+v, want delivery 30, ack 444, sum 150", d)
	}
	// A destination clock that runs behind cannot make a part negative.
	res.ResumeUnixNano -= int64(40 * time.Millisecond)
	if d := downtimeParts(pause, final, complete, ack, res); d.DeliveryMS != 0 {
		t.Fatalf("delivery %.3f ms with a lagging destination clock, want 0", d.DeliveryMS)
	}
	bad := r
	bad.Downtime.AckMS, bad.Downtime.StateMS = 444, 400
	if CheckDowntimeParts(bad) == nil {
		t.Fatal("a part larger than the downtime passed the check")
	}
}
