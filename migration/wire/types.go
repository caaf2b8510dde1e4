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
	MaxStreams      = 64        // connections of one migration carrying pages (CapStreams)
	MaxErrorMessage = 4096      // bytes of an Error frame's message
	// DedupSize is the data of an EncDedup page: u32 region, u64 page of the page sent
	// before, and the first 16 bytes of the SHA-256 of the content it stands for.
	DedupSize = 28
	// MaxSetRuns is how many runs one Switch or Lacking frame holds at most.
	MaxSetRuns = (MaxFramePayload - switchHeadSize) / runSize
	// MaxSetPages bounds a page set's total: every page of the largest memory.
	MaxSetPages = MaxMemory / MinPageSize
	// MaxLatencySample bounds the fault latencies a Stats frame carries.
	MaxLatencySample = 1000
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
	TypeStreams   Type = 0x14
	TypeJoin      Type = 0x15
	TypeMemory    Type = 0x16
	TypeMemoryAck Type = 0x17
	TypeState     Type = 0x20
	TypeComplete  Type = 0x30
	TypeResumed   Type = 0x31
	TypeDone      Type = 0x32
	TypeDoneAck   Type = 0x33
	TypeRequest   Type = 0x40
	TypeSwitch    Type = 0x41
	TypePushEnd   Type = 0x42
	TypeKeepalive Type = 0x43
	TypeFilled    Type = 0x44
	TypeStats     Type = 0x45
	TypeRejoin    Type = 0x46
	TypeLacking   Type = 0x47
	TypeAhead     Type = 0x48
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
	case TypeStreams:
		return "streams"
	case TypeJoin:
		return "join"
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
	case TypeSwitch:
		return "switch"
	case TypePushEnd:
		return "push end"
	case TypeKeepalive:
		return "keepalive"
	case TypeFilled:
		return "filled"
	case TypeStats:
		return "post-copy stats"
	case TypeRejoin:
		return "rejoin"
	case TypeLacking:
		return "lacking"
	case TypeAhead:
		return "ahead"
	case TypeMemory:
		return "memory"
	case TypeMemoryAck:
		return "memory ack"
	case TypeError:
		return "error"
	}
	return fmt.Sprintf("type 0x%02x", uint8(t))
}

func (t Type) known() bool {
	switch t {
	case TypeHello, TypeWelcome, TypeRound, TypePageBatch, TypeRoundEnd, TypeRoundAck, TypeStreams, TypeJoin, TypeState,
		TypeComplete, TypeResumed, TypeDone, TypeDoneAck, TypeRequest, TypeSwitch, TypePushEnd,
		TypeKeepalive, TypeFilled, TypeStats, TypeRejoin, TypeLacking, TypeAhead, TypeMemory, TypeMemoryAck, TypeError:
		return true
	}
	return false
}

// Frame flags. Each is legal only on the types named.
const (
	FlagFinal uint8 = 1 << 0 // Round: the stop-and-copy round (the source is paused)
	FlagMore  uint8 = 1 << 0 // State, Switch, Lacking, Ahead: the section or page set continues in the next frame
	FlagAgain uint8 = 1 << 0 // Request: pages sent already whose dedup reference failed; send them again (CapDedup)
)

// allowedFlags is the set of flag bits each type may carry.
func allowedFlags(t Type) uint8 {
	switch t {
	case TypeRound:
		return FlagFinal
	case TypeState, TypeSwitch, TypeLacking, TypeAhead:
		return FlagMore
	case TypeRequest:
		return FlagAgain
	}
	return 0
}

// Caps is a set of optional protocol features. The source offers, the destination accepts a
// subset. Bits this version does not know are never accepted, so old destinations and new
// sources agree on the intersection.
type Caps uint64

const (
	CapBlackout   Caps = 1 << 0  // the destination waits for the guest's first heartbeat and reports it in Done
	CapCompressed Caps = 1 << 1  // EncCompressed pages: each a zstd frame of one page
	CapDedup      Caps = 1 << 2  // EncDedup pages: a reference to a page sent before with the same content
	CapDelta      Caps = 1 << 3  // EncDelta pages: a page's change to the copy sent before (package delta)
	CapPostcopy   Caps = 1 << 4  // post-copy: Switch, PushEnd, Keepalive, Request, Filled, Stats, Rejoin, Lacking
	CapStreams    Caps = 1 << 5  // pre-copy pages on extra connections: Streams, Join
	CapAhead      Caps = 1 << 6  // pure post-copy: most of the missing set ahead of the pause, in Ahead (needs CapPostcopy)
	CapS2         Caps = 1 << 7  // EncS2 pages: each an S2 block of one page
	CapHandover   Caps = 1 << 8  // memory handed over as files on one host: Memory, MemoryAck; no pages
	CapShared     Caps = 1 << 9  // memory both hosts map from shared memory, named by Memory's id: Memory, MemoryAck; no pages
	CapBase       Caps = 1 << 10 // the VM's memory is a base (a template, named in Hello) and its changes: pages not sent are the base's

	// KnownCaps is every capability this version can accept.
	KnownCaps = CapBlackout | CapCompressed | CapDedup | CapDelta | CapPostcopy | CapStreams | CapAhead | CapS2 | CapHandover | CapShared | CapBase

	// memoryCaps are the capabilities under which memory does not travel as pages.
	memoryCaps = CapHandover | CapShared
)

// Encoding is how one page travels in a PageBatch.
type Encoding uint8

const (
	EncZero       Encoding = 0 // the page is all zero; no data
	EncRaw        Encoding = 1 // page size bytes of data
	EncCompressed Encoding = 2 // a zstd frame that decodes to the page (needs CapCompressed)
	EncDedup      Encoding = 3 // a reference to a page with the same content (needs CapDedup)
	EncDelta      Encoding = 4 // variable-length delta to the copy sent before, in a pre-copy round (needs CapDelta)
	EncS2         Encoding = 5 // an S2 block (Snappy's format, extended) that decodes to the page (needs CapS2)
	numEncodings           = 6
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
	case EncS2:
		return "s2"
	}
	return fmt.Sprintf("encoding %d", uint8(e))
}

// variable reports whether the encoding's data length is given in the batch's lens table.
func (e Encoding) variable() bool { return e == EncCompressed || e == EncDelta || e == EncS2 }

// needs is the capability an encoding requires (0 for the baseline ones).
func (e Encoding) needs() Caps {
	switch e {
	case EncCompressed:
		return CapCompressed
	case EncDedup:
		return CapDedup
	case EncDelta:
		return CapDelta
	case EncS2:
		return CapS2
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
	// Base names the memory the VM was cloned from (a template's content hash), under
	// CapBase: the destination starts from the same and receives only pages that differ.
	Base BaseID
}

// BaseID is a template's content hash (SHA-256 of its memory and state).
type BaseID [32]byte

// Pages is the number of pages in region r.
func (d *Description) Pages(r int) uint64 { return d.Regions[r].Size / d.PageSize }

// Msg is a decoded frame: one of *Hello, *Welcome, *Round, *PageBatch, *RoundEnd, *RoundAck,
// *Section, *Complete, *Resumed, *Done, *DoneAck, *Request, *Switch, *PushEnd, *Keepalive,
// *Filled, *Stats, *Rejoin, *Lacking. Error frames are returned as a *PeerError error instead.
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
	ArmNanos       uint64 // post-copy: time spent making the missing pages demand-paged
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
	// Again (flag FlagAgain; not in the payload) asks for pages the source sent already, as
	// dedup references the destination could not resolve: its guest had changed the page
	// named. The source sends them again, whole.
	Again bool
}

// MigrationID names one migration: chosen at random by the source, carried by its Switch
// frames and presented again by its Rejoin frame on every new connection (post-copy), and by
// the Streams frame and each extra connection's Join (CapStreams).
type MigrationID [16]byte

func (id MigrationID) String() string { return fmt.Sprintf("%x", id[:]) }

// ParseMigrationID parses the 32 hexadecimal digits that String returns.
func ParseMigrationID(s string) (MigrationID, error) {
	var id MigrationID
	if len(s) != 2*len(id) {
		return id, fmt.Errorf("wire: migration id %q: want %d hexadecimal digits", s, 2*len(id))
	}
	for i := range id {
		var b byte
		for _, c := range []byte(s[2*i : 2*i+2]) {
			switch {
			case c >= '0' && c <= '9':
				c -= '0'
			case c >= 'a' && c <= 'f':
				c -= 'a' - 10
			case c >= 'A' && c <= 'F':
				c -= 'A' - 10
			default:
				return MigrationID{}, fmt.Errorf("wire: migration id %q: %q is not a hexadecimal digit", s, c)
			}
			b = b<<4 | c
		}
		id[i] = b
	}
	return id, nil
}

// PageSet is one frame's part of a set of pages (the pages the destination must demand-page,
// or still lacks): runs of one region. A set larger than a frame continues in further frames
// (flag FlagMore), in ascending region and page order; Total is the size of the whole set and
// the same in each of its frames.
type PageSet struct {
	Total  uint64 // pages in the whole set, over all its frames
	Region uint32
	Runs   []Run // ascending, not overlapping, inside the region; may be empty
}

// Switch carries the source's switch to post-copy: the set of pages the destination does not
// have (never sent, or dirtied since last sent). The destination demand-pages them.
type Switch struct {
	ID MigrationID // the same in every frame of the set
	PageSet
	More bool // the frame had FlagMore: the set continues (set by the Reader; not in the payload)
}

// PushEnd tells the destination that the source has sent every page it lacked: it must have
// them all once it has placed the batches before it.
type PushEnd struct {
	Pushed   uint64 // pages sent by the background push since the switch (all connections)
	Demanded uint64 // pages sent because the destination requested them
}

// Keepalive proves the link alive during post-copy; both sides send one whenever they have
// written nothing for a while.
type Keepalive struct{}

// Filled tells the source that the destination has every page: the source may release its memory.
type Filled struct {
	Pages    uint64 // pages placed since the switch
	UnixNano int64  // when the last page was placed (destination wall clock)
}

// Stats is the destination's account of the post-copy phase, sent before Done.
type Stats struct {
	DemandFaults   uint64
	PagesRequested uint64
	PostcopyNanos  uint64 // start -> every page present
	P50Nanos       uint64 // fault service latency
	P99Nanos       uint64
	MaxNanos       uint64
	ProgressDuring float64 // guest progress rate (units/s) from start until every page was present
	ProgressAfter  float64 // in the window after that
	Reconnects     uint32
	Latencies      []uint64 // a sample of at most MaxLatencySample fault latencies, in ns
}

// Rejoin opens a new connection for a post-copy migration whose link broke: it replaces Hello.
type Rejoin struct {
	ID      MigrationID
	Attempt uint32 // 1 for the first reconnection, +1 for each
}

// Streams announces the extra page connections of a pre-copy migration (CapStreams): Count
// connections will open with Join, naming ID, and carry page batches beside this one.
type Streams struct {
	ID    MigrationID
	Count uint16 // extra connections: 1..MaxStreams-1
}

// Memory hands guest memory over without its pages: under CapHandover as one file per region,
// passed beside the frame's bytes (SCM_RIGHTS on a Unix socket; the files are not part of the
// message: the connection delivers them, see Writer.WriteMemory); under CapShared as the id of
// the memory file both hosts map.
type Memory struct {
	Sizes []uint64 // bytes of each region's memory, in region order; equal to the Hello's sizes
	ID    [16]byte // CapShared: the memory file's id; zero under CapHandover
}

// MemoryAck says that the destination has mapped the memory handed over: the source may pause.
type MemoryAck struct{}

// Join is the first frame of an extra page connection, instead of Hello.
type Join struct {
	ID    MigrationID // the Streams frame's
	Index uint16      // 1..Count; the main connection is 0
}

// Ahead is the part of a pure post-copy's missing set that the source knows before it pauses
// the guest (CapAhead): the pages that held data when it looked. The Switch that follows adds
// the pages written since; the destination lacks both.
type Ahead struct {
	PageSet
	More bool // the frame had FlagMore: the set continues (set by the Reader; not in the payload)
}

// Lacking answers Rejoin: the pages the destination still does not have.
type Lacking struct {
	PageSet
	More bool // the frame had FlagMore: the set continues (set by the Reader; not in the payload)
}

func (*Ahead) Type() Type     { return TypeAhead }
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
func (*Switch) Type() Type    { return TypeSwitch }
func (*PushEnd) Type() Type   { return TypePushEnd }
func (*Keepalive) Type() Type { return TypeKeepalive }
func (*Filled) Type() Type    { return TypeFilled }
func (*Stats) Type() Type     { return TypeStats }
func (*Rejoin) Type() Type    { return TypeRejoin }
func (*Lacking) Type() Type   { return TypeLacking }
func (*Streams) Type() Type   { return TypeStreams }
func (*Join) Type() Type      { return TypeJoin }
func (*Memory) Type() Type    { return TypeMemory }
func (*MemoryAck) Type() Type { return TypeMemoryAck }
