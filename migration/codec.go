package migration

import (
	"fmt"
	"slices"
	"strings"
	"sync/atomic"

	"github.com/godwit-vm/godwit/migration/compress"
	"github.com/godwit-vm/godwit/migration/dedup"
	"github.com/godwit-vm/godwit/migration/delta"
	"github.com/godwit-vm/godwit/migration/pages"
	"github.com/godwit-vm/godwit/migration/wire"
)

// Page encodings beyond zero and raw (SendOptions.Compress).
const (
	CompressNone = "none"
	CompressZstd = "zstd" // every page that shrinks by an eighth or more, as a zstd frame of its own
	// CompressS2 is CompressZstd with S2 blocks: about four times less CPU per page, larger
	// pages; for when the CPU, not the link, would limit zstd.
	CompressS2 = "s2"
	// CompressAuto compresses while the link, not the CPU, is the limit: a batch is
	// compressed when the bandwidth cap held the one before it (on its connection) back, and
	// goes raw when it did not, so that the CPU compresses only what would otherwise wait.
	// Batches then mix raw and compressed ones at the rate the CPU and the link allow. The
	// cap is the one sign of the link this side can read; without one, pages go raw.
	CompressAuto = "auto"
)

// CheckCompress says what is wrong with a page encoding and zstd level (SendOptions.Compress,
// CompressLevel; empty takes the default), for the engine and for callers that check a request
// before they start a migration.
func CheckCompress(kind, level string) error {
	switch kind {
	case "", CompressNone, CompressZstd, CompressS2, CompressAuto:
	default:
		return fmt.Errorf("unknown compression %q (want %s, %s, %s or %s)", kind, CompressNone, CompressZstd, CompressS2, CompressAuto)
	}
	if level != "" && kind == CompressS2 {
		return fmt.Errorf("compression %s has no levels (%q given)", CompressS2, level)
	}
	if level != "" && !slices.Contains(compress.Levels, level) {
		return fmt.Errorf("unknown zstd level %q (want one of %s)", level, strings.Join(compress.Levels, ", "))
	}
	return nil
}

// pageCodec is the receiving side's one decoding step for every path a page takes: pre-copy's
// rounds on any connection, post-copy's push and demanded pages. It turns a batch into the
// two things a Destination takes, raw spans and zero spans, and names what each travelled as
// for the counts. The decoders are the migration's, not a connection's.
type pageCodec struct {
	ps   int
	desc *wire.Description   // the layout: a reference must name a page in it
	zstd *compress.Decoder   // CapCompressed accepted
	s2   *compress.S2Decoder // CapS2 accepted
	// old reads back the copy a delta page (CapDelta accepted) changes and the page a dedup
	// page (CapDedup) refers to. Deltas are taken only until the switch to post-copy
	// (switched), when the pages the destination holds stop being the ones the source last
	// sent; from then on the guest runs here and may change the page a reference names, so a
	// reference that does not check is not an error but a page to fetch again
	// (placing.again).
	old      PageReader
	delta    bool
	dedup    bool
	switched atomic.Bool
}

// PageReader is an optional Destination capability: reading back pages it holds, for the
// delta encoding (a page sent as its change to the copy sent before).
type PageReader interface {
	ReadPages(r int, first uint64, dst []byte) error
}

// newPageCodec makes the decoders for the accepted capabilities over the layout desc; dst reads
// back pages for deltas and dedup references.
func newPageCodec(caps wire.Caps, desc *wire.Description, dst PageReader) (*pageCodec, error) {
	ps := int(desc.PageSize)
	c := &pageCodec{ps: ps, desc: desc, old: dst, delta: caps&wire.CapDelta != 0, dedup: caps&wire.CapDedup != 0}
	if caps&wire.CapS2 != 0 {
		c.s2 = &compress.S2Decoder{PageSize: ps}
	}
	if caps&wire.CapCompressed != 0 {
		d, err := compress.NewDecoder(ps)
		if err != nil {
			return nil, err
		}
		c.zstd = d
	}
	return c, nil
}

func (c *pageCodec) close() {
	if c != nil && c.zstd != nil {
		c.zstd.Close()
	}
}

// placing is one reader's part in placing pages: its counts by kind, the buffer its decoded
// pages go through on their way to the Destination, and the pages of the last batch whose
// dedup reference did not check after the switch (not placed: to fetch again).
type placing struct {
	counts pages.Counters
	buf    []byte
	again  []PageRef
}

// spans hands b's pages to place as raw and zero spans, each with the kind it travelled as.
// Consecutive compressed (or delta) pages are decoded into pl.buf and handed over as one raw
// span, so that the Destination gets one call for them, as for a raw run; its data is valid
// only during the call. A page that does not decode is a protocol violation.
func (c *pageCodec) spans(b *wire.PageBatch, pl *placing, place func(sp wire.Span, k pages.Kind) error) error {
	r := int(b.Region)
	var run wire.Span // decoded pages not handed over yet; Count 0: none
	var runKind pages.Kind
	flush := func() error {
		if run.Count == 0 {
			return nil
		}
		run.Data = pl.buf[:run.Count*uint64(c.ps)]
		err := place(run, runKind)
		run.Count = 0
		return err
	}
	// slot returns the buffer for the next decoded page of kind k, at sp.First.
	slot := func(sp wire.Span, k pages.Kind) ([]byte, error) {
		if run.Count > 0 && (run.First+run.Count != sp.First || runKind != k) {
			if err := flush(); err != nil {
				return nil, err
			}
		}
		if run.Count == 0 {
			run, runKind = wire.Span{First: sp.First, Enc: wire.EncRaw}, k
		}
		off := int(run.Count) * c.ps
		if len(pl.buf) < off+c.ps {
			pl.buf = append(pl.buf[:off], make([]byte, c.ps)...)
		}
		run.Count++
		return pl.buf[off : off+c.ps], nil
	}
	for sp := range b.Spans {
		switch sp.Enc {
		case wire.EncRaw, wire.EncZero:
			if err := flush(); err != nil {
				return err
			}
			k := pages.Raw
			if sp.Enc == wire.EncZero {
				k = pages.Zero
			}
			if err := place(sp, k); err != nil {
				return err
			}
		case wire.EncCompressed:
			if c.zstd == nil { // the Reader refuses what was not negotiated
				return fmt.Errorf("%w: compressed page %d in region %d, and compression was not negotiated", ErrProtocol, sp.First, r)
			}
			page, err := slot(sp, pages.Compressed)
			if err != nil {
				return err
			}
			if err := c.zstd.Decode(page, pages.Ref{Region: r, Index: sp.First}, sp.Data); err != nil {
				return fmt.Errorf("%w: %v", ErrProtocol, err)
			}
		case wire.EncS2:
			if c.s2 == nil {
				return fmt.Errorf("%w: s2 page %d in region %d, and s2 was not negotiated", ErrProtocol, sp.First, r)
			}
			page, err := slot(sp, pages.S2)
			if err != nil {
				return err
			}
			if err := c.s2.Decode(page, pages.Ref{Region: r, Index: sp.First}, sp.Data); err != nil {
				return fmt.Errorf("%w: %v", ErrProtocol, err)
			}
		case wire.EncDelta:
			switch {
			case !c.delta || c.old == nil:
				return fmt.Errorf("%w: delta page %d in region %d, and delta was not negotiated", ErrProtocol, sp.First, r)
			case c.switched.Load():
				return fmt.Errorf("%w: delta page %d in region %d after the switch to post-copy", ErrProtocol, sp.First, r)
			}
			page, err := slot(sp, pages.Delta)
			if err != nil {
				return err
			}
			if err := c.old.ReadPages(r, sp.First, page); err != nil {
				return &vmmError{side: "destination", op: fmt.Sprintf("ReadPages(region %d, page %d) for a delta", r, sp.First), err: err}
			}
			if err := (delta.Decoder{}).Decode(page, pages.Ref{Region: r, Index: sp.First}, sp.Data); err != nil {
				return fmt.Errorf("%w: page %d in region %d: %v", ErrProtocol, sp.First, r, err)
			}
		case wire.EncDedup:
			if !c.dedup || c.old == nil {
				return fmt.Errorf("%w: dedup page %d in region %d, and dedup was not negotiated", ErrProtocol, sp.First, r)
			}
			ref, err := dedup.Parse(sp.Data)
			if err != nil {
				return fmt.Errorf("%w: page %d in region %d: %v", ErrProtocol, sp.First, r, err)
			}
			if ref.Region >= len(c.desc.Regions) || ref.Page >= c.desc.Pages(ref.Region) {
				return fmt.Errorf("%w: dedup page %d in region %d refers to page %d in region %d, which does not exist", ErrProtocol, sp.First, r, ref.Page, ref.Region)
			}
			if ref.Region == r && run.Count > 0 && ref.Page >= run.First && ref.Page < run.First+run.Count {
				// The page referred to is decoded but not placed yet: place it first.
				if err := flush(); err != nil {
					return err
				}
			}
			page, err := slot(sp, pages.Dedup)
			if err != nil {
				return err
			}
			if err := c.old.ReadPages(ref.Region, ref.Page, page); err != nil {
				return &vmmError{side: "destination", op: fmt.Sprintf("ReadPages(region %d, page %d) for a dedup reference", ref.Region, ref.Page), err: err}
			}
			if err := ref.Check(page); err != nil {
				if !c.switched.Load() {
					return fmt.Errorf("%w: dedup page %d in region %d refers to page %d in region %d, which holds other content", ErrProtocol, sp.First, r, ref.Page, ref.Region)
				}
				run.Count-- // give back the slot just taken: this page is not placed
				pl.again = append(pl.again, PageRef{r, sp.First})
			}
		default:
			return fmt.Errorf("%w: %s page %d in region %d has no decoder", ErrProtocol, sp.Enc, sp.First, r)
		}
	}
	return flush()
}
