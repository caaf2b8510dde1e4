package wire

import (
	"encoding/binary"
	"fmt"
	"math"
	"math/bits"
	"unicode/utf8"
)

var le = binary.LittleEndian

// cursor reads a payload front to back. The first failure sticks; later reads return zeros, so
// decoders check c.err once at the end of each step instead of after every field.
type cursor struct {
	p   []byte
	off int
	t   Type
	err error
}

func (c *cursor) fail(k error, format string, args ...any) {
	if c.err == nil {
		c.err = &FrameError{Type: c.t, Kind: k, Detail: fmt.Sprintf(format, args...)}
	}
}

func (c *cursor) take(n int, what string) []byte {
	if c.err != nil {
		return nil
	}
	if n < 0 || len(c.p)-c.off < n {
		c.fail(ErrMalformed, "%s: need %d bytes at offset %d, payload has %d", what, n, c.off, len(c.p))
		return nil
	}
	b := c.p[c.off : c.off+n]
	c.off += n
	return b
}

func (c *cursor) u8(what string) uint8 {
	if b := c.take(1, what); b != nil {
		return b[0]
	}
	return 0
}

func (c *cursor) u16(what string) uint16 {
	if b := c.take(2, what); b != nil {
		return le.Uint16(b)
	}
	return 0
}

func (c *cursor) u32(what string) uint32 {
	if b := c.take(4, what); b != nil {
		return le.Uint32(b)
	}
	return 0
}

func (c *cursor) u64(what string) uint64 {
	if b := c.take(8, what); b != nil {
		return le.Uint64(b)
	}
	return 0
}

// name reads a u8-length string that must be non-empty UTF-8.
func (c *cursor) name(what string) string {
	n := int(c.u8(what + " length"))
	b := c.take(n, what)
	if c.err != nil {
		return ""
	}
	if n == 0 || !utf8.Valid(b) {
		c.fail(ErrMalformed, "%s: %q is empty or not UTF-8", what, b)
		return ""
	}
	return string(b)
}

// end fails unless the whole payload was consumed: trailing bytes mean the sides disagree about
// the layout, which must not pass silently.
func (c *cursor) end() error {
	if c.err == nil && c.off != len(c.p) {
		c.fail(ErrMalformed, "%d trailing bytes after offset %d", len(c.p)-c.off, c.off)
	}
	return c.err
}

func appendName(b []byte, s string) []byte {
	b = append(b, uint8(len(s)))
	return append(b, s...)
}

// Validate checks a description against the protocol's rules and caps. The source calls it
// before sending (so a VMM's mistake is reported at its origin), the destination's decoder
// after receiving.
func (d *Description) Validate() error {
	bad := func(format string, args ...any) error {
		return &FrameError{Type: TypeHello, Kind: ErrMalformed, Detail: fmt.Sprintf(format, args...)}
	}
	big := func(format string, args ...any) error {
		return &FrameError{Type: TypeHello, Kind: ErrTooLarge, Detail: fmt.Sprintf(format, args...)}
	}
	ps := d.PageSize
	if ps < MinPageSize || ps > MaxPageSize || ps&(ps-1) != 0 {
		return bad("page size %d is not a power of two in [%d, %d]", ps, MinPageSize, MaxPageSize)
	}
	if d.VCPUs < 1 || d.VCPUs > MaxVCPUs {
		return bad("vCPU count %d not in [1, %d]", d.VCPUs, MaxVCPUs)
	}
	if len(d.Regions) < 1 {
		return bad("no memory regions")
	}
	if len(d.Regions) > MaxRegions {
		return big("%d regions, at most %d", len(d.Regions), MaxRegions)
	}
	if len(d.Devices) > MaxDevices {
		return big("%d devices, at most %d", len(d.Devices), MaxDevices)
	}
	var total uint64
	names := make(map[string]bool, len(d.Regions))
	for i, r := range d.Regions {
		if r.Name == "" || len(r.Name) > MaxNameLen || !utf8.ValidString(r.Name) {
			return bad("region %d: name %q is empty, longer than %d bytes or not UTF-8", i, r.Name, MaxNameLen)
		}
		if names[r.Name] {
			return bad("region %d: duplicate name %q", i, r.Name)
		}
		names[r.Name] = true
		if r.Size == 0 || r.Size%ps != 0 || r.GPA%ps != 0 {
			return bad("region %d %q: gpa %#x size %#x not page-aligned or empty (page size %d)", i, r.Name, r.GPA, r.Size, ps)
		}
		if r.GPA+r.Size < r.GPA {
			return bad("region %d %q: gpa %#x + size %#x overflows", i, r.Name, r.GPA, r.Size)
		}
		if r.Size > MaxMemory || total+r.Size > MaxMemory {
			return big("region %d %q: memory exceeds %d bytes", i, r.Name, uint64(MaxMemory))
		}
		total += r.Size
		for j, o := range d.Regions[:i] {
			if r.GPA < o.GPA+o.Size && o.GPA < r.GPA+r.Size {
				return bad("region %d %q [%#x, %#x) overlaps region %d %q [%#x, %#x)", i, r.Name, r.GPA, r.GPA+r.Size, j, o.Name, o.GPA, o.GPA+o.Size)
			}
		}
	}
	ids := make(map[string]bool, len(d.Devices))
	for i, id := range d.Devices {
		if id == "" || len(id) > MaxNameLen || !utf8.ValidString(id) {
			return bad("device %d: id %q is empty, longer than %d bytes or not UTF-8", i, id, MaxNameLen)
		}
		if ids[id] {
			return bad("device %d: duplicate id %q", i, id)
		}
		ids[id] = true
	}
	return nil
}

// AppendHello appends a Hello payload.
func AppendHello(b []byte, h *Hello) []byte {
	d := &h.Desc
	b = le.AppendUint64(b, uint64(h.Caps))
	b = le.AppendUint32(b, uint32(d.PageSize))
	b = le.AppendUint32(b, uint32(d.VCPUs))
	b = le.AppendUint16(b, uint16(len(d.Regions)))
	b = le.AppendUint16(b, uint16(len(d.Devices)))
	for _, r := range d.Regions {
		b = appendName(b, r.Name)
		b = le.AppendUint64(b, r.GPA)
		b = le.AppendUint64(b, r.Size)
	}
	for _, id := range d.Devices {
		b = appendName(b, id)
	}
	if h.Caps&CapBase != 0 {
		b = append(b, d.Base[:]...)
	}
	return b
}

// DecodeHello decodes and validates a Hello payload.
func DecodeHello(p []byte) (*Hello, error) {
	c := &cursor{p: p, t: TypeHello}
	h := &Hello{Caps: Caps(c.u64("capabilities"))}
	d := &h.Desc
	d.PageSize = uint64(c.u32("page size"))
	d.VCPUs = int(c.u32("vCPU count"))
	nr := int(c.u16("region count"))
	nd := int(c.u16("device count"))
	if c.err != nil {
		return nil, c.err
	}
	if nr > MaxRegions {
		return nil, &FrameError{Type: TypeHello, Kind: ErrTooLarge, Detail: fmt.Sprintf("%d regions, at most %d", nr, MaxRegions)}
	}
	if nd > MaxDevices {
		return nil, &FrameError{Type: TypeHello, Kind: ErrTooLarge, Detail: fmt.Sprintf("%d devices, at most %d", nd, MaxDevices)}
	}
	// Each region takes at least 18 bytes and each device 2, so a short payload cannot make us
	// allocate much: bound the slices by what the payload could hold.
	if nr*18+nd*2 > len(p) {
		return nil, &FrameError{Type: TypeHello, Kind: ErrMalformed, Detail: fmt.Sprintf("%d regions and %d devices cannot fit in %d bytes", nr, nd, len(p))}
	}
	d.Regions = make([]Region, nr)
	for i := range d.Regions {
		r := &d.Regions[i]
		r.Name = c.name(fmt.Sprintf("region %d name", i))
		r.GPA = c.u64(fmt.Sprintf("region %d gpa", i))
		r.Size = c.u64(fmt.Sprintf("region %d size", i))
	}
	d.Devices = make([]string, nd)
	for i := range d.Devices {
		d.Devices[i] = c.name(fmt.Sprintf("device %d id", i))
	}
	if h.Caps&CapBase != 0 {
		copy(d.Base[:], c.take(len(d.Base), "base id"))
		if c.err == nil && d.Base == (BaseID{}) {
			c.fail(ErrMalformed, "base id is zero")
		}
	}
	if err := c.end(); err != nil {
		return nil, err
	}
	if err := d.Validate(); err != nil {
		return nil, err
	}
	return h, nil
}

// AppendWelcome appends a Welcome payload.
func AppendWelcome(b []byte, w *Welcome) []byte { return le.AppendUint64(b, uint64(w.Caps)) }

// DecodeWelcome decodes a Welcome payload. Whether the caps are a subset of those offered is
// checked by the Reader, which knows the offer.
func DecodeWelcome(p []byte) (*Welcome, error) {
	c := &cursor{p: p, t: TypeWelcome}
	w := &Welcome{Caps: Caps(c.u64("capabilities"))}
	return w, c.end()
}

// AppendRound appends a Round payload (the Final bit travels in the frame flags).
func AppendRound(b []byte, r *Round) []byte {
	b = le.AppendUint32(b, r.N)
	b = le.AppendUint32(b, 0)
	return le.AppendUint64(b, r.Pages)
}

// DecodeRound decodes a Round payload; final comes from the frame flags.
func DecodeRound(p []byte, final bool) (*Round, error) {
	c := &cursor{p: p, t: TypeRound}
	r := &Round{N: c.u32("round number"), Final: final}
	if res := c.u32("reserved"); res != 0 {
		c.fail(ErrMalformed, "reserved field is %#x, want 0", res)
	}
	r.Pages = c.u64("planned pages")
	if err := c.end(); err != nil {
		return nil, err
	}
	if r.N == 0 {
		return nil, &FrameError{Type: TypeRound, Kind: ErrMalformed, Detail: "round number 0"}
	}
	return r, nil
}

// RoundEnd and RoundAck share one layout: u32 round number, u32 reserved, u64 pages.
func appendRoundMark(b []byte, n uint32, pages uint64) []byte {
	b = le.AppendUint32(b, n)
	b = le.AppendUint32(b, 0)
	return le.AppendUint64(b, pages)
}

func decodeRoundMark(p []byte, t Type) (n uint32, pages uint64, err error) {
	c := &cursor{p: p, t: t}
	n = c.u32("round number")
	if res := c.u32("reserved"); res != 0 {
		c.fail(ErrMalformed, "reserved field is %#x, want 0", res)
	}
	pages = c.u64("page count")
	if err := c.end(); err != nil {
		return 0, 0, err
	}
	if n == 0 {
		return 0, 0, &FrameError{Type: t, Kind: ErrMalformed, Detail: "round number 0"}
	}
	return n, pages, nil
}

// AppendRoundEnd appends a RoundEnd payload.
func AppendRoundEnd(b []byte, m *RoundEnd) []byte { return appendRoundMark(b, m.N, m.Pages) }

// DecodeRoundEnd decodes a RoundEnd payload. Whether it closes the current round with the
// pages received is checked by the Reader, which knows the round.
func DecodeRoundEnd(p []byte) (*RoundEnd, error) {
	n, pages, err := decodeRoundMark(p, TypeRoundEnd)
	if err != nil {
		return nil, err
	}
	return &RoundEnd{N: n, Pages: pages}, nil
}

// AppendRoundAck appends a RoundAck payload.
func AppendRoundAck(b []byte, m *RoundAck) []byte { return appendRoundMark(b, m.N, m.Pages) }

// DecodeRoundAck decodes a RoundAck payload.
func DecodeRoundAck(p []byte) (*RoundAck, error) {
	n, pages, err := decodeRoundMark(p, TypeRoundAck)
	if err != nil {
		return nil, err
	}
	return &RoundAck{N: n, Pages: pages}, nil
}

// appendStateHead appends a State payload's header: id and version; the data follows.
func appendStateHead(b []byte, id string, version uint32) []byte {
	b = appendName(b, id)
	return le.AppendUint32(b, version)
}

// DecodeState decodes one State frame payload. data aliases p.
func DecodeState(p []byte) (id string, version uint32, data []byte, err error) {
	c := &cursor{p: p, t: TypeState}
	id = c.name("component id")
	version = c.u32("section version")
	if c.err != nil {
		return "", 0, nil, c.err
	}
	return id, version, p[c.off:], nil
}

// AppendComplete appends a Complete payload.
func AppendComplete(b []byte, m *Complete) []byte {
	b = le.AppendUint64(b, uint64(m.PauseUnixNano))
	b = le.AppendUint64(b, m.Pages)
	return le.AppendUint32(b, m.Sections)
}

// DecodeComplete decodes a Complete payload.
func DecodeComplete(p []byte) (*Complete, error) {
	c := &cursor{p: p, t: TypeComplete}
	m := &Complete{PauseUnixNano: int64(c.u64("pause time")), Pages: c.u64("page count"), Sections: c.u32("section count")}
	return m, c.end()
}

// AppendResumed appends a Resumed payload.
func AppendResumed(b []byte, m *Resumed) []byte {
	b = le.AppendUint64(b, uint64(m.ResumeUnixNano))
	b = le.AppendUint64(b, m.RestoreNanos)
	b = le.AppendUint64(b, m.StartNanos)
	return le.AppendUint64(b, m.ArmNanos)
}

// DecodeResumed decodes a Resumed payload.
func DecodeResumed(p []byte) (*Resumed, error) {
	c := &cursor{p: p, t: TypeResumed}
	m := &Resumed{ResumeUnixNano: int64(c.u64("resume time")), RestoreNanos: c.u64("restore time"), StartNanos: c.u64("start time"), ArmNanos: c.u64("post-copy arm time")}
	return m, c.end()
}

// AppendDone appends a Done payload.
func AppendDone(b []byte, m *Done) []byte { return le.AppendUint64(b, uint64(m.FirstProgressUnixNano)) }

// DecodeDone decodes a Done payload.
func DecodeDone(p []byte) (*Done, error) {
	c := &cursor{p: p, t: TypeDone}
	m := &Done{FirstProgressUnixNano: int64(c.u64("first progress time"))}
	return m, c.end()
}

// DecodeDoneAck decodes a DoneAck payload (empty).
func DecodeDoneAck(p []byte) (*DoneAck, error) {
	c := &cursor{p: p, t: TypeDoneAck}
	return &DoneAck{}, c.end()
}

// appendRuns appends run entries.
func appendRuns(b []byte, runs []Run) []byte {
	for _, r := range runs {
		b = le.AppendUint64(b, r.First)
		b = le.AppendUint32(b, r.Count)
	}
	return b
}

const runSize = 12

// decodeRuns decodes n runs into dst (reused) and checks them against the region: each run is
// non-empty, inside the region, and after the previous one. It returns the total page count.
func decodeRuns(c *cursor, dst []Run, n int, regionPages uint64, maxPages uint64) ([]Run, uint64) {
	raw := c.take(n*runSize, "runs")
	if c.err != nil {
		return dst[:0], 0
	}
	dst = dst[:0]
	var total, next uint64
	for i := 0; i < n; i++ {
		e := raw[i*runSize:]
		r := Run{First: le.Uint64(e), Count: le.Uint32(e[8:])}
		end := r.First + uint64(r.Count)
		switch {
		case r.Count == 0:
			c.fail(ErrMalformed, "run %d at page %d is empty", i, r.First)
		case end < r.First || end > regionPages:
			c.fail(ErrMalformed, "run %d [%d, +%d) exceeds the region's %d pages", i, r.First, r.Count, regionPages)
		case i > 0 && r.First < next:
			c.fail(ErrMalformed, "run %d [%d, +%d) starts before the end %d of run %d", i, r.First, r.Count, next, i-1)
		}
		total += uint64(r.Count)
		if c.err == nil && total > maxPages {
			c.fail(ErrTooLarge, "runs hold more than %d pages", maxPages)
		}
		if c.err != nil {
			return dst, 0
		}
		next = end
		dst = append(dst, r)
	}
	return dst, total
}

// AppendRequest appends a Request payload.
func AppendRequest(b []byte, q *Request) []byte {
	b = le.AppendUint32(b, q.Region)
	b = le.AppendUint32(b, uint32(len(q.Runs)))
	return appendRuns(b, q.Runs)
}

// DecodeRequest decodes a Request payload against the layout.
func DecodeRequest(p []byte, d *Description) (*Request, error) {
	c := &cursor{p: p, t: TypeRequest}
	q := &Request{Region: c.u32("region")}
	n := c.u32("run count")
	if c.err != nil {
		return nil, c.err
	}
	if int(q.Region) >= len(d.Regions) {
		return nil, &FrameError{Type: TypeRequest, Kind: ErrMalformed, Detail: fmt.Sprintf("region %d, the layout has %d", q.Region, len(d.Regions))}
	}
	if uint64(n)*runSize > uint64(len(p)) {
		return nil, &FrameError{Type: TypeRequest, Kind: ErrMalformed, Detail: fmt.Sprintf("%d runs cannot fit in %d bytes", n, len(p))}
	}
	q.Runs, _ = decodeRuns(c, make([]Run, 0, n), int(n), d.Pages(int(q.Region)), MaxBatchPages)
	return q, c.end()
}

// AppendError appends an Error payload; the message is cut to MaxErrorMessage bytes.
func AppendError(b []byte, code ErrCode, msg string) []byte {
	if len(msg) > MaxErrorMessage {
		msg = msg[:MaxErrorMessage]
	}
	b = le.AppendUint16(b, uint16(code))
	b = le.AppendUint16(b, uint16(len(msg)))
	return append(b, msg...)
}

// DecodeError decodes an Error payload.
func DecodeError(p []byte) (*PeerError, error) {
	c := &cursor{p: p, t: TypeError}
	e := &PeerError{Code: ErrCode(c.u16("code"))}
	n := int(c.u16("message length"))
	if c.err == nil && n > MaxErrorMessage {
		return nil, &FrameError{Type: TypeError, Kind: ErrTooLarge, Detail: fmt.Sprintf("message of %d bytes, at most %d", n, MaxErrorMessage)}
	}
	// Invalid UTF-8 is kept as is: the message is for humans, and %q quotes it when printed.
	e.Message = string(c.take(n, "message"))
	return e, c.end()
}

// switchHeadSize is the fixed part of a Switch payload: id, total, region, form, run count.
const switchHeadSize = 16 + 8 + 4 + 1 + 4

// Forms of a page set part.
const (
	setFormRuns   = 0
	setFormBitmap = 1
)

// bitmapForm reports whether the runs of s are shorter as a bitmap over the span they cover,
// and that span.
func bitmapForm(runs []Run) (first, span uint64, ok bool) {
	if len(runs) == 0 {
		return 0, 0, false
	}
	last := runs[len(runs)-1]
	first = runs[0].First
	span = last.First + uint64(last.Count) - first
	return first, span, 8+8+(span+7)/8 < 4+uint64(len(runs))*runSize
}

// appendPageSet appends a page set's part: u64 total, u32 region, u8 form, then the runs or
// the bitmap, whichever is shorter.
func appendPageSet(b []byte, s *PageSet) []byte {
	b = le.AppendUint64(b, s.Total)
	b = le.AppendUint32(b, s.Region)
	first, span, bitmap := bitmapForm(s.Runs)
	if !bitmap {
		b = append(b, setFormRuns)
		b = le.AppendUint32(b, uint32(len(s.Runs)))
		return appendRuns(b, s.Runs)
	}
	b = append(b, setFormBitmap)
	b = le.AppendUint64(b, first)
	b = le.AppendUint64(b, span)
	start := len(b)
	b = append(b, make([]byte, (span+7)/8)...)
	bits := b[start:]
	for _, r := range s.Runs {
		for p := r.First - first; p < r.First-first+uint64(r.Count); p++ {
			bits[p/8] |= 1 << (p % 8)
		}
	}
	return b
}

// decodeBitmapSet decodes the bitmap form of a page set part into runs, checking that it is
// inside the region, canonical (tight span, clear tail bits, and shorter than the runs form),
// and holds at most maxPages pages.
func decodeBitmapSet(c *cursor, regionPages, maxPages uint64) []Run {
	first, span := c.u64("bitmap first page"), c.u64("bitmap span")
	if c.err != nil {
		return nil
	}
	switch {
	case span == 0:
		c.fail(ErrMalformed, "empty bitmap (an empty set is sent as runs)")
	case first+span < first || first+span > regionPages:
		c.fail(ErrMalformed, "bitmap [%d, +%d) exceeds the region's %d pages", first, span, regionPages)
	case (span+7)/8 != uint64(len(c.p)-c.off):
		c.fail(ErrMalformed, "bitmap of %d pages in %d bytes", span, len(c.p)-c.off)
	}
	if c.err != nil {
		return nil
	}
	bits := c.take(int((span+7)/8), "bitmap")
	has := func(p uint64) bool { return bits[p/8]&(1<<(p%8)) != 0 }
	if !has(0) || !has(span-1) || (span%8 != 0 && bits[len(bits)-1]>>(span%8) != 0) {
		c.fail(ErrMalformed, "bitmap [%d, +%d) is not tight: its first and last bits must be set, and none past it", first, span)
		return nil
	}
	// Word by word, sized up front: this runs in the stop window, and a set of random pages
	// has a run per page. No more runs than the pages the set may hold.
	runs := make([]Run, 0, min(uint64(bitmapRunCount(bits)), maxPages))
	var total uint64
	ok := bitmapRuns(bits, span, func(p, n uint64) bool {
		for n > 0 {
			k := min(n, uint64(^uint32(0)))
			runs = append(runs, Run{First: first + p, Count: uint32(k)})
			p, n = p+k, n-k
			total += k
		}
		return total <= maxPages
	})
	if !ok {
		c.fail(ErrTooLarge, "bitmap holds more than %d pages", maxPages)
		return nil
	}
	if _, _, ok := bitmapForm(runs); !ok {
		c.fail(ErrMalformed, "a bitmap for %d runs over %d pages, which are shorter as runs", len(runs), span)
		return nil
	}
	return runs
}

// bitmapWord is the little-endian word of a wire bitmap at byte i, zero past its end.
func bitmapWord(b []byte, i int) uint64 {
	if i+8 <= len(b) {
		return le.Uint64(b[i:])
	}
	var w [8]byte
	copy(w[:], b[i:])
	return le.Uint64(w[:])
}

// bitmapRunCount is the number of maximal runs of set bits in a wire bitmap.
func bitmapRunCount(b []byte) int {
	c, carry := 0, uint64(0) // carry: the previous word's last bit
	for i := 0; i < len(b); i += 8 {
		w := bitmapWord(b, i)
		c += bits.OnesCount64(w &^ (w<<1 | carry))
		carry = w >> 63
	}
	return c
}

// bitmapRuns yields the maximal runs of set bits among the first span of a wire bitmap (bit p
// is bit p%8 of byte p/8), in order, until yield returns false; it reports whether it got to
// the end.
func bitmapRuns(b []byte, span uint64, yield func(first, count uint64) bool) bool {
	open, start := false, uint64(0)
	for base := uint64(0); base < span; base += 64 {
		w := bitmapWord(b, int(base/8))
		if base+64 > span {
			w &= 1<<(span-base) - 1
		}
		for pos := uint64(0); pos < 64; {
			if open {
				n := uint64(bits.TrailingZeros64(^(w >> pos))) // ones from pos
				if pos+n >= 64 {
					break // the run goes on in the next word
				}
				if !yield(start, base+pos+n-start) {
					return false
				}
				open, pos = false, pos+n
				continue
			}
			x := w >> pos
			if x == 0 {
				break
			}
			pos += uint64(bits.TrailingZeros64(x))
			open, start = true, base+pos
		}
	}
	if open {
		return yield(start, span-start)
	}
	return true
}

// decodePageSet decodes a page set's part and checks it against the layout: the region
// exists, the runs are inside it, ascending and not overlapping, and hold at most Total pages.
// Whether the frames of one set agree with each other is checked by the Reader.
func decodePageSet(c *cursor, d *Description) PageSet {
	s := PageSet{Total: c.u64("total pages"), Region: c.u32("region")}
	form := c.u8("set form")
	if c.err != nil {
		return s
	}
	switch {
	case s.Total > MaxSetPages:
		c.fail(ErrTooLarge, "a set of %d pages, at most %d", s.Total, uint64(MaxSetPages))
	case int(s.Region) >= len(d.Regions):
		c.fail(ErrMalformed, "region %d, the layout has %d", s.Region, len(d.Regions))
	case form != setFormRuns && form != setFormBitmap:
		c.fail(ErrMalformed, "set form %d (0 runs, 1 bitmap)", form)
	}
	if c.err != nil {
		return s
	}
	if form == setFormBitmap {
		s.Runs = decodeBitmapSet(c, d.Pages(int(s.Region)), s.Total)
		return s
	}
	n := c.u32("run count")
	if c.err == nil && uint64(n)*runSize > uint64(len(c.p)-c.off) {
		c.fail(ErrMalformed, "%d runs cannot fit in %d bytes", n, len(c.p)-c.off)
	}
	if c.err != nil {
		return s
	}
	s.Runs, _ = decodeRuns(c, make([]Run, 0, n), int(n), d.Pages(int(s.Region)), s.Total)
	if _, _, bitmap := bitmapForm(s.Runs); c.err == nil && bitmap {
		c.fail(ErrMalformed, "%d runs that are shorter as a bitmap", len(s.Runs))
	}
	return s
}

// Pages is the number of pages in this frame's runs.
func (s *PageSet) Pages() uint64 {
	var n uint64
	for _, r := range s.Runs {
		n += uint64(r.Count)
	}
	return n
}

// AppendSwitch appends a Switch payload.
func AppendSwitch(b []byte, m *Switch) []byte {
	b = append(b, m.ID[:]...)
	return appendPageSet(b, &m.PageSet)
}

// DecodeSwitch decodes a Switch payload against the layout.
func DecodeSwitch(p []byte, d *Description) (*Switch, error) {
	c := &cursor{p: p, t: TypeSwitch}
	m := &Switch{}
	copy(m.ID[:], c.take(len(m.ID), "migration id"))
	m.PageSet = decodePageSet(c, d)
	if err := c.end(); err != nil {
		return nil, err
	}
	return m, nil
}

// AppendAhead appends an Ahead payload.
func AppendAhead(b []byte, m *Ahead) []byte { return appendPageSet(b, &m.PageSet) }

// DecodeAhead decodes an Ahead payload against the layout.
func DecodeAhead(p []byte, d *Description) (*Ahead, error) {
	c := &cursor{p: p, t: TypeAhead}
	m := &Ahead{PageSet: decodePageSet(c, d)}
	if err := c.end(); err != nil {
		return nil, err
	}
	return m, nil
}

// AppendLacking appends a Lacking payload.
func AppendLacking(b []byte, m *Lacking) []byte { return appendPageSet(b, &m.PageSet) }

// DecodeLacking decodes a Lacking payload against the layout.
func DecodeLacking(p []byte, d *Description) (*Lacking, error) {
	c := &cursor{p: p, t: TypeLacking}
	m := &Lacking{PageSet: decodePageSet(c, d)}
	if err := c.end(); err != nil {
		return nil, err
	}
	return m, nil
}

// AppendPushEnd appends a PushEnd payload.
func AppendPushEnd(b []byte, m *PushEnd) []byte {
	b = le.AppendUint64(b, m.Pushed)
	return le.AppendUint64(b, m.Demanded)
}

// DecodePushEnd decodes a PushEnd payload.
func DecodePushEnd(p []byte) (*PushEnd, error) {
	c := &cursor{p: p, t: TypePushEnd}
	m := &PushEnd{Pushed: c.u64("pages pushed"), Demanded: c.u64("pages demanded")}
	if err := c.end(); err != nil {
		return nil, err
	}
	return m, nil
}

// DecodeKeepalive decodes a Keepalive payload (empty).
func DecodeKeepalive(p []byte) (*Keepalive, error) {
	c := &cursor{p: p, t: TypeKeepalive}
	if err := c.end(); err != nil {
		return nil, err
	}
	return &Keepalive{}, nil
}

// AppendFilled appends a Filled payload.
func AppendFilled(b []byte, m *Filled) []byte {
	b = le.AppendUint64(b, m.Pages)
	return le.AppendUint64(b, uint64(m.UnixNano))
}

// DecodeFilled decodes a Filled payload.
func DecodeFilled(p []byte) (*Filled, error) {
	c := &cursor{p: p, t: TypeFilled}
	m := &Filled{Pages: c.u64("pages placed"), UnixNano: int64(c.u64("time"))}
	if err := c.end(); err != nil {
		return nil, err
	}
	return m, nil
}

// AppendStats appends a Stats payload. It keeps at most MaxLatencySample latencies.
func AppendStats(b []byte, m *Stats) []byte {
	for _, v := range []uint64{m.DemandFaults, m.PagesRequested, m.PostcopyNanos, m.P50Nanos, m.P99Nanos, m.MaxNanos,
		math.Float64bits(m.ProgressDuring), math.Float64bits(m.ProgressAfter)} {
		b = le.AppendUint64(b, v)
	}
	b = le.AppendUint32(b, m.Reconnects)
	lat := m.Latencies[:min(len(m.Latencies), MaxLatencySample)]
	b = le.AppendUint32(b, uint32(len(lat)))
	for _, v := range lat {
		b = le.AppendUint64(b, v)
	}
	return b
}

// DecodeStats decodes a Stats payload.
func DecodeStats(p []byte) (*Stats, error) {
	c := &cursor{p: p, t: TypeStats}
	m := &Stats{
		DemandFaults: c.u64("demand faults"), PagesRequested: c.u64("pages requested"), PostcopyNanos: c.u64("post-copy time"),
		P50Nanos: c.u64("p50"), P99Nanos: c.u64("p99"), MaxNanos: c.u64("max"),
		ProgressDuring: math.Float64frombits(c.u64("progress during")), ProgressAfter: math.Float64frombits(c.u64("progress after")),
		Reconnects: c.u32("reconnects"),
	}
	n := c.u32("latency count")
	if c.err != nil {
		return nil, c.err
	}
	bad := func(k error, format string, args ...any) error {
		return &FrameError{Type: TypeStats, Kind: k, Detail: fmt.Sprintf(format, args...)}
	}
	if n > MaxLatencySample {
		return nil, bad(ErrTooLarge, "%d latencies, at most %d", n, MaxLatencySample)
	}
	for _, f := range []float64{m.ProgressDuring, m.ProgressAfter} {
		if math.IsNaN(f) || math.IsInf(f, 0) || f < 0 {
			return nil, bad(ErrMalformed, "progress rate %v", f)
		}
	}
	if m.P50Nanos > m.P99Nanos || m.P99Nanos > m.MaxNanos {
		return nil, bad(ErrMalformed, "latency p50 %d, p99 %d, max %d out of order", m.P50Nanos, m.P99Nanos, m.MaxNanos)
	}
	raw := c.take(8*int(n), "latencies")
	if c.err != nil {
		return nil, c.err
	}
	if n > 0 {
		m.Latencies = make([]uint64, n)
		for i := range m.Latencies {
			m.Latencies[i] = le.Uint64(raw[8*i:])
		}
	}
	if err := c.end(); err != nil {
		return nil, err
	}
	return m, nil
}

// AppendRejoin appends a Rejoin payload.
func AppendRejoin(b []byte, m *Rejoin) []byte {
	b = append(b, m.ID[:]...)
	return le.AppendUint32(b, m.Attempt)
}

// DecodeRejoin decodes a Rejoin payload.
func DecodeRejoin(p []byte) (*Rejoin, error) {
	c := &cursor{p: p, t: TypeRejoin}
	m := &Rejoin{}
	copy(m.ID[:], c.take(len(m.ID), "migration id"))
	m.Attempt = c.u32("attempt")
	if err := c.end(); err != nil {
		return nil, err
	}
	if m.Attempt == 0 {
		return nil, &FrameError{Type: TypeRejoin, Kind: ErrMalformed, Detail: "attempt 0"}
	}
	return m, nil
}

// AppendStreams appends a Streams payload.
func AppendStreams(b []byte, m *Streams) []byte {
	b = append(b, m.ID[:]...)
	return le.AppendUint16(b, m.Count)
}

// DecodeStreams decodes a Streams payload.
func DecodeStreams(p []byte) (*Streams, error) {
	c := &cursor{p: p, t: TypeStreams}
	m := &Streams{}
	copy(m.ID[:], c.take(len(m.ID), "migration id"))
	m.Count = c.u16("stream count")
	if err := c.end(); err != nil {
		return nil, err
	}
	if m.Count == 0 || m.Count >= MaxStreams {
		return nil, &FrameError{Type: TypeStreams, Kind: ErrMalformed, Detail: fmt.Sprintf("%d extra streams, want 1..%d", m.Count, MaxStreams-1)}
	}
	return m, nil
}

// AppendJoin appends a Join payload.
func AppendJoin(b []byte, m *Join) []byte {
	b = append(b, m.ID[:]...)
	return le.AppendUint16(b, m.Index)
}

// DecodeJoin decodes a Join payload.
func DecodeJoin(p []byte) (*Join, error) {
	c := &cursor{p: p, t: TypeJoin}
	m := &Join{}
	copy(m.ID[:], c.take(len(m.ID), "migration id"))
	m.Index = c.u16("stream index")
	if err := c.end(); err != nil {
		return nil, err
	}
	if m.Index == 0 || m.Index >= MaxStreams {
		return nil, &FrameError{Type: TypeJoin, Kind: ErrMalformed, Detail: fmt.Sprintf("stream index %d, want 1..%d", m.Index, MaxStreams-1)}
	}
	return m, nil
}

// AppendMemory appends a Memory payload.
func AppendMemory(b []byte, m *Memory) []byte {
	b = le.AppendUint16(b, uint16(len(m.Sizes)))
	for _, n := range m.Sizes {
		b = le.AppendUint64(b, n)
	}
	return append(b, m.ID[:]...)
}

// DecodeMemory decodes a Memory payload. That the sizes are the Hello's is the Reader's check.
func DecodeMemory(p []byte) (*Memory, error) {
	c := &cursor{p: p, t: TypeMemory}
	n := int(c.u16("region count"))
	if c.err != nil {
		return nil, c.err
	}
	if n == 0 || n > MaxRegions {
		return nil, &FrameError{Type: TypeMemory, Kind: ErrMalformed, Detail: fmt.Sprintf("%d regions, want 1..%d", n, MaxRegions)}
	}
	if len(p) != 2+8*n+16 {
		return nil, &FrameError{Type: TypeMemory, Kind: ErrMalformed, Detail: fmt.Sprintf("%d bytes for %d regions, want %d", len(p), n, 2+8*n+16)}
	}
	m := &Memory{Sizes: make([]uint64, n)}
	for i := range m.Sizes {
		m.Sizes[i] = c.u64("region size")
	}
	copy(m.ID[:], c.take(16, "memory id"))
	if err := c.end(); err != nil {
		return nil, err
	}
	return m, nil
}

// DecodeMemoryAck decodes a MemoryAck payload (empty).
func DecodeMemoryAck(p []byte) (*MemoryAck, error) {
	c := &cursor{p: p, t: TypeMemoryAck}
	if err := c.end(); err != nil {
		return nil, err
	}
	return &MemoryAck{}, nil
}
