// Package wire is godwit's migration stream format: a fixed preamble, then CRC-protected frames
// in a legal order. It encodes and decodes; it makes no migration decisions. The decoder trusts
// nothing: every length is capped, every frame is checksummed, and a small receiver state machine
// rejects frames that arrive out of order.
//
// # Versions
//
// The protocol version is one integer, raised whenever a byte below changes meaning.
//
//	1  2026-11-22  first version: preamble, handshake (Hello/Welcome), rounds of page batches
//	               (zero and raw encodings; compressed, dedup and delta codes reserved), live
//	               rounds closed by RoundEnd and acknowledged by RoundAck, chunked state
//	               sections, Complete/Resumed, Done/DoneAck, Request (post-copy, reserved), Error.
//
// The source sends its preamble first; the destination reads it and answers with its own, also
// when the versions do not match (so both sides can report the mismatch). The preamble layout
// never changes, so
// any two versions can at least tell each other apart. The version spoken is
// min(local Version, peer version); it must be at least max(local MinVersion, peer min version),
// otherwise both sides fail with [ErrVersion] before anything else is sent. Today Version and
// MinVersion are both 1. When version 2 is introduced, MinVersion stays 1 for a while: the
// [Reader] and [Writer] carry the negotiated version and branch on it where the layouts differ,
// so a v2 binary still accepts a v1 peer (and a v1 peer refuses v2-only binaries with a clear
// error), and only the version after that drops v1.
//
// # Preamble (16 bytes, both directions)
//
//	off size
//	0   8    magic "GODWITMG"
//	8   4    highest version spoken, little endian (all integers here are little endian)
//	12  4    lowest version spoken
//
// # Frame header (16 bytes)
//
//	off size
//	0   1    type (see Type*)
//	1   1    flags (meaning per type; unknown bits are rejected)
//	2   2    reserved, zero
//	4   4    payload length, at most MaxFramePayload
//	8   4    sequence number: 1 for the first frame after the preamble, +1 per frame
//	12  4    CRC32C (Castagnoli) of header bytes 0..11 followed by the payload
//
// # Payloads
//
// Strings are a length (u8 unless noted) followed by that many bytes. Counts are checked against
// the caps in this package before anything is allocated.
//
//	Hello (source -> destination, 0x01, first frame)
//	  u64 capabilities offered (Cap*)
//	  u32 page size (power of two, MinPageSize..MaxPageSize)
//	  u32 vCPU count (1..MaxVCPUs)
//	  u16 region count (1..MaxRegions), u16 device count (0..MaxDevices)
//	  regions: name, u64 guest physical address, u64 size (a multiple of the page size;
//	           regions do not overlap)
//	  devices: component id (one per state section the source will send)
//
//	Welcome (destination -> source, 0x02, first frame)
//	  u64 capabilities accepted: a subset of those offered
//
//	Round (source -> destination, 0x10), flag FlagFinal on the stop-and-copy round
//	  u32 round number (1, 2, ...), u32 reserved, u64 pages planned for the round
//
//	PageBatch (source -> destination, 0x11, only inside a round)
//	  u32 region index, u32 run count, u32 page count, u32 variable-length page count
//	  runs:   run count x (u64 first page, u32 page count)   ascending, not overlapping,
//	          inside the region; the pages of the batch are the runs' pages in order
//	  encs:   page count x u8 encoding (Enc*)
//	  lens:   variable-length page count x u32: the data length of each compressed or delta
//	          page, in page order
//	  data:   the pages' data in page order: zero -> nothing, raw -> page size bytes,
//	          dedup -> 16-byte hash of a page sent before, compressed and delta -> next length
//	          from lens (at most the page size)
//
//	RoundEnd (source -> destination, 0x12; closes every live round, never the final one)
//	  u32 round number (the round it closes), u32 reserved, u64 pages in the round's batches
//	  (must equal the pages the destination received in that round)
//
//	RoundAck (destination -> source, 0x13; answers each RoundEnd once every page of the round
//	has been written into the destination VM)
//	  u32 round number (1, 2, ... in order), u32 reserved, u64 pages placed in the round
//
//	State (source -> destination, 0x20, after the final round), flag FlagMore when the section's
//	data continues in the next frame (which must be a State frame with the same id and version)
//	  id (component id), u32 section version, data (the rest of the payload)
//
//	Complete (source -> destination, 0x30, after the last state section)
//	  i64 source pause time (Unix ns, wall clock), u64 pages sent in all batches, u32 sections
//
//	Resumed (destination -> source, 0x31, acknowledges Complete once the destination runs)
//	  i64 destination resume time (Unix ns, wall clock), u64 restore ns, u64 start ns
//
//	Done (destination -> source, 0x32, after Resumed)
//	  i64 first guest heartbeat after start (Unix ns; 0 = not measured)
//
//	DoneAck (source -> destination, 0x33, acknowledges Done), empty
//
//	Request (destination -> source, 0x40, post-copy; needs CapPostcopy)
//	  u32 region index, u32 run count, runs as in PageBatch
//
//	Error (either direction, 0x7f, the last frame a side sends)
//	  u16 code (ErrCode*), u16 message length (at most MaxErrorMessage), message
//
// # Sequence
//
//	source                                  destination
//	  preamble  --------------------------->
//	                   <--------------------  preamble
//	  Hello  ------------------------------>
//	                   <--------------------  Welcome
//	  Round 1, PageBatch...  -------------->   (populated pages; holes are never sent)
//	  RoundEnd 1  ------------------------->   place the batches before it
//	                   <--------------------  RoundAck 1
//	  Round n, PageBatch...  -------------->   (pages dirtied during round n-1)
//	  RoundEnd n  ------------------------->   place the batches before it
//	                   <--------------------  RoundAck n
//	  [pause] Round final, PageBatch... --->   (never before RoundAck of the last live round)
//	  State...  --------------------------->
//	  Complete  --------------------------->   restore, start
//	                   <--------------------  Resumed
//	                   <--------------------  Done (first heartbeat)
//	  DoneAck  ---------------------------->
//	                   <-------------------   Request... (post-copy only, any time after Welcome)
//	  Error may replace any frame in either direction; the sender closes after it.
//
// Round acknowledgements exist because a source that only knows what it wrote cannot tell how
// much of a round still sits in socket buffers and in the destination's decode and copy
// pipeline: megabytes on a fast link. Had it paused right after writing its last live round,
// the guest would stay stopped while that backlog drained, before the final round even
// arrived. Waiting for RoundAck moves that wait before the pause, and the time from a round's
// first batch to its acknowledgement measures what the destination really absorbs. The source
// may prepare the next round (fetch the dirty log, read pages) while it waits, but never has
// more than one live round unacknowledged.
//
// The receiver state machine at the destination accepts exactly:
//
//	Hello (Round PageBatch* RoundEnd)* Round[final] PageBatch* State* Complete DoneAck
//
// and at the source:
//
//	Welcome (RoundAck | Request)* Resumed Done
//
// Round numbers rise by one from 1; a RoundEnd names the round it closes and the pages the
// destination received in it; RoundAck numbers rise by one from 1; State frames with FlagMore
// are followed by the rest of their section. Anything else is [ErrOrder], or [ErrMalformed]
// for counts that disagree. That each RoundAck answers a RoundEnd already sent, and that all
// of them precede Resumed, is the source's to check: only it knows what it sent.
package wire
