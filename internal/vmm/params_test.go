package vmm

import (
	"github.com/godwit-vm/godwit/internal/guest"
)

// testParams builds the guest params for a test workload.
func testParams(memBytes uint64, vcpus int, w workload) (func(uint32) ([]byte, error), error) {
	c := guest.DefaultConfig()
	var err error
	if c.Workload, err = guest.ParseWorkload(w.kind); err != nil {
		return nil, err
	}
	if c.Content, err = guest.ParseContent(w.content); err != nil {
		return nil, err
	}
	if w.pattern != "" {
		if c.Pattern, err = guest.ParsePattern(w.pattern); err != nil {
			return nil, err
		}
	}
	c.WSSPages = w.wssMiB << 20 / guest.PageSize / uint64(vcpus)
	c.Rate = w.rate / uint64(vcpus)
	if w.touch > 0 {
		c.TouchPermille = uint64(w.touch * 1000)
	}
	c.PeakPermille = uint64(w.peak * 1000)
	c.PrivatePermille, c.NearPermille, c.PrivateSeed = uint64(w.private*1000), uint64(w.near*1000), 7
	return guest.ParamsBuilder(c, memBytes, vcpus)
}
