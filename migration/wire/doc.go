// Package wire is godwit's migration stream format: a fixed preamble, then checksummed frames
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
//	1  2026-11-22  post-copy under CapPostcopy, which version 1 had reserved: Switch, PushEnd,
//	               Keepalive, Filled, Stats, Rejoin, Lacking (0x41..0x47), Request in use, FlagMore
//	               on Switch and Lacking. No byte of an existing frame changed meaning and a peer
//	               only sees the new frames after accepting CapPostcopy, which no earlier build
//	               accepts, so the version stays 1.
//	1  2026-12-02  extra page connections under CapStreams: Streams (0x14) and Join (0x15); with
//	               Streams, RoundEnd and Complete count the pages of all connections. New
//	               frames behind a new capability again: the version stays 1.
//	1  2026-12-02  a pure post-copy's populated pages ahead of the pause under CapAhead: Ahead
//	               (0x48); the Switch then carries only the pages written since. A new frame
//	               behind a new capability: the version stays 1.
//	1  2026-12-02  compressed pages under CapCompressed, which version 1 had reserved: the data
//	               of an EncCompressed page is one zstd frame (RFC 8878) that decodes to exactly
//	               one page, with no dictionary. The capability was never accepted before, so
//	               the version stays 1.
//	1  2026-12-02  delta pages under CapDelta, which version 1 had reserved: the data of an
//	               EncDelta page is its change to the copy the destination holds (runs of
//	               replaced 8-byte words; the format is in package delta), sent in pre-copy
//	               rounds only. The capability was never accepted before: the version stays 1.
//	1  2026-12-02  dedup pages under CapDedup, which version 1 had reserved: the data of an
//	               EncDedup page is 28 bytes, a reference to a page the destination holds
//	               (u32 region, u64 page) and the first 16 bytes of the SHA-256 of the content
//	               it stands for (the reserved layout had a bare 16-byte hash); FlagAgain on
//	               Request, and page batches after PushEnd for the pages it asks for. The
//	               capability was never accepted before: the version stays 1.
//	1  2026-12-02  S2 pages under CapS2 (1<<7): EncS2 (5), one S2 block (klauspost/compress/s2,
//	               a superset of Snappy's block format) that decodes to exactly one page. A new
//	               encoding behind a new capability: the version stays 1.
//	1  2026-12-03  memory handed over as files on one host under CapHandover (1<<8): Memory
//	               (0x16) with the files beside it (SCM_RIGHTS), MemoryAck (0x17); no pages;
//	               and memory both hosts map from shared memory under CapShared (1<<9), the
//	               same frames, Memory naming the memory file's id. New frames behind new
//	               capabilities: the version stays 1.
//	1  2026-12-04  memory cloned from a base (a template) under CapBase (1<<10): the Hello
//	               carries the base's 32-byte id after the devices. A new field behind a new
//	               capability: the version stays 1.
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
//	12  4    checksum: the low 32 bits of XXH3-64 (seed 0) of header bytes 0..11 followed by the payload
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
//	  [CapBase offered] 32 bytes: the base the VM's memory was cloned from (a template's
//	           SHA-256, not zero); pages the stream does not carry are the base's
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
//	  lens:   variable-length page count x u32: the data length of each compressed, delta or
//	          s2 page, in page order
//	  data:   the pages' data in page order: zero -> nothing, raw -> page size bytes,
//	          dedup -> 28 bytes: u32 region, u64 page of a page the destination holds, and
//	          the first 16 bytes of the SHA-256 of the content (checked there, against that
//	          page, before it is copied), compressed, delta and s2 -> next length
//	          from lens (at most the page size); compressed: one zstd frame (RFC 8878, no
//	          dictionary) of exactly one page, s2: one S2 block of exactly one page, both
//	          decoded by the engine (package compress), not here
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
//	  i64 destination resume time (Unix ns, wall clock), u64 restore ns, u64 start ns,
//	  u64 post-copy arm ns (0 without post-copy)
//
//	Done (destination -> source, 0x32, after Resumed)
//	  i64 first guest heartbeat after start (Unix ns; 0 = not measured)
//
//	DoneAck (source -> destination, 0x33, acknowledges Done), empty
//
//	Request (destination -> source, 0x40, post-copy; needs CapPostcopy), flag FlagAgain (with
//	CapDedup) for pages sent already as dedup references that did not check at the destination
//	(its guest had changed the page named): the source sends them again, whole
//	  u32 region index, u32 run count, runs as in PageBatch (at most MaxBatchPages pages)
//
// Post-copy frames need CapPostcopy. A page set (the Ahead, Switch and Lacking frames) is a set of pages
// over all regions, sent as one or more frames with FlagMore on all but the last. Each frame
// holds runs of one region; regions ascend from frame to frame, and within a region a frame's
// runs start at or after the previous frame's end. Every frame repeats the set's total, and the
// frames' runs add up to exactly that total. An empty set is one frame without runs.
//
//	page set part (inside Ahead, Switch and Lacking)
//	  u64 total pages in the whole set (at most MaxSetPages), u32 region index, u8 form, then
//	  form 0 (runs): u32 run count (at most MaxSetRuns), runs as in PageBatch (ascending,
//	  inside the region; may be none);
//	  form 1 (bitmap): u64 first page, u64 span, ceil(span/8) bytes: bit i (byte i/8, bit i%8)
//	  set for page first+i; the first and last bits of the span are set, bits past it clear.
//	  The writer takes whichever form is shorter for the frame's runs (runs on a tie); a reader
//	  rejects the other, so every set has one encoding. A guest that wrote pages at random
//	  leaves a run per page or two: 12 bytes each as runs, a bit as a bitmap.
//
//	Switch (source -> destination, 0x41, after the last live round's RoundEnd, right after
//	Hello, or after the Ahead set, instead of the final round; flag FlagMore while the set
//	continues)
//	  16-byte migration id (random, chosen by the source; the same in every frame), page set part:
//	  the pages the destination lacks (pure post-copy: every populated page, or after Ahead the
//	  pages written since; hybrid: pages never sent or dirtied since last sent). It demand-pages
//	  them (and the Ahead set's); every other page is complete.
//
//	Ahead (source -> destination, 0x48, CapAhead, pure post-copy: right after Hello or Streams,
//	while the guest still runs; flag FlagMore while the set continues)
//	  page set part: the pages that held data when the source looked, with dirty logging on
//	  from before it looked. The Switch that must follow carries the pages written since (it
//	  may repeat some); the destination lacks the union of the two sets. What costs a walk of
//	  the populated pages so leaves the stop window: only what the last moments changed is
//	  sent while the guest is paused.
//
//	PushEnd (source -> destination, 0x42, post-copy, at most once per connection)
//	  u64 pages pushed since the switch, u64 pages sent on request (both over all connections).
//	  Every page the destination lacked has been sent on this connection: once it has placed the
//	  batches before PushEnd it must have them all, but for those it asked for again (Request
//	  with FlagAgain, under CapDedup), which may come in batches after PushEnd.
//
//	Keepalive (either direction, 0x43, post-copy), empty. Sent by a side that has written
//	nothing for a quarter of its link timeout.
//
//	Filled (destination -> source, 0x44, once per connection)
//	  u64 pages placed since the switch, i64 time the last was placed (Unix ns). The source may
//	  release its memory.
//
//	Stats (destination -> source, 0x45, after Filled, before Done)
//	  u64 demand faults, u64 pages requested, u64 post-copy ns (start -> every page present),
//	  u64 fault service latency p50 ns, p99 ns, max ns (p50 <= p99 <= max), f64 guest progress
//	  rate (units/s) from start until every page was present, f64 in the window after that (both
//	  IEEE 754 bits, finite and >= 0), u32 reconnections, u32 latency sample count (at most
//	  MaxLatencySample), that many u64 latencies in ns
//
//	Rejoin (source -> destination, 0x46, the first frame of a new connection after a broken one,
//	instead of Hello)
//	  16-byte migration id (the Switch's), u32 attempt (1, 2, ...)
//
//	Lacking (destination -> source, 0x47, answers Rejoin; flag FlagMore while the set continues)
//	  page set part: the pages the destination still lacks. Whatever the source sent on the
//	  broken connection and is not in this set arrived; what is in it goes again.
//
//	Streams (source -> destination, 0x14, CapStreams, after Welcome and before Round 1)
//	  16-byte migration id (random), u16 extra connections (1..MaxStreams-1). From now on
//	  page batches of every round may also arrive on those connections, and the pages of
//	  RoundEnd and Complete count all of them: only the engine, which reads every
//	  connection, can check those counts
//
//	Join (source -> destination, 0x15, the first frame of an extra page connection, after the
//	preambles, instead of Hello)
//	  16-byte migration id (the Streams frame's), u16 index (1..the count announced). Page
//	  batches follow, nothing else; the source closes the connection when it is done. A Join
//	  that names another migration, or an index taken, is answered with Error
//
//	Memory (source -> destination, 0x16, CapHandover or CapShared, right after Welcome)
//	  u16 region count (must be the Hello's), region count x u64 size (each the Hello's size
//	  of that region), 16-byte memory id. CapHandover: the id is zero, and one file
//	  descriptor per region, in region order, is passed with the frame's bytes on a Unix
//	  socket (SCM_RIGHTS in the same sendmsg): the destination maps those files as guest
//	  memory instead of receiving pages. CapShared: the id (not zero) names the memory file on
//	  shared memory that both hosts map; the destination maps its own mapping of it and checks
//	  the id in the file's label. Nothing else is accepted until the state: no rounds, pages,
//	  switch or streams
//
//	MemoryAck (destination -> source, 0x17, CapHandover, answers Memory once the memory is
//	mapped; empty). The source pauses only after it
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
// A handover on one host (CapHandover), the memory passed as files instead of pages:
//
//	Memory (+ one fd per region)  ------->   map the files
//	                 <--------------------  MemoryAck
//	[pause] State..., Complete  --------->   restore, start
//	                 <--------------------  Resumed, Done
//	DoneAck  ---------------------------->
//
// Post-copy (after the live rounds in hybrid, right after the handshake in pure post-copy):
//
//	[pause] Switch... (the missing set) ->   (instead of the final round)
//	State..., Complete  ----------------->   ArmPostcopy(set), restore, start
//	                 <--------------------  Resumed
//	PageBatch... (push, requested pages ->   place the missing ones; vCPUs fault on the others
//	first), Keepalive...
//	                 <--------------------  Request..., Keepalive...
//	PushEnd  ---------------------------->   every page present
//	                 <--------------------  Filled          (the source may release its memory)
//	                 <--------------------  Stats, Done
//	DoneAck  ---------------------------->
//
// When the connection breaks after Resumed, the source connects again (any number of times):
//
//	preamble  --------------------------->
//	                 <--------------------  preamble
//	Rejoin (migration id)  -------------->   (an unknown id is answered with Error)
//	                 <--------------------  Lacking...      (pages still missing)
//	                 <--------------------  Request...      (faulted pages still missing)
//	and post-copy goes on as above, from the push: PageBatch..., PushEnd; Filled, Stats, Done;
//	DoneAck.
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
//	Hello (Round PageBatch* RoundEnd)* Switch[more]* Switch State* Complete Post DoneAck
//	Hello Ahead[more]* Ahead Switch[more]* Switch State* Complete Post DoneAck      (CapAhead)
//	Hello Memory State* Complete DoneAck                             (CapHandover, CapShared)
//	Rejoin Post DoneAck                                              (a rejoining connection)
//	Join PageBatch*                                                  (an extra page connection)
//	Post = (PageBatch | Keepalive)* [PushEnd Keepalive*]
//
// with an optional Streams right after Hello on the main connection (CapStreams).
//
// and at the source:
//
//	Welcome (RoundAck | Request)* Resumed Done
//	Welcome MemoryAck Resumed Done                                   (CapHandover, CapShared)
//	Welcome (RoundAck | Request)* Resumed (Request | Keepalive)* [Filled (Request | Keepalive)* Stats (Request | Keepalive)*] Done
//	Lacking[more]* Lacking (Request | Keepalive)* [Filled ... Stats ...] Done        (a rejoining connection)
//
// where the post-copy frames (Ahead, Switch, Rejoin, Lacking, PushEnd, Keepalive, Filled, Stats and
// Request) need CapPostcopy, and a rejoining connection's Reader is told so with
// [Reader.Rejoining]; Streams and Join need CapStreams, and an extra page connection's Reader
// is told so with [Reader.PageStream].
//
// Round numbers rise by one from 1; a RoundEnd names the round it closes and the pages the
// destination received in it; RoundAck numbers rise by one from 1; State frames with FlagMore
// are followed by the rest of their section. Anything else is [ErrOrder], or [ErrMalformed]
// for counts that disagree. That each RoundAck answers a RoundEnd already sent, and that all
// of them precede Resumed, is the source's to check: only it knows what it sent.
package wire
