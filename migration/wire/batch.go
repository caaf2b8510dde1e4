package wire

import "fmt"

const batchHeadSize = 16

// OutBatch collects the pages of one PageBatch frame on the sending side. It holds references
// to the pages' data, not copies: the data must stay unchanged until the batch is written. Data
// slices that are adjacent in memory are merged, so a run of raw pages read into one buffer is
// written with one iovec. Reuse one OutBatch for all batches: Reset keeps its storage.
type OutBatch struct {
	Region   uint32
	pageSize int
	runs     []Run
	encs     []byte
	lens     []uint32
	data     [][]byte
	dataLen  int
}

// Reset empties the batch for pages of region r with the given page size.
func (b *OutBatch) Reset(r uint32, pageSize int) {
	b.Region, b.pageSize = r, pageSize
	b.runs, b.encs, b.lens = b.runs[:0], b.encs[:0], b.lens[:0]
	clear(b.data) // drop references to the previous batch's buffers
	b.data, b.dataLen = b.data[:0], 0
}

// Pages is the number of pages added since Reset.
func (b *OutBatch) Pages() int { return len(b.encs) }

// PayloadLen is the size of the frame payload the batch encodes to.
func (b *OutBatch) PayloadLen() int {
	return batchHeadSize + runSize*len(b.runs) + len(b.encs) + 4*len(b.lens) + b.dataLen
}

// Fits reports whether one more page with n bytes of data keeps the batch within the caps.
func (b *OutBatch) Fits(n int) bool {
	return len(b.encs) < MaxBatchPages && b.PayloadLen()+runSize+1+4+n <= MaxFramePayload
}

// Add appends page index of the batch's region. Pages must be added in ascending index order.
// data is the encoded page: empty for EncZero, the page for EncRaw, the reference for EncDedup, at
// most a page for the variable encodings. A violation of these rules is a bug in the caller
// and panics.
func (b *OutBatch) Add(index uint64, e Encoding, data []byte) {
	want := -1
	switch e {
	case EncZero:
		want = 0
	case EncRaw:
		want = b.pageSize
	case EncDedup:
		want = DedupSize
	case EncCompressed, EncDelta, EncS2:
		if len(data) == 0 || len(data) > b.pageSize {
			panic(fmt.Sprintf("wire: OutBatch.Add: %s page %d has %d bytes of data, want 1..%d", e, index, len(data), b.pageSize))
		}
		b.lens = append(b.lens, uint32(len(data)))
	default:
		panic(fmt.Sprintf("wire: OutBatch.Add: page %d: unknown %s", index, e))
	}
	if want >= 0 && len(data) != want {
		panic(fmt.Sprintf("wire: OutBatch.Add: %s page %d has %d bytes of data, want %d", e, index, len(data), want))
	}
	if n := len(b.runs); n > 0 && b.runs[n-1].First+uint64(b.runs[n-1].Count) == index && b.runs[n-1].Count < 1<<31 {
		b.runs[n-1].Count++
	} else {
		if n > 0 && index < b.runs[n-1].First+uint64(b.runs[n-1].Count) {
			panic(fmt.Sprintf("wire: OutBatch.Add: page %d added after page %d", index, b.runs[n-1].First+uint64(b.runs[n-1].Count)-1))
		}
		b.runs = append(b.runs, Run{First: index, Count: 1})
	}
	b.encs = append(b.encs, byte(e))
	if len(data) == 0 {
		return
	}
	b.dataLen += len(data)
	if n := len(b.data); n > 0 {
		last := b.data[n-1]
		// Adjacent in memory: the byte after last is data's first byte, and last's capacity
		// covers all of data, so extending last is the same memory.
		if cap(last)-len(last) >= len(data) && &last[:len(last)+1][len(last)] == &data[0] {
			b.data[n-1] = last[:len(last)+len(data)]
			return
		}
	}
	b.data = append(b.data, data)
}

// appendHead appends the batch payload up to (not including) the data.
func (b *OutBatch) appendHead(p []byte) []byte {
	p = le.AppendUint32(p, b.Region)
	p = le.AppendUint32(p, uint32(len(b.runs)))
	p = le.AppendUint32(p, uint32(len(b.encs)))
	p = le.AppendUint32(p, uint32(len(b.lens)))
	p = appendRuns(p, b.runs)
	p = append(p, b.encs...)
	for _, n := range b.lens {
		p = le.AppendUint32(p, n)
	}
	return p
}

// PageBatch is a decoded PageBatch frame. Its slices alias the Reader's buffer and are valid
// until the next call to Next.
type PageBatch struct {
	Region uint32
	Runs   []Run
	Encs   []byte // one Encoding per page, in run order
	Pages  uint64 // total pages (the sum of the runs' counts)
	Data   []byte // all pages' data, in page order

	lens     []byte // u32 per variable-length page
	pageSize int
	counts   [numEncodings]uint32
}

// Count is the number of pages with encoding e.
func (b *PageBatch) Count(e Encoding) int {
	if int(e) < len(b.counts) {
		return int(b.counts[e])
	}
	return 0
}

// decodePageBatch decodes p into b (reusing b's storage), checking it against the layout and
// the negotiated capabilities.
func decodePageBatch(p []byte, d *Description, caps Caps, b *PageBatch) error {
	c := &cursor{p: p, t: TypePageBatch}
	b.Region = c.u32("region")
	nruns := c.u32("run count")
	npages := c.u32("page count")
	nvar := c.u32("variable-length page count")
	if c.err != nil {
		return c.err
	}
	bad := func(k error, format string, args ...any) error {
		return &FrameError{Type: TypePageBatch, Kind: k, Detail: fmt.Sprintf(format, args...)}
	}
	if int(b.Region) >= len(d.Regions) {
		return bad(ErrMalformed, "region %d, the layout has %d", b.Region, len(d.Regions))
	}
	if npages > MaxBatchPages {
		return bad(ErrTooLarge, "%d pages, at most %d", npages, MaxBatchPages)
	}
	if npages == 0 || nruns == 0 || nruns > npages || nvar > npages {
		return bad(ErrMalformed, "%d runs, %d pages, %d variable-length pages", nruns, npages, nvar)
	}
	var total uint64
	b.Runs, total = decodeRuns(c, b.Runs, int(nruns), d.Pages(int(b.Region)), uint64(npages))
	if c.err != nil {
		return c.err
	}
	if total != uint64(npages) {
		return bad(ErrMalformed, "runs hold %d pages, header says %d", total, npages)
	}
	b.Pages = total
	b.Encs = c.take(int(npages), "encodings")
	if c.err != nil {
		return c.err
	}
	b.counts = [numEncodings]uint32{}
	for i, e := range b.Encs {
		if e >= numEncodings {
			return bad(ErrMalformed, "page %d of the batch: unknown %s", i, Encoding(e))
		}
		if need := Encoding(e).needs(); need != 0 && caps&need == 0 {
			return bad(ErrMalformed, "page %d of the batch: %s not negotiated", i, Encoding(e))
		}
		b.counts[e]++
	}
	if want := b.counts[EncCompressed] + b.counts[EncDelta] + b.counts[EncS2]; nvar != want {
		return bad(ErrMalformed, "header says %d variable-length pages, encodings say %d", nvar, want)
	}
	b.lens = c.take(4*int(nvar), "lengths")
	if c.err != nil {
		return c.err
	}
	ps := uint64(d.PageSize)
	want := uint64(b.counts[EncRaw])*ps + uint64(b.counts[EncDedup])*DedupSize
	for i := 0; i < int(nvar); i++ {
		n := uint64(le.Uint32(b.lens[4*i:]))
		if n == 0 || n > ps {
			return bad(ErrMalformed, "variable-length page %d has %d bytes, want 1..%d", i, n, ps)
		}
		want += n
	}
	if want > uint64(len(p)) {
		return bad(ErrMalformed, "pages need %d bytes of data, payload has %d", want, len(p)-c.off)
	}
	b.Data = c.take(int(want), "page data")
	b.pageSize = int(ps)
	return c.end()
}

// Span is a stretch of consecutive pages of one batch with the same encoding. Zero and raw
// pages are merged into maximal spans; every other encoding yields one page per span.
type Span struct {
	First uint64
	Count uint64
	Enc   Encoding
	Data  []byte // raw: Count pages; others: the page's encoded data; zero: empty
}

// Spans yields the batch's pages as spans, in order.
func (b *PageBatch) Spans(yield func(Span) bool) {
	var cur Span
	have := false
	i, off, li, start := 0, 0, 0, 0
	for _, r := range b.Runs {
		for k := uint64(0); k < uint64(r.Count); k++ {
			idx := r.First + k
			e := Encoding(b.Encs[i])
			i++
			n := 0
			switch e {
			case EncRaw:
				n = b.pageSize
			case EncDedup:
				n = DedupSize
			case EncCompressed, EncDelta, EncS2:
				n = int(le.Uint32(b.lens[4*li:]))
				li++
			}
			if have && cur.Enc == e && (e == EncZero || e == EncRaw) && cur.First+cur.Count == idx {
				cur.Count++
				off += n
				cur.Data = b.Data[start:off]
				continue
			}
			if have && !yield(cur) {
				return
			}
			start = off
			off += n
			cur, have = Span{First: idx, Count: 1, Enc: e, Data: b.Data[start:off]}, true
		}
	}
	if have {
		yield(cur)
	}
}
