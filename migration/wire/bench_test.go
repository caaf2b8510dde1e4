package wire

import (
	"bytes"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"net"
	"testing"
	"time"

	"github.com/zeebo/xxh3"
)

// benchStream measures encode + decode throughput of raw page batches: one goroutine encodes
// 1 MiB batches from a 64 MiB "guest" into w; the benchmark goroutine decodes them from r and
// copies every page into a 64 MiB "destination", as Receive does. Bytes are page data.
func benchStream(b *testing.B, w io.WriteCloser, r io.Reader) {
	const ps = 4096
	const batchPages = 256
	const memPages = 16384
	src := make([]byte, memPages*ps)
	rand.NewChaCha8([32]byte{1}).Read(src)
	dst := make([]byte, len(src))
	desc := Description{PageSize: ps, VCPUs: 1, Regions: []Region{{Name: "ram", Size: memPages * ps}}}

	errc := make(chan error, 1)
	go func() {
		wr := NewWriter(w)
		err := wr.WritePreamble()
		if err == nil {
			err = wr.WriteHello(&Hello{Desc: desc})
		}
		if err == nil {
			err = wr.WriteRound(&Round{N: 1})
		}
		var ob OutBatch
		for i := 0; err == nil && i < b.N; i++ {
			first := (i * batchPages) % memPages
			ob.Reset(0, ps)
			for p := first; p < first+batchPages; p++ {
				ob.Add(uint64(p), EncRaw, src[p*ps:(p+1)*ps])
			}
			err = wr.WritePages(&ob)
		}
		errc <- err
	}()

	b.SetBytes(batchPages * ps)
	b.ResetTimer()
	rd := NewReader(r, AtDestination)
	if _, err := rd.ReadPreamble(); err != nil {
		b.Fatal(err)
	}
	for got := 0; got < b.N; {
		m, err := rd.Next()
		if err != nil {
			b.Fatal(err)
		}
		if pb, ok := m.(*PageBatch); ok {
			for sp := range pb.Spans {
				copy(dst[sp.First*ps:], sp.Data)
			}
			got++
		}
	}
	b.StopTimer()
	if err := <-errc; err != nil {
		b.Fatal(err)
	}
	w.Close()
}

func BenchmarkStreamPipe(b *testing.B) {
	r, w := net.Pipe()
	defer r.Close()
	benchStream(b, w, r)
}

func BenchmarkStreamTCP(b *testing.B) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, _ := l.Accept()
		acc <- c
	}()
	w, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	r := <-acc
	defer r.Close()
	benchStream(b, w, r)
}

// BenchmarkEncode measures the sender alone: batch assembly, CRC and the gathered write into
// a sink that discards (no copy).
func BenchmarkEncode(b *testing.B) {
	const ps, n = 4096, 256
	src := make([]byte, n*ps)
	rand.NewChaCha8([32]byte{2}).Read(src)
	wr := NewWriter(io.Discard)
	var ob OutBatch
	b.SetBytes(n * ps)
	for b.Loop() {
		ob.Reset(0, ps)
		for p := 0; p < n; p++ {
			ob.Add(uint64(p), EncRaw, src[p*ps:(p+1)*ps])
		}
		if err := wr.WritePages(&ob); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkFrameSum compares the frame checksum (XXH3, over a 256 KiB page batch) with CRC32C,
// the obvious alternative, measured in the same run: MB/s of each and their ratio.
func BenchmarkFrameSum(b *testing.B) {
	head := make([]byte, 12)
	batch := make([][]byte, 64)
	for i := range batch {
		batch[i] = bytes.Repeat([]byte{byte(i), 0x5a}, 2048)
	}
	castagnoli := crc32.MakeTable(crc32.Castagnoli)
	h := xxh3.New()
	const bytesPerOp = 64 * 4096
	var sumNS, crcNS time.Duration
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		frameSum(h, head, batch...)
		t1 := time.Now()
		c := crc32.Update(0, castagnoli, head)
		for _, p := range batch {
			c = crc32.Update(c, castagnoli, p)
		}
		sumNS += t1.Sub(t0)
		crcNS += time.Since(t1)
	}
	mbs := func(d time.Duration) float64 { return float64(bytesPerOp) * float64(b.N) / d.Seconds() / 1e6 }
	b.ReportMetric(mbs(sumNS), "xxh3-MB/s")
	b.ReportMetric(mbs(crcNS), "crc32c-MB/s")
	b.ReportMetric(float64(crcNS)/float64(sumNS), "xxh3-speedup")
}
