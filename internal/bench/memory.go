package bench

import (
	"bufio"
	"bytes"
	"os"
	"strconv"
)

// hostUsed is the host's memory in use, MemTotal - MemAvailable from /proc/meminfo (bytes; -1
// if unknown). It counts what the VM processes hold whatever holds it: the per-process PSS
// misses the pages of a memfd that a process wrote with pwrite but never mapped (godwit's
// destination receives pages that way), and counts a shared page once per sharer's share.
func hostUsed() int64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return -1
	}
	var total, avail int64 = -1, -1
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := bytes.Fields(sc.Bytes())
		if len(f) < 2 {
			continue
		}
		kb, err := strconv.ParseInt(string(f[1]), 10, 64)
		if err != nil {
			continue
		}
		switch string(f[0]) {
		case "MemTotal:":
			total = kb << 10
		case "MemAvailable:":
			avail = kb << 10
		}
	}
	if total < 0 || avail < 0 {
		return -1
	}
	return total - avail
}

// vmMemory is the host memory in use above base, what was in use before the run's VMs started:
// what the VMs hold (0 if unknown).
func vmMemory(base int64) int64 {
	used := hostUsed()
	if base < 0 || used < 0 {
		return 0
	}
	return max(used-base, 1)
}

// setMemory puts the memory figures of the timeline into the run's extras: the host memory
// the VMs held just before the migration, its peak from then to the end, and their ratio (what
// a migration costs beyond the VM's own memory: about 2 for a copy within one host, 1 for a
// handover).
func (r *Run) setMemory() {
	var before, peak int64
	for _, s := range r.Timeline {
		switch {
		case s.MemBytes <= 0:
		case s.TMS <= 0:
			before = s.MemBytes
		case r.EndMS <= 0 || s.TMS <= r.EndMS:
			peak = max(peak, s.MemBytes)
		}
	}
	if before <= 0 || peak <= 0 {
		return
	}
	if r.Extra == nil {
		r.Extra = map[string]float64{}
	}
	r.Extra["mem_before_mib"] = float64(before) / (1 << 20)
	r.Extra["mem_peak_mib"] = float64(peak) / (1 << 20)
	r.Extra["mem_peak_ratio"] = float64(peak) / float64(before)
}
