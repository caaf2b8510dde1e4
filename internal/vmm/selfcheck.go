package vmm

import (
	"context"
	"fmt"
	"time"

	"github.com/godwit-vm/godwit/internal/guest"
)

// SelfCheckResult is what SelfCheck measured.
type SelfCheckResult struct {
	FirstHeartbeat time.Duration // start to the guest's first heartbeat
	Heartbeats     uint64
	PagesWritten   uint64
	PagesChecked   uint64
	Elapsed        time.Duration
}

func (r SelfCheckResult) String() string {
	return fmt.Sprintf("built-in guest ran: first heartbeat after %.1f ms, %d heartbeats and %d page writes in %.0f ms, verified %d pages, 0 mismatches",
		float64(r.FirstHeartbeat.Microseconds())/1000, r.Heartbeats, r.PagesWritten, float64(r.Elapsed.Milliseconds()), r.PagesChecked)
}

// SelfCheck proves that KVM at device ("" = /dev/kvm) runs godwit's real built-in guest: it
// boots a small machine with the dirty workload, waits for heartbeats, has the guest verify
// its memory and exit. A host can pass a simpler check and still not run this guest (PVM that
// drops IOPL killed it at its first port access), so this is the check that decides where
// godwit runs.
func SelfCheck(ctx context.Context, device string) (SelfCheckResult, error) {
	var r SelfCheckResult
	const memBytes = 32 << 20
	c := guest.DefaultConfig()
	c.WSSPages = 256
	params, err := guest.ParamsBuilder(c, memBytes, 1)
	if err != nil {
		return r, fmt.Errorf("vmm: self-check params: %w", err)
	}
	m, err := New(Config{
		Name: "self-check", MemBytes: memBytes, VCPUs: 1, KVMDevice: device, Image: guest.Image,
		Params: params,
	})
	if err != nil {
		return r, err
	}
	defer m.Close()
	start := time.Now()
	if err := m.Start(); err != nil {
		return r, err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	const wantBeats = 20
	for {
		s := m.Stats()
		if s.State != StateRunning {
			return r, fmt.Errorf("vmm: self-check: the guest is %s after %d heartbeats: %s", s.State, s.Heartbeats, s.Error)
		}
		if s.Heartbeats >= wantBeats {
			break
		}
		select {
		case <-ctx.Done():
			return r, fmt.Errorf("vmm: self-check: %d of %d heartbeats: %w", s.Heartbeats, wantBeats, ctx.Err())
		case <-time.After(time.Millisecond):
		}
	}
	rep, err := m.Quit(ctx)
	if err != nil {
		return r, fmt.Errorf("vmm: self-check: %w", err)
	}
	if rep.Mismatches != 0 || rep.PagesChecked == 0 {
		return r, fmt.Errorf("vmm: self-check: the guest's verification found %d mismatches in %d pages", rep.Mismatches, rep.PagesChecked)
	}
	s := m.Stats()
	r = SelfCheckResult{Heartbeats: s.Heartbeats, PagesWritten: s.PagesWritten, PagesChecked: rep.PagesChecked, Elapsed: time.Since(start)}
	if s.FirstHeartbeatMS != nil {
		r.FirstHeartbeat = time.Duration(*s.FirstHeartbeatMS * float64(time.Millisecond))
	}
	return r, nil
}
