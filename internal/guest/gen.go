package guest

// The images are built with the host's gcc, ld and objcopy (src/build.sh documents the flags).
// The builds are deterministic, so the committed image.bin and multiboot.bin must equal fresh
// builds: TestImageUpToDate and TestMultibootUpToDate fail until `go generate ./internal/guest`
// is run after a source change.

//go:generate sh src/build.sh image.bin
//go:generate sh src/build.sh -multiboot multiboot.bin
