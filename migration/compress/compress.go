// Package compress is the page compression: zstd (the wire's EncCompressed) and S2 (EncS2). Every
// page is one zstd frame (RFC 8878) or one S2 block of its own, without a dictionary or a
// checksum of its own (the frame that carries it has one). Pages then decode in any order, on
// any connection and after a reconnect, which pre-copy's streams and post-copy's push and
// demand service need; the cost is a header per page (about 6 bytes) and no history across
// pages.
//
// S2 (klauspost/compress/s2, an extension of Snappy's block format) compresses about four
// times faster than zstd's fastest level and decodes several times faster, to larger pages
// (guest text: a third of a page against a quarter): where the CPU, not the link, limits
// compression, it is the one that pays.
package compress

import (
	"fmt"
	"runtime"
	"slices"

	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"

	"github.com/godwit-vm/godwit/migration/pages"
)

// Levels are the zstd levels a migration may ask for, fastest first.
var Levels = []string{"fastest", "default", "better", "best"}

// DefaultLevel is the level of an unset one: the migration's encoder is on the critical path
// of every page, so the fastest.
const DefaultLevel = "fastest"

// Encoder compresses pages. It is safe for concurrent use (each page stream's worker calls it).
type Encoder struct {
	z     *zstd.Encoder // nil: S2
	level string
	most  int // largest encoded form worth sending, in bytes
}

// NewS2Encoder makes an S2 encoder for pages of pageSize bytes. As with zstd, a page is sent
// compressed only when that saves at least an eighth of it.
func NewS2Encoder(pageSize int) *Encoder {
	return &Encoder{most: pageSize - pageSize/8}
}

// NewEncoder makes an encoder for pages of pageSize bytes at level (one of Levels; "" is
// DefaultLevel). A page is sent compressed only when that saves at least an eighth of it:
// below that the destination's decoding costs more time than the bytes saved.
func NewEncoder(level string, pageSize int) (*Encoder, error) {
	if level == "" {
		level = DefaultLevel
	}
	ok, l := zstd.EncoderLevelFromString(level)
	if !ok {
		return nil, fmt.Errorf("compress: unknown zstd level %q (want one of %q)", level, Levels)
	}
	z, err := zstd.NewWriter(nil,
		zstd.WithEncoderLevel(l),
		zstd.WithEncoderConcurrency(runtime.GOMAXPROCS(0)),
		zstd.WithEncoderCRC(false),
		zstd.WithSingleSegment(true),
		zstd.WithWindowSize(windowFor(pageSize)),
	)
	if err != nil {
		return nil, fmt.Errorf("compress: zstd encoder at level %q: %w", level, err)
	}
	return &Encoder{z: z, level: level, most: pageSize - pageSize/8}, nil
}

// windowFor is the smallest window zstd allows that holds a page: a frame never refers back
// further than its own content.
func windowFor(pageSize int) int {
	w := zstd.MinWindowSize
	for w < pageSize {
		w <<= 1
	}
	return w
}

func (e *Encoder) Kind() pages.Kind {
	if e.z == nil {
		return pages.S2
	}
	return pages.Compressed
}

// Level is the zstd level the encoder compresses at ("" for S2).
func (e *Encoder) Level() string { return e.level }

// Encode appends page's frame (or S2 block) to dst, or declines when it would not save an
// eighth.
func (e *Encoder) Encode(dst []byte, _ pages.Ref, page []byte) ([]byte, bool) {
	var out []byte
	if e.z == nil {
		n := len(dst)
		dst = slices.Grow(dst, s2.MaxEncodedLen(len(page)))
		block := s2.Encode(dst[n:cap(dst)], page) // within dst's capacity: no copy
		out, dst = dst[:n+len(block)], dst[:n]
	} else {
		out = e.z.EncodeAll(page, dst)
	}
	if len(out)-len(dst) > e.most {
		return dst, false
	}
	return out, true
}

// Close releases the encoder's workers.
func (e *Encoder) Close() {
	if e.z != nil {
		e.z.Close()
	}
}

// Decoder decompresses pages. It is safe for concurrent use.
type Decoder struct {
	z        *zstd.Decoder
	pageSize int
}

// NewDecoder makes a decoder for pages of pageSize bytes. A frame may not decode to more than
// a page: the limit stops a hostile one before it allocates.
func NewDecoder(pageSize int) (*Decoder, error) {
	z, err := zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(runtime.GOMAXPROCS(0)),
		zstd.WithDecoderMaxMemory(uint64(pageSize)),
		zstd.WithDecoderMaxWindow(uint64(windowFor(pageSize))),
	)
	if err != nil {
		return nil, fmt.Errorf("compress: zstd decoder: %w", err)
	}
	return &Decoder{z: z, pageSize: pageSize}, nil
}

func (d *Decoder) Kind() pages.Kind { return pages.Compressed }

// Decode decompresses data into page, which must be one page long; data must decode to
// exactly a page.
func (d *Decoder) Decode(page []byte, ref pages.Ref, data []byte) error {
	if len(page) != d.pageSize {
		return fmt.Errorf("compress: page %d of region %d: a buffer of %d bytes for a page of %d", ref.Index, ref.Region, len(page), d.pageSize)
	}
	out, err := d.z.DecodeAll(data, page[:0:d.pageSize]) // past a page it must allocate: caught below
	if err != nil {
		return fmt.Errorf("compress: page %d of region %d: %d bytes of zstd: %w", ref.Index, ref.Region, len(data), err)
	}
	if len(out) != d.pageSize || &out[0] != &page[0] {
		return fmt.Errorf("compress: page %d of region %d: %d bytes of zstd decode to %d bytes, want %d", ref.Index, ref.Region, len(data), len(out), d.pageSize)
	}
	return nil
}

// Close releases the decoder's workers.
func (d *Decoder) Close() { d.z.Close() }

// S2Decoder decodes S2 pages. It keeps no state: it is safe for concurrent use.
type S2Decoder struct{ PageSize int }

func (d S2Decoder) Kind() pages.Kind { return pages.S2 }

// Decode decodes data, one S2 block that must decode to exactly one page, into page.
func (d S2Decoder) Decode(page []byte, ref pages.Ref, data []byte) error {
	if len(page) != d.PageSize {
		return fmt.Errorf("compress: page %d of region %d: a buffer of %d bytes for a page of %d", ref.Index, ref.Region, len(page), d.PageSize)
	}
	n, err := s2.DecodedLen(data)
	if err != nil || n != d.PageSize {
		return fmt.Errorf("compress: page %d of region %d: %d bytes of s2 announce %d bytes (%v), want %d", ref.Index, ref.Region, len(data), n, err, d.PageSize)
	}
	out, err := s2.Decode(page, data)
	if err != nil {
		return fmt.Errorf("compress: page %d of region %d: %d bytes of s2: %w", ref.Index, ref.Region, len(data), err)
	}
	if len(out) != d.PageSize || &out[0] != &page[0] {
		return fmt.Errorf("compress: page %d of region %d: %d bytes of s2 decode to %d bytes, want %d", ref.Index, ref.Region, len(data), len(out), d.PageSize)
	}
	return nil
}
