package guest

import (
	"fmt"
	"sort"
	"strings"
)

var (
	workloadNames = map[uint64]string{WorkloadIdle: "idle", WorkloadDirty: "dirty", WorkloadChurn: "churn"}
	contentNames  = map[uint64]string{ContentZero: "zero", ContentText: "text", ContentRandom: "random", ContentImage: "image", ContentPatch: "patch"}
	patternNames  = map[uint64]string{PatternSequential: "sequential", PatternRandom: "random", PatternHotCold: "hotcold"}
)

// WorkloadName is the name of a workload kind as flags and reports spell it.
func WorkloadName(w uint64) string { return name(workloadNames, w) }

// ContentName is the name of a content kind.
func ContentName(c uint64) string { return name(contentNames, c) }

// PatternName is the name of a write pattern.
func PatternName(p uint64) string { return name(patternNames, p) }

// ParseWorkload is the inverse of WorkloadName.
func ParseWorkload(s string) (uint64, error) { return parse(workloadNames, "workload", s) }

// ParseContent is the inverse of ContentName.
func ParseContent(s string) (uint64, error) { return parse(contentNames, "content kind", s) }

// ParsePattern is the inverse of PatternName.
func ParsePattern(s string) (uint64, error) { return parse(patternNames, "write pattern", s) }

func name(names map[uint64]string, v uint64) string {
	if n, ok := names[v]; ok {
		return n
	}
	return fmt.Sprintf("unknown(%d)", v)
}

func parse(names map[uint64]string, what, s string) (uint64, error) {
	var known []string
	for v, n := range names {
		if n == s {
			return v, nil
		}
		known = append(known, n)
	}
	sort.Strings(known)
	return 0, fmt.Errorf("guest: unknown %s %q (known: %s)", what, s, strings.Join(known, ", "))
}
