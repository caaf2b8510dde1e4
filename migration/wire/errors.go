package wire

import (
	"fmt"
)

// kind is the type of the package's sentinel errors. Its text is what follows "wire: " in the
// sentinel itself and what a [FrameError] prints after naming the frame.
type kind string

func (k kind) Error() string { return "wire: " + string(k) }

// Sentinel errors. Every decoding error matches exactly one of them with errors.Is.
var (
	ErrMagic       error = kind("bad magic")                 // the peer does not speak this protocol
	ErrVersion     error = kind("protocol version mismatch") // no version both sides speak
	ErrTruncated   error = kind("truncated")                 // the stream ended inside a frame
	ErrClosed      error = kind("stream closed")             // the stream ended between frames, too early
	ErrTooLarge    error = kind("oversized")                 // a length or count beyond its cap
	ErrChecksum    error = kind("checksum mismatch")         // the frame's checksum (XXH3) does not match
	ErrSequence    error = kind("bad sequence number")       // a frame was lost or repeated
	ErrUnknownType error = kind("unknown frame type")        // a type this version does not define
	ErrOrder       error = kind("out of order")              // a legal frame at an illegal point
	ErrMalformed   error = kind("malformed payload")         // the payload contradicts itself or the layout
	ErrPeer        error = kind("peer error")                // the peer sent an Error frame
)

// FrameError reports a problem with one frame: which (1-based index in the stream, type when
// known), what (Kind, one of the sentinels) and the detail.
type FrameError struct {
	Frame  uint64 // 1 for the first frame after the preamble; 0 for the preamble
	Type   Type   // 0 when the header was not read
	Kind   error
	Detail string
}

func (e *FrameError) Error() string {
	where := "preamble"
	if e.Frame == 0 && e.Type != 0 {
		where = e.Type.String() + " payload"
	}
	if e.Frame > 0 {
		where = fmt.Sprintf("frame %d", e.Frame)
		if e.Type != 0 {
			where += " (" + e.Type.String() + ")"
		}
	}
	k, _ := e.Kind.(kind)
	if e.Detail == "" {
		return "wire: " + where + ": " + string(k)
	}
	return "wire: " + where + ": " + string(k) + " (" + e.Detail + ")"
}

func (e *FrameError) Unwrap() error { return e.Kind }

// ErrCode says why a peer aborts, in an Error frame.
type ErrCode uint16

const (
	ErrCodeInternal    ErrCode = 1 // a bug or an unexpected local failure
	ErrCodeProtocol    ErrCode = 2 // the peer's stream was invalid
	ErrCodeVersion     ErrCode = 3 // no common protocol version
	ErrCodeCancelled   ErrCode = 4 // the operator cancelled the migration
	ErrCodeTimeout     ErrCode = 5 // the migration ran out of time
	ErrCodeSource      ErrCode = 6 // the source VMM failed (read, pause, save)
	ErrCodeDestination ErrCode = 7 // the destination VMM failed (prepare, write, restore, start)
	ErrCodeNoConverge  ErrCode = 8 // pre-copy gave up: the dirty set did not converge
)

func (c ErrCode) String() string {
	switch c {
	case ErrCodeInternal:
		return "internal"
	case ErrCodeProtocol:
		return "protocol"
	case ErrCodeVersion:
		return "version"
	case ErrCodeCancelled:
		return "cancelled"
	case ErrCodeTimeout:
		return "timeout"
	case ErrCodeSource:
		return "source"
	case ErrCodeDestination:
		return "destination"
	case ErrCodeNoConverge:
		return "no-converge"
	}
	return fmt.Sprintf("code %d", uint16(c))
}

// PeerError is the content of an Error frame received from the peer. It matches [ErrPeer].
type PeerError struct {
	Frame   uint64
	Code    ErrCode
	Message string
}

func (e *PeerError) Error() string {
	return fmt.Sprintf("wire: frame %d (error): peer aborted (%s): %s", e.Frame, e.Code, e.Message)
}

func (e *PeerError) Is(target error) bool { return target == ErrPeer }
