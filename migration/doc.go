// Package migration is godwit's live-migration engine. It knows nothing of KVM: it moves any VM
// that implements [Source] (the sending side) and [Destination] (the receiving side) over any
// byte stream, in the format of package wire, with page encodings from package pages.
//
// # Structure
//
// Each technique is a policy and a driver. The policy is a deterministic state machine without
// I/O or clock, in the manner of etcd's raft: the driver feeds it observations (pages and bytes
// sent in a round, how long it took, how many pages were dirtied meanwhile) and carries out its
// decisions (send another round, raise the throttle, stop and copy, give up). [PrecopyPolicy] is
// the first; post-copy and hybrid add their own policies over the same drivers, and the wire
// protocol already has the destination-to-source request channel they need.
//
// # Pre-copy ([Send] and [Receive])
//
//	source                                            destination
//	StartDirtyLog, Populated
//	round 1: populated pages (holes skipped,  ---->   WritePages / ZeroPages
//	         zero pages as zero markers), round end
//	loop: FetchDirty, read the next batch
//	                         <--------------------   round ack (all placed)
//	      policy
//	  round n: the dirty set, round end  -------->   WritePages / ZeroPages
//	                         <--------------------   round ack
//	Pause, FetchDirty, StopDirtyLog
//	final round: last dirty set  ---------------->   WritePages / ZeroPages
//	SaveState -> state sections, Complete  ------>   RestoreState, Start
//	                         <--------------------   Resumed (resume time)
//	                         <--------------------   Done (first guest heartbeat)
//	DoneAck  ------------------------------------>
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
// # Metrics
//
// As defined in DESIGN.md and reported in [Report]: total time from the call until the source
// may release its memory; downtime as the destination's resume time minus the source's pause
// time by wall clock, which assumes the two hosts share a synchronised clock (true on our
// testbeds, and trivially within one host), so the source also reports its local pause ->
// acknowledgement time, which needs no shared clock; blackout as the guest's first heartbeat
// after resume minus its last before pause, when the source implements [ProgressClock] and the
// destination [FirstProgress]; bytes this side wrote to the connection; pages by kind. Per live
// round the source also reports how long the acknowledgement took after the round's end
// (ack_wait_ms: the backlog plus a round trip), and its expected downtime at the decision to
// stop (expected_downtime_ms), to compare with the downtime measured.
package migration
