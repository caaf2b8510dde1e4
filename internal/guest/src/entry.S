/*
 * The first byte of the image, at EntryGPA. The VMM enters here in 64-bit mode at CPL3 with
 * RDI = vCPU index, RSI = params GPA and RSP = stack top - 8, which is exactly what a C function
 * sees right after a call: so this jumps (not calls) to guest_main with the arguments in place.
 */
	.section .text.entry, "ax", @progbits
	.globl _start
_start:
	jmp guest_main
	/* guest_main never returns; trap rather than run into whatever follows. */
	ud2

	.section .note.GNU-stack, "", @progbits
