package wire

import "fmt"

// Protocol versions spoken by this package (see the package comment for the changelog).
const (
	Version    uint32 = 1
	MinVersion uint32 = 1
)

// Magic opens every stream in both directions.
const Magic = "GODWITMG"

// Fixed sizes.
const (
	PreambleSize = 16
	HeaderSize   = 16
)

// Caps on every length and count a peer controls. A decoder checks them before allocating.
const (
	MaxFramePayload = 16 << 20  // bytes in one frame's payload
	MaxBatchPages   = 1 << 16   // pages in one PageBatch (zero pages cost one byte each)
	MaxRegions      = 256       // memory regions in a Hello
	MaxDevices      = 4096      // device ids in a Hello
	MaxVCPUs        = 4096      // vCPUs in a Hello
	MaxNameLen      = 255       // region names and component ids
	MinPageSize     = 512       // smallest page size
	MaxPageSize     = 2 << 20   // largest page size; a batch always fits at least one page
	MaxMemory       = 1 << 46   // bytes of guest memory in all regions together (64 TiB)
	MaxSectionSize  = 256 << 20 // bytes in one reassembled state section
	MaxSections     = 1 << 16   // state sections in one migration
	MaxErrorMessage = 4096      // bytes of an Error frame's message
	HashSize        = 16        // bytes of a dedup reference (128-bit page hash)
)

// Type is a frame type.
type Type uint8

const (
	TypeHello     Type = 0x01
	TypeWelcome   Type = 0x02
	TypeRound     Type = 0x10
	TypePageBatch Type = 0x11
	TypeRoundEnd  Type = 0x12
	TypeRoundAck  Type = 0x13
	TypeState     Type = 0x20
	TypeComplete  Type = 0x30
	TypeResumed   Type = 0x31
	TypeDone      Type = 0x32
	TypeDoneAck   Type = 0x33
	TypeRequest   Type = 0x40
	TypeError     Type = 0x7f
)

func (t Type) String() string {
	switch t {
	case TypeHello:
		return "hello"
	case TypeWelcome:
		return "welcome"
	case TypeRound:
		return "round"
	case TypePageBatch:
		return "page batch"
	case TypeRoundEnd:
		return "round end"
	case TypeRoundAck:
		return "round ack"
	case TypeState:
		return "state"
	case TypeComplete:
		return "complete"
	case TypeResumed:
		return "resumed"
	case TypeDone:
		return "done"
	case TypeDoneAck:
		return "done ack"
	case TypeRequest:
		return "request"
	case TypeError:
		return "error"
	}
	return fmt.Sprintf("type 0x%02x", uint8(t))
}

func (t Type) known() bool {
	switch t {
	case TypeHello, TypeWelcome, TypeRound, TypePageBatch, TypeRoundEnd, TypeRoundAck, TypeState,
		TypeComplete, TypeResumed, TypeDone, TypeDoneAck, TypeRequest, TypeError:
		return true
	}
	return false
}

// Frame flags. Each is legal only on the types named.
const (
	FlagFinal uint8 = 1 << 0 // Round: the stop-and-copy round (the source is paused)
	FlagMore  uint8 = 1 << 0 // State: the section continues in the next frame
)

// allowedFlags is the set of flag bits each type may carry.
func allowedFlags(t Type) uint8 {
	switch t {
	case TypeRound:
		return FlagFinal
	case TypeState:
		return FlagMore
	}
	return 0
}

// Caps is a set of optional protocol features. The source offers, the destination accepts a
// subset. Bits this version does not know are never accepted, so old destinations and new
// sources agree on the intersection.
type Caps uint64

const (
	CapBlackout   Caps = 1 << 0 // the destination waits for the guest's first heartbeat and reports it in Done
	CapCompressed Caps = 1 << 1 // EncCompressed pages (reserved: algorithm to be fixed with its version)
	CapDedup      Caps = 1 << 2 // EncDedup pages (reserved)
	CapDelta      Caps = 1 << 3 // EncDelta pages (reserved)
	CapPostcopy   Caps = 1 << 4 // Request frames (reserved)

	// KnownCaps is every capability this version can accept.
	KnownCaps = CapBlackout | CapCompressed | CapDedup | CapDelta | CapPostcopy
)

// Encoding is how one page travels in a PageBatch.
type Encoding uint8

const (
	EncZero       Encoding = 0 // the page is all zero; no data
	EncRaw        Encoding = 1 // page size bytes of data
	EncCompressed Encoding = 2 // reserved: variable-length compressed data (needs CapCompressed)
	EncDedup      Encoding = 3 // reserved: 16-byte hash of a page sent before (needs CapDedup)
	EncDelta      Encoding = 4 // reserved: variable-length delta to the last sent version (needs CapDelta)
	numEncodings           = 5
)

func (e Encoding) String() string {
	switch e {
	case EncZero:
		return "zero"
	case EncRaw:
		return "raw"
	case EncCompressed:
		return "compressed"
	case EncDedup:
		return "dedup"
	case EncDelta:
		return "delta"
	}
	return fmt.Sprintf("encoding %d", uint8(e))
}

// variable reports whether the encoding's data length is given in the batch's lens table.
func (e Encoding) variable() bool { return e == EncCompressed || e == EncDelta }

// needs is the capability an encoding requires (0 for the baseline ones).
func (e Encoding) needs() Caps {
	switch e {
	case EncCompressed:
		return CapCompressed
	case EncDedup:
		return CapDedup
	case EncDelta:
		return CapDelta
	}
	return 0
}

// Region is one range of guest physical memory.
type Region struct {
	Name string
	GPA  uint64
	Size uint64 // a multiple of the page size
}

// Description is the VM as the Hello frame carries it.
type Description struct {
	PageSize uint64
	Regions  []Region
	VCPUs    int
	Devices  []string // component ids of the state sections
}

// Pages is the number of pages in region r.
func (d *Description) Pages(r int) uint64 { return d.Regions[r].Size / d.PageSize }

// Msg is a decoded frame: one of *Hello, *Welcome, *Round, *PageBatch, *RoundEnd, *RoundAck,
// *Section, *Complete, *Resumed, *Done, *DoneAck, *Request. Error frames are returned as a *PeerError error instead.
type Msg interface{ Type() Type }

// Hello is the source's first frame.
type Hello struct {
	Caps Caps
	Desc Description
}

// Welcome is the destination's first frame.
type Welcome struct {
	Caps Caps // accepted capabilities
}

// Round opens a round of page batches.
type Round struct {
	N     uint32 // 1, 2, ...
	Final bool   // the stop-and-copy round: the source is paused
	Pages uint64 // pages the source plans to send in this round (informational)
}

// RoundEnd closes a live round: all its page batches have been sent. The stop-and-copy round
// has none; Complete closes it.
type RoundEnd struct {
	N     uint32 // the round being closed
	Pages uint64 // pages in the round's batches
}

// RoundAck answers RoundEnd once every page of the round has been placed in the destination
// VM. Until it arrives, the round's tail may still sit in socket buffers or in the
// destination's pipeline, so the source does not pause before it has the acknowledgement of
// the last live round.
type RoundAck struct {
	N     uint32 // the round acknowledged
	Pages uint64 // pages placed in it
}

// Section is one component's saved state.
type Section struct {
	ID      string
	Version uint32
	Data    []byte
}

// Complete ends the source's stream of memory and state.
type Complete struct {
	PauseUnixNano int64  // source wall clock when its vCPUs stopped
	Pages         uint64 // pages in all batches of all rounds
	Sections      uint32 // state sections sent
}

// Resumed acknowledges Complete: the destination runs.
type Resumed struct {
	ResumeUnixNano int64  // destination wall clock when its vCPUs started
	RestoreNanos   uint64 // time spent restoring state
	StartNanos     uint64 // time spent starting vCPUs
}

// Done is the destination's last frame.
type Done struct {
	FirstProgressUnixNano int64 // first guest heartbeat after start; 0 = not measured
}

// DoneAck acknowledges Done.
type DoneAck struct{}

// Run is a range of consecutive pages.
type Run struct {
	First uint64
	Count uint32
}

// Request asks the source for pages (post-copy).
type Request struct {
	Region uint32
	Runs   []Run
}

func (*Hello) Type() Type     { return TypeHello }
func (*Welcome) Type() Type   { return TypeWelcome }
func (*Round) Type() Type     { return TypeRound }
func (*PageBatch) Type() Type { return TypePageBatch }
func (*RoundEnd) Type() Type  { return TypeRoundEnd }
func (*RoundAck) Type() Type  { return TypeRoundAck }
func (*Section) Type() Type   { return TypeState }
func (*Complete) Type() Type  { return TypeComplete }
func (*Resumed) Type() Type   { return TypeResumed }
func (*Done) Type() Type      { return TypeDone }
func (*DoneAck) Type() Type   { return TypeDoneAck }
func (*Request) Type() Type   { return TypeRequest }
