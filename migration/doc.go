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
//	         zero pages as zero markers)
//	loop: FetchDirty -> policy
//	  round n: the dirty set  ------------------->   WritePages / ZeroPages
//	Pause, FetchDirty, StopDirtyLog
//	final round: last dirty set  ---------------->   WritePages / ZeroPages
//	SaveState -> state sections, Complete  ------>   RestoreState, Start
//	                         <--------------------   Resumed (resume time)
//	                         <--------------------   Done (first guest heartbeat)
//	DoneAck  ------------------------------------>
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
// destination [FirstProgress]; bytes this side wrote to the connection; pages by kind.
package migration
