package main

import "testing"

func TestParseSize(t *testing.T) {
	for in, want := range map[string]uint64{"1G": 1 << 30, "256M": 256 << 20, "512MiB": 512 << 20, "64k": 64 << 10, "100": 100 << 20, "1.5G": 3 << 29} {
		got, err := parseSize(in)
		if err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "x", "-1G", "1Q"} {
		if _, err := parseSize(bad); err == nil {
			t.Errorf("parseSize(%q) succeeded", bad)
		}
	}
	var r Rate
	if err := r.UnmarshalText([]byte("20k")); err != nil || r != 20000 {
		t.Errorf("rate 20k = %d, %v", r, err)
	}
	if err := r.UnmarshalText([]byte("fast")); err == nil {
		t.Error("rate 'fast' accepted")
	}
}
