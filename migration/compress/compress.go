// Package compress is the zstd page encoding (the wire's EncCompressed): every page is one zstd
// frame (RFC 8878) of its own, without a dictionary or a checksum of its own (the frame that
// carries it has one). Pages then decode in any order, on any connection and after a
// reconnect, which pre-copy's streams and post-copy's push and demand service need; the cost is
// a frame header per page (about 6 bytes) and no history across pages.
package compress

import (
	"fmt"
	"runtime"

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
	z     *zstd.Encoder
	level string
	most  int // largest encoded form worth sending, in bytes
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

func (e *Encoder) Kind() pages.Kind { return pages.Compressed }

// Level is the zstd level the encoder compresses at.
func (e *Encoder) Level() string { return e.level }

// Encode appends page's frame to dst, or declines when it would not save an eighth.
func (e *Encoder) Encode(dst []byte, _ pages.Ref, page []byte) ([]byte, bool) {
	out := e.z.EncodeAll(page, dst)
	if len(out)-len(dst) > e.most {
		return dst, false
	}
	return out, true
}

// Close releases the encoder's workers.
func (e *Encoder) Close() { e.z.Close() }

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
