package guest

import _ "embed"

// Image is the flat binary of the workload guest, built from src/ by `go generate` and loaded
// by the VMM at EntryGPA; its first byte is the entry point. Building godwit needs no C
// toolchain: the image is committed, and a test checks that it matches the sources.
//
//go:embed image.bin
var Image []byte
