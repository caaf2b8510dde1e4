package migration

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/godwit-vm/godwit/migration/wire"
)

// BenchmarkPageSet: the switch's page set of a 512 MiB region where a quarter of the pages,
// at random, hold data (about 25k runs), as the source writes it (the Switch payloads) and as
// the destination reads it back into a bitmap, both in the stop window (framing, checksums and
// the socket left out).
func BenchmarkPageSet(b *testing.B) {
	const pages = 512 << 20 >> 12
	set := NewBitmap(pages)
	rng := rand.New(rand.NewPCG(1, 2))
	for range pages / 4 {
		set.Set(rng.Uint64N(pages))
	}
	sets, sizes := []Bitmap{set}, []uint64{pages}
	d := wire.Description{PageSize: 4096, Regions: []wire.Region{{Name: "ram", Size: pages * 4096}}, VCPUs: 1, Devices: []string{"vcpu0"}}
	write := func(payloads [][]byte) [][]byte {
		payloads = payloads[:0]
		if err := writeSet(sets, sizes, func(ps *wire.PageSet, more bool) error {
			payloads = append(payloads, wire.AppendSwitch(nil, &wire.Switch{PageSet: *ps, More: more}))
			return nil
		}); err != nil {
			b.Fatal(err)
		}
		return payloads
	}
	read := func(payloads [][]byte) {
		k := 0
		got, count, err := readSet(sizes, func() (*wire.PageSet, bool, error) {
			sw, err := wire.DecodeSwitch(payloads[k], &d)
			if err != nil {
				return nil, false, err
			}
			k++
			return &sw.PageSet, k < len(payloads), nil
		})
		if err != nil {
			b.Fatal(err)
		}
		if count != set.Count(pages) || !slices.Equal(got[0], set) {
			b.Fatal("the set read back differs")
		}
	}
	b.Run("source", func(b *testing.B) {
		var payloads [][]byte
		for i := 0; i < b.N; i++ {
			payloads = write(payloads)
		}
		n := 0
		for _, p := range payloads {
			n += len(p)
		}
		b.ReportMetric(float64(n), "bytes")
	})
	b.Run("destination", func(b *testing.B) {
		payloads := write(nil)
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			read(payloads)
		}
	})
}

// BenchmarkStopWindowSets: the engine's work on page sets in a pre-copy stop window, for a
// guest that dirtied 100 pages since the last round, at 1, 16, 64 and 256 GiB of address
// space: the union of the policy's set and the last fetch, the final round's count, and the
// walk that reads the pages (here into nothing). What it costs beyond the 100 pages follows
// the bitmaps' size (a word per 64 pages).
func BenchmarkStopWindowSets(b *testing.B) {
	for _, gib := range []uint64{1, 16, 64, 256} {
		b.Run(fmt.Sprintf("%dGiB", gib), func(b *testing.B) {
			pages := gib << 30 >> 12
			rng := rand.New(rand.NewPCG(gib, 3))
			set, last := NewBitmap(pages), NewBitmap(pages)
			for range 50 {
				set.Set(rng.Uint64N(pages))
				last.Set(rng.Uint64N(pages))
			}
			s := &sender{desc: Description{Layout: Layout{PageSize: 4096, Regions: []Region{{Name: "ram", Size: pages * 4096}}}}}
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				u := union([]Bitmap{set}, []Bitmap{last})
				p := s.plan(u)
				n := uint64(0)
				for r := range p.set {
					for first, ok := p.set[r].next(0, pages, true); ok; first, ok = p.set[r].next(first+1, pages, true) {
						n++
					}
				}
				if n != p.pages || n == 0 {
					b.Fatalf("walked %d pages of %d", n, p.pages)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Microseconds())/1000/float64(b.N), "ms/window")
		})
	}
}
