// Package migration is godwit's live-migration engine. It knows nothing of KVM: it moves any VM
// that implements [Source] (the sending side) and [Destination] (the receiving side) over any
// byte stream, in the format of package wire, with page encodings from package pages.
//
// # Structure
//
// Each technique is a policy and a driver. The policy is a deterministic state machine without
// I/O or clock, in the manner of etcd's raft: the driver feeds it observations (pages and bytes
// sent in a round, how long it took, how many pages were dirtied meanwhile) and carries out its
// decisions (send another round, raise the throttle, stop and copy, give up). [PrecopyPolicy]
// decides pre-copy (and when hybrid switches); a [Prepager] orders post-copy's background push.
//
// On the source, one session (send.go) owns what both drivers share: the connection and the
// extra streams, the page batch, the bandwidth cap, the report, and the undoing of pause,
// throttle and dirty log on failure. The pre-copy driver (precopy_send.go) runs the rounds and
// the stop-and-copy; the post-copy driver (postcopy_send.go) runs the switch, the push and
// demand service, reconnection and resume. Hybrid runs the first, then hands over to the
// second when the policy says so.
//
// # Pre-copy ([Send] and [Receive])
//
//	source                                            destination
//	StartDirtyLog, [StartFreePages], Populated
//	round 1: populated pages (holes and free  ---->   WritePages / ZeroPages
//	         pages skipped, zero pages as zero
//	         markers), round end
//	loop: FetchDirty, read the next batch
//	                         <--------------------   round ack (all placed)
//	      policy
//	  round n: the dirty set, round end  -------->   WritePages / ZeroPages
//	                         <--------------------   round ack
//	Pause, FetchDirty
//	final round: last dirty set  ---------------->   WritePages / ZeroPages
//	SaveState -> state sections, Complete  ------>   RestoreState, Start
//	                         <--------------------   Resumed (resume time)
//	StopDirtyLog
//	                         <--------------------   Done (first guest heartbeat)
//	DoneAck  ------------------------------------>
//
// A Source that is a FreePageReporter (freepages.go) has the guest's free pages skipped:
// after each FetchDirty the engine takes the pages reported free since the last one into its
// free set and removes from it the pages that fetch named (written since). Round 1, the final
// set and the post-copy missing set leave out what the free set holds then.
//
// The round acknowledgements keep the backlog out of the downtime. When the source has
// written a round, megabytes of it may still sit in socket buffers and in the destination's
// decode and copy pipeline; had it paused then, the guest would stay stopped while they
// drained. So each live round ends with a marker, the destination acknowledges it once it has
// placed the round's last page, and the source neither pauses nor starts the next round before
// that acknowledgement (bounded by AckTimeout). It fetches the dirty log and reads the next
// round's first batch while it waits. The policy's bandwidth is measured from each round's
// first write to its acknowledgement, so it is what the destination absorbs, and its expected
// downtime adds to the last dirty set (projected over the time since it was fetched) a fixed
// cost: the state at that bandwidth (estimated before the pause, when it cannot be saved),
// the shortest round trip seen (handshake and acknowledgements) and SendOptions.SwitchCost.
//
// The destination's Resumed is the point of no return. Before it, any failure (the peer's Error
// frame, a bad or missing frame, a dead connection, a timeout, cancellation, a VMM error) leaves
// the source running: Send resumes it if paused, removes the throttle and stops dirty logging,
// and tells the destination why with an Error frame, upon which the destination aborts. After
// it, the source must never run again and may release its memory.
//
// One window remains: if the destination starts and writes Resumed, and the connection then
// dies before the source reads it, the source resumes and the destination runs too. The
// destination cannot tell this apart from a lost DoneAck after a successful migration, so it
// keeps running and its report carries a warning. Settling ownership in that case needs a third
// party (the agents, fencing the destination until the source confirms) and is left to the
// layer above.
//
// The stop window holds only work that follows what changed: the last fetch of the dirty log
// (with a KVM dirty ring, the VMM harvests the pages written since the previous fetch) and
// those pages. What follows the memory's size happens outside it: a pure post-copy finds the
// populated pages before the pause, with logging on from before the walk so that the last
// fetch adds what the guest wrote meanwhile, and sends them ahead (wire.Ahead) where the
// destination takes them, so that the Switch carries only that last fetch; logging is stopped
// only after Resumed (a paused VM dirties nothing; stopping costs the VMM a memslot update over
// all of memory). The page sets themselves ([Bitmap]) are kept in chunks that exist only where
// pages are, with summaries of which do: merging, counting and walking them costs what they
// hold, not a bit per page of memory.
//
// Pre-copy pages may travel on several connections (SendOptions.Streams): the source reads
// pages on its one goroutine and hands each batch to a lane per connection, which classifies,
// checksums and writes it; the destination places what each connection carries on a goroutine
// of its own. The round barrier above is what keeps this correct: a page is in a round once,
// and no round begins before every page of the one before was placed. See streams.go.
//
// # Post-copy and hybrid (SendOptions.Mode)
//
//	source                                            destination
//	[hybrid: pre-copy rounds as above, until HybridRounds, HybridAfter or the policy gives up;
//	 converged earlier: stop and copy as above]
//	[postcopy, PrepageHot or SampleBefore: sample the dirty log and progress while running]
//	[postcopy: StartDirtyLog, then Populated, while running]
//	[postcopy: Ahead: the populated pages  ----->   (the destination takes them as missing)]
//	Pause, last FetchDirty
//	Switch: the missing set  ------------------->   (postcopy: populated pages and the last
//	                                                 dirty ones, or after Ahead the last dirty
//	                                                 ones only; hybrid: unsent dirty pages)
//	SaveState -> state, Complete  -------------->   ArmPostcopy(missing), RestoreState, Start
//	                         <-------------------   Resumed          (the point of no return)
//	StopDirtyLog
//	push missing pages in prepaging order;          vCPUs fault on missing pages: Faults ->
//	requested pages first  <---------------------   Request (at once, no batching delay)
//	PageBatch...  ------------------------------>   PlacePages / PlaceZero (missing pages only)
//	PushEnd  ----------------------------------->   every page present: DisarmPostcopy
//	                         <-------------------   Filled           (source memory may go)
//	                         <-------------------   Stats (faults, latencies, progress), Done
//	DoneAck  ----------------------------------->
//
// Both sides send Keepalive frames when they have written nothing for LinkTimeout/4, and a side
// that has read nothing for LinkTimeout treats the link as broken, as it does any read or write
// error. Neither side gives up while it has a [Reconnector]: the source dials again (with
// backoff, until its context ends) and opens the new connection with Rejoin, naming the
// migration by the random id of its Switch; the destination accepts, checks the id and answers
// with the set of pages it still lacks (Lacking), which the source sends (again, if it had sent
// them on the dead connection) while the destination re-requests every page its vCPUs wait
// for. Meanwhile the destination's vCPUs simply block on missing pages.
//
// Without a Reconnector, or when the context ends, a post-copy that broke after Resumed and
// before Filled fails on both sides with [ErrStranded]: the destination runs the VM and lacks
// pages that only the source holds. The source stays paused, keeps its memory and is never
// resumed (its copy is stale: the destination has run); the destination is never aborted. Send
// with SendOptions.ResumeID, from the same paused source, finishes the migration while the
// destination's Receive still waits in its Reconnector.
//
// What cannot be recovered: the destination host dying after the switch. The VM's memory is
// then split between the source (pages not yet sent) and the dead destination (its state and
// every page it changed since); neither half runs alone, so the VM is lost. The source cannot
// tell this from a long partition: it keeps trying while its context lives and then reports
// that the destination's connection never came back. The source host dying after the switch
// loses the VM the same way. Before the switch (and before Resumed) everything fails as in
// pre-copy, the source running on, including the window described above: in post-copy a
// destination that started and whose Resumed was lost waits for a source that has resumed
// itself; its pages never come, and the layer above must abort it.
//
// Prepaging policies ([NewPrepager]): sequential pushes in page order; bubble pushes outward
// in both directions from the most recent demand fault; hot pushes the pages dirtied most
// often before the switch first (counted over the pre-copy rounds, or over the sampling
// before a pure post-copy pause), ties in page order; none pushes nothing while requests keep
// coming and the rest after [NoneIdle] without one. A page goes once, unless the destination
// says after a reconnection that it still lacks it.
//
// # Requests overtake the push
//
// A requested page travels in the same byte stream as the push, so it waits behind every push
// byte written before it: the one batch the pusher is writing when the request arrives, then
// whatever sits in the source's send buffer, in flight on the link (its queue included) and in
// the destination's receive buffer. Left to TCP, those buffers hold megabytes (send buffer
// autotuning, a congestion window that fills the bottleneck's queue), and a vCPU blocked on a
// fault waits for them all: about 15-20 ms at 1 Gbit/s in BenchmarkEnginePostcopy, where each
// fault costs a vCPU that long. So during post-copy the engine keeps little push data ahead of
// a request, on TCP connections (on Linux; other transports are left as they are):
//
//   - push batches are pushBytes (32 KiB), and the pusher checks for requests between two;
//     requested pages go at once, in a batch of their own;
//   - the source sets TCP_NOTSENT_LOWAT to two push batches on the connection after Resumed
//     (and on every rejoined one), so a push write waits while that much is still unsent
//     instead of filling the send buffer; the caller's connection gets its setting back when
//     Send returns;
//   - the destination bounds its TCP receive window, which bounds what is in flight plus what
//     it has not read yet, to windowBDPs (4) bandwidth-delay products, at least 64 KiB: every
//     10 ms it multiplies the rate it read by the connection's minimum round trip (TCP_INFO),
//     growing the window at most fourfold and shrinking it at most by half per step, and it
//     restores the old size once every page is present. The window is the socket's receive
//     buffer (SO_RCVBUF, or SO_RCVBUFFORCE where the process may exceed net.core.rmem_max):
//     TCP_WINDOW_CLAMP, tried first, did not hold on Linux 6.18 (receive-buffer autotuning
//     raises the clamp, and even a fixed clamp left megabytes unread in front of a reader
//     slower than the link).
//
// A request then waits for about (32 KiB + 64 KiB + the window) / bandwidth plus a round trip.
// In BenchmarkEnginePostcopy (a real userfaultfd destination whose placing is slower than the
// unshaped link), the receive buffer held ~5.8 MB while only the clamp was set, and fault
// service p50 was 10-17 ms; with the buffer bounded it is ~1.3 ms unshaped and ~2.3 ms at
// 1 Gbit/s (with ~160 KiB ahead of a request that is the link's own delay). The cost: the
// pusher has to refill the send buffer within the time 32 KiB takes to drain (the kernel wakes
// a blocked writer below half the low-water mark), and a small window lets a destination
// whose reader is scheduled late starve the push: on the unshaped link of that benchmark (two
// CPUs shared by both ends and four busy simulated vCPUs) the push ran at about half the rate
// it had with megabytes queued; at 1 Gbit/s the total time stayed within 1.06x of the raw TCP
// rate. Without root the buffer cannot exceed net.core.rmem_max (208 KiB by default), which
// caps the window on long fat links. Nothing else on the wire changed: the destination
// acknowledges nothing more than before.
//
// Under a bandwidth cap (SendOptions.MaxBandwidth) requested pages count against the cap but
// are not held back by the push's use of it, and the push waits for its share before it takes
// a batch, in a sleep that a request's arrival ends: a request never waits for the push's
// pacing. (It did before: the pusher slept with a batch in hand, and under a 100 MiB/s cap
// fault service p50 was 1.3 ms on loopback against 0.2 ms now.) Requested pages alone may take
// three quarters of the cap without waiting; beyond that they are paced too, so that a guest
// that faults faster than the cap cannot starve the push. Writers that share the cap reserve
// it under its lock and sleep outside it.
//
// The fault channel (SendOptions.FaultChannel, with CapStreams) removes the trade-off: the
// source opens one extra connection at the handshake and writes requested pages there, so they
// queue behind nothing but other requested pages. A requested page that was pushed already
// goes again on it (its first copy may still sit behind the push; the destination keeps
// whichever arrives first, and both are the final copy). The destination places what the
// channel carries on a goroutine of its own. A channel that breaks is a broken link: the
// source rejoins over the main connection as above, without a fault channel from then on. In
// TestPostcopyFaultChannel (links with 1 MiB of buffer at 50 MiB/s, a fake clock) fault
// service p50 falls from 10.2 ms to 1.4 ms and p99 from 21 ms to 2.2 ms.
//
// # Metrics
//
// As defined in DESIGN.md and reported in [Report]: total time from the call until the source
// may release its memory; downtime as the destination's resume time minus the source's pause
// time by wall clock, which assumes the two hosts share a synchronised clock (true on our
// testbeds, and trivially within one host), so the source also reports its local pause ->
// acknowledgement time, which needs no shared clock and bounds the downtime, and splits the
// downtime into consecutive parts that add up to it ([DowntimeParts]); blackout as the guest's
// first heartbeat after resume minus its last before pause, when the source implements
// [ProgressClock] and the destination [FirstProgress]; bytes this side wrote to the connection;
// pages by kind. Per live round the source also reports how long the acknowledgement took after
// the round's end (ack_wait_ms: the backlog plus a round trip), and its expected downtime at the
// decision to stop (expected_downtime_ms), to compare with the downtime measured.
//
// In post-copy the total time ends at the destination's Filled; downtime runs from the pause to
// the destination's start as in pre-copy (the missing set replaces the final round). The
// [PostcopyReport] adds demand faults and their service latency (a fault as the VMM saw it ->
// its page placed), pages pushed and demanded, and the guest's progress rate (with
// [ProgressCounter]) in the second before the pause, from the destination's start until every
// page is present, and in the second after.
package migration
