package main

import (
	"fmt"
	"hash/fnv"
	"math"

	"github.com/godwit-vm/godwit/internal/guest"
)

// guestConfig turns the workload flags into the guest's configuration for a VM of memBytes and
// vcpus. Errors name the flag at fault.
func (w *WorkloadFlags) guestConfig(memBytes uint64, vcpus int) (guest.Config, error) {
	c := guest.DefaultConfig()
	var err error
	if c.Workload, err = guest.ParseWorkload(w.Workload); err != nil {
		return c, fmt.Errorf("--workload: %w", err)
	}
	if c.Content, err = guest.ParseContent(w.Content); err != nil {
		return c, fmt.Errorf("--content: %w", err)
	}
	if c.Pattern, err = guest.ParsePattern(w.Pattern); err != nil {
		return c, fmt.Errorf("--pattern: %w", err)
	}
	c.Seed = w.Seed
	if w.Batch < 1 {
		return c, fmt.Errorf("--batch %d: want at least 1 page", w.Batch)
	}
	c.BatchPages = uint64(w.Batch)
	if vcpus < 1 {
		return c, fmt.Errorf("--vcpus %d: want at least 1", vcpus)
	}
	if w.Rate > 0 {
		c.Rate = uint64(math.Ceil(float64(w.Rate) / float64(vcpus)))
	}
	if w.Workload == "dirty" {
		if w.WSS < guest.PageSize*Size(vcpus) {
			return c, fmt.Errorf("--wss %d bytes: want at least one page per vCPU", w.WSS)
		}
		if uint64(w.WSS) > memBytes {
			return c, fmt.Errorf("--wss %s is larger than --mem %s", formatBytes(uint64(w.WSS)), formatBytes(memBytes))
		}
		c.WSSPages = uint64(w.WSS) / guest.PageSize / uint64(vcpus)
	}
	for _, f := range []struct {
		flag string
		v    float64
		dst  *uint64
	}{{"--touch", w.Touch, &c.TouchPermille}, {"--hot-size", w.HotSize, &c.HotPermille}, {"--hot-prob", w.HotProb, &c.HotProbPermille}} {
		if f.v < 0 || f.v > 1 {
			return c, fmt.Errorf("%s %g: want a fraction between 0 and 1", f.flag, f.v)
		}
		*f.dst = uint64(math.Round(f.v * 1000))
	}
	if w.Peak != 0 {
		switch {
		case w.Workload != "churn":
			return c, fmt.Errorf("--peak %g: only the churn workload swings (this is --workload %s)", w.Peak, w.Workload)
		case w.Peak <= w.Touch || w.Peak > 1:
			return c, fmt.Errorf("--peak %g: want a fraction above --touch %g and at most 1", w.Peak, w.Touch)
		}
		c.PeakPermille = uint64(math.Round(w.Peak * 1000))
	}
	if (w.Private != 0 || w.Near != 0) && w.Content != "image" {
		return c, fmt.Errorf("--private and --near share out image pages: they need --content image (this is %s)", w.Content)
	}
	for _, f := range []struct {
		flag string
		v    float64
		dst  *uint64
	}{{"--private", w.Private, &c.PrivatePermille}, {"--near", w.Near, &c.NearPermille}} {
		if f.v < 0 || f.v > 1 {
			return c, fmt.Errorf("%s %g: want a fraction between 0 and 1", f.flag, f.v)
		}
		*f.dst = uint64(math.Round(f.v * 1000))
	}
	if c.PrivatePermille+c.NearPermille > 1000 {
		return c, fmt.Errorf("--private %g and --near %g: more than all pages together", w.Private, w.Near)
	}
	c.PrivateSeed = w.PrivateSeed
	if w.ImagePool < 1 {
		return c, fmt.Errorf("--image-pool %d: want 1 page at least", w.ImagePool)
	}
	c.ImagePoolPages = uint64(w.ImagePool)
	if w.Interval <= 0 {
		return c, fmt.Errorf("--idle-interval %v: want a positive duration", w.Interval)
	}
	c.IdleIntervalUS = uint64(w.Interval.Microseconds())
	return c, c.Validate()
}

// paramsBuilder checks the flags now and returns the function the VMM calls once it knows the
// guest's TSC frequency.
func (c *RunCmd) paramsBuilder() (func(uint32) ([]byte, error), error) {
	cfg, err := c.guestConfig(uint64(c.Mem), c.VCPUs)
	if err != nil {
		return nil, err
	}
	if cfg.PrivateSeed == 0 {
		cfg.PrivateSeed = nameSeed(c.Name)
	}
	build, err := guest.ParamsBuilder(cfg, uint64(c.Mem), c.VCPUs)
	if err != nil {
		return nil, fmt.Errorf("--mem %s with --vcpus %d: %w", formatBytes(uint64(c.Mem)), c.VCPUs, err)
	}
	return build, nil
}

// nameSeed is a VM's private seed by default: VMs of different names hold different pages of
// their own.
func nameSeed(name string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(name))
	return h.Sum64() | 1 // never 0, which asks for this default
}
