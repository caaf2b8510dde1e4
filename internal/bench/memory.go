package bench

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
)

// pssOf is the proportional set size of the processes together (bytes; 0 if unknown): pages
// they share count once in the sum, so that it is the host memory both hold. A handover
// shares guest memory between the source and destination processes; a copy holds it twice.
func pssOf(pids ...int) int64 {
	var sum int64
	for _, pid := range pids {
		n, err := pss(pid)
		if err != nil {
			continue // the process has exited: it holds nothing
		}
		sum += n
	}
	return sum
}

// pss reads a process's Pss from /proc/PID/smaps_rollup.
func pss(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0, err
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := bytes.Fields(sc.Bytes())
		if len(f) >= 2 && string(f[0]) == "Pss:" {
			kb, err := strconv.ParseInt(string(f[1]), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no Pss in /proc/%d/smaps_rollup", pid)
}

// setMemory puts the memory figures of the timeline into the run's extras: the VM processes'
// PSS just before the migration, its peak from then to the end, and their ratio (the host
// memory a migration costs beyond the VM's own).
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
