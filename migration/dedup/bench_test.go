package dedup

import (
	"math/rand/v2"
	"testing"

	"github.com/godwit-vm/godwit/migration/pages"
)

// BenchmarkEncode runs pages through one connection's encoder on one goroutine: all distinct
// (every page hashed and indexed, none a reference) and all copies of 256 pages (nearly all
// references, each with its SHA-256). The MB/s is page processing per core at the source.
func BenchmarkEncode(b *testing.B) {
	const n = 1 << 16 // pages: 256 MiB
	for _, c := range []struct {
		name string
		pool int
	}{{"distinct", n}, {"pool-256", 256}} {
		b.Run(c.name, func(b *testing.B) {
			src := rand.NewChaCha8([32]byte{1})
			pool := make([]byte, c.pool*ps)
			src.Read(pool)
			pick := rand.New(rand.NewPCG(1, 2))
			order := make([]int, n)
			for i := range order {
				order[i] = i % c.pool
				if c.pool < n {
					order[i] = pick.IntN(c.pool)
				}
			}
			out := make([]byte, 0, Size)
			b.SetBytes(n * ps)
			refs := 0
			for b.Loop() {
				x := NewIndex([]uint64{n}, 0)
				x.StartRound(1, func(int, uint64) bool { return true })
				e := x.Lane(0)
				refs = 0
				for i, k := range order {
					if _, ok := e.Encode(out[:0], pages.Ref{Index: uint64(i)}, pool[k*ps:(k+1)*ps]); ok {
						refs++
					}
				}
			}
			b.ReportMetric(float64(refs)/n, "refs/page")
		})
	}
}
