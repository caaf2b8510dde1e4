package guest

// The image is built with the host's gcc, ld and objcopy (src/build.sh documents the flags).
// The build is deterministic, so the committed image.bin must equal a fresh build:
// TestImageUpToDate fails until `go generate ./internal/guest` is run after a source change.

//go:generate sh src/build.sh image.bin
