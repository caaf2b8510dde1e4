package main

import (
	"fmt"
	"strconv"
	"strings"
)

// Size is a byte count given as 512M, 1G, 1.5G, 64K or a plain number of MiB.
type Size uint64

func (s *Size) UnmarshalText(b []byte) error {
	v, err := parseSize(string(b))
	if err != nil {
		return err
	}
	*s = Size(v)
	return nil
}

func parseSize(t string) (uint64, error) {
	t = strings.TrimSpace(strings.ToUpper(t))
	t = strings.TrimSuffix(strings.TrimSuffix(t, "IB"), "B")
	mult := float64(1 << 20)
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'K':
			mult, t = 1<<10, t[:n-1]
		case 'M':
			mult, t = 1<<20, t[:n-1]
		case 'G':
			mult, t = 1<<30, t[:n-1]
		case 'T':
			mult, t = 1<<40, t[:n-1]
		}
	}
	f, err := strconv.ParseFloat(t, 64)
	if err != nil || f < 0 {
		return 0, fmt.Errorf("size %q: want a number with an optional K, M, G or T suffix (plain numbers are MiB)", t)
	}
	return uint64(f * mult), nil
}

// Rate is pages per second, or 0 for "max" (as fast as the guest can).
type Rate uint64

func (r *Rate) UnmarshalText(b []byte) error {
	t := strings.TrimSpace(strings.ToLower(string(b)))
	if t == "max" || t == "0" {
		*r = 0
		return nil
	}
	mult := 1.0
	switch {
	case strings.HasSuffix(t, "k"):
		mult, t = 1e3, t[:len(t)-1]
	case strings.HasSuffix(t, "m"):
		mult, t = 1e6, t[:len(t)-1]
	}
	f, err := strconv.ParseFloat(t, 64)
	if err != nil || f <= 0 {
		return fmt.Errorf("rate %q: want 'max' or pages per second such as 20000 or 20k", string(b))
	}
	*r = Rate(f * mult)
	return nil
}

func (r Rate) String() string {
	if r == 0 {
		return "max"
	}
	return strconv.FormatUint(uint64(r), 10)
}
