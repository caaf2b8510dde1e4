package migration

import (
	"fmt"
	"math/rand/v2"
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
		if count != set.Count(pages) || !got[0].Equal(set, pages) {
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

// BenchmarkStopWindowSets: the engine's work on page sets in a stop window, for a guest that
// dirtied 50 pages since the last fetch, at 1, 16, 64 and 256 GiB of address space.
//   - precopy: the union of the policy's set (50 pages) and the last fetch, the final round's
//     count, and the walk that reads the pages (here into nothing);
//   - postcopy: the union of the pages that hold data (1000) and the last fetch, its count, the
//     Switch frames the source writes and the bitmaps the destination reads them into.
//
// What grows with the size is a pointer per chunk of pages (Bitmap): the rest follows the
// pages in the sets.
func BenchmarkStopWindowSets(b *testing.B) {
	for _, mode := range []string{ModePrecopy, ModePostcopy} {
		for _, gib := range []uint64{1, 16, 64, 256} {
			b.Run(fmt.Sprintf("%s/%dGiB", mode, gib), func(b *testing.B) {
				pages := gib << 30 >> 12
				rng := rand.New(rand.NewPCG(gib, 3))
				held := 50
				if mode == ModePostcopy {
					held = 1000
				}
				sizes := []uint64{pages}
				d := wire.Description{PageSize: 4096, Regions: []wire.Region{{Name: "ram", Size: pages * 4096}}, VCPUs: 1, Devices: []string{"vcpu0"}}
				s := &sender{desc: Description{Layout: Layout{PageSize: 4096, Regions: []Region{{Name: "ram", Size: pages * 4096}}}}}
				// The sets as the Source hands them over, made in batches outside the timer
				// (union changes its first argument).
				type pair struct{ set, last Bitmap }
				var pool []pair
				fill := func() {
					pool = pool[:0]
					for range 16 {
						p := pair{NewBitmap(pages), NewBitmap(pages)}
						for range held {
							p.set.Set(rng.Uint64N(pages))
						}
						for range 50 {
							p.last.Set(rng.Uint64N(pages))
						}
						pool = append(pool, p)
					}
				}
				var payloads [][]byte
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					if len(pool) == 0 {
						b.StopTimer()
						fill()
						b.StartTimer()
					}
					set, last := pool[len(pool)-1].set, pool[len(pool)-1].last
					pool = pool[:len(pool)-1]
					u := union([]Bitmap{set}, []Bitmap{last})
					if mode == ModePrecopy {
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
						continue
					}
					count := s.count(u)
					payloads = payloads[:0]
					if err := writeSet(u, sizes, func(ps *wire.PageSet, more bool) error {
						payloads = append(payloads, wire.AppendSwitch(nil, &wire.Switch{PageSet: *ps, More: more}))
						return nil
					}); err != nil {
						b.Fatal(err)
					}
					k := 0
					got, n, err := readSet(sizes, func() (*wire.PageSet, bool, error) {
						sw, err := wire.DecodeSwitch(payloads[k], &d)
						k++
						return &sw.PageSet, k < len(payloads), err
					})
					if err != nil || n != count || got[0].Count(pages) != count {
						b.Fatalf("read back %d pages of %d: %v", n, count, err)
					}
				}
				b.ReportMetric(float64(b.Elapsed().Microseconds())/1000/float64(b.N), "ms/window")
			})
		}
	}
}
