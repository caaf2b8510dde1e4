/*
 * The multiboot (v1) entry of the QEMU image (build.sh -multiboot; linked by mb.ld).
 *
 * QEMU's -kernel loads the flat image at 0x100000 (the header's address fields, so no ELF is
 * needed) and enters mb_entry32 in 32-bit protected mode at CPL0 with paging off, EAX = the
 * multiboot loader magic and EBX = the multiboot information. This entry is the only code of
 * the image that runs at CPL0. It builds the machine godwit's VMM builds with KVM_SET_SREGS:
 *
 *   - the GDT at GDT_GPA: null, kernel code (64-bit), kernel data, user code (64-bit, DPL3),
 *     user data (DPL3), a 64-bit TSS descriptor (TSS at GDT_GPA + 0x800);
 *   - a TSS whose I/O permission bitmap opens the ports the image uses at CPL3 (debugcon's byte
 *     port and the four bytes of isa-debug-exit's 32-bit one): some KVM hosts (PVM) drop
 *     RFLAGS.IOPL on guest entry, and then every in/out at CPL3 is checked against it;
 *   - page tables at PML4_GPA with the U/S bit at every level: one PML4 entry, MAX_PDS PDPT
 *     entries, 2 MiB pages covering MAX_PDS GiB of virtual memory. QEMU's pc machine puts RAM
 *     that does not fit below its PCI hole (from 3 GiB on) above 4 GiB, but the workload wants
 *     one contiguous slice, so virtual addresses below the end of low RAM map to themselves and
 *     those from there on map to RAM from 4 GiB up. The workload's "guest physical" addresses
 *     are these virtual ones; nothing in the image touches the hole;
 *   - CR4 = PAE|OSFXSR|OSXMMEXCPT, EFER.LME, CR0 = PE|MP|ET|NE|PG;
 *
 * then jumps to 64-bit mode and irets to mb_user_entry at CPL3 with IOPL 3 and interrupts off,
 * on vCPU 0's stack (STACK_GPA + STACK_SIZE - 8, the call alignment of a C function), with EDI =
 * the multiboot information address. qemu.c's mb_main takes it from there.
 */
#include "abi.h"

#define MB_HEADER_MAGIC 0x1BADB002
#define MB_LOADER_MAGIC 0x2BADB002
/* Bit 1: memory information wanted; bit 16: the header's address fields are valid. */
#define MB_FLAGS 0x00010002

#define STACK0_TOP (STACK_GPA + STACK_SIZE)
#define TSS_GPA (GDT_GPA + 0x800)
/* The 64-bit TSS (104 bytes), the I/O bitmap for ports 0..0xff, its terminating 0xff byte. */
#define TSS_IOMAP_BASE 104
#define IOMAP_BYTES 32
#define TSS_SIZE (TSS_IOMAP_BASE + IOMAP_BYTES + 1)

#define KERNEL_CODE_SEL 0x08
#define KERNEL_DATA_SEL 0x10
#define USER_CODE_SEL 0x1b
#define USER_DATA_SEL 0x23
#define TSS_SEL 0x28

#define PORT_DEBUGCON 0xe9
#define PORT_DEBUG_EXIT 0xf4

	.section .text.mb, "ax", @progbits
	.code32
	.align 4
	.globl mb_header
mb_header:
	.long MB_HEADER_MAGIC
	.long MB_FLAGS
	.long -(MB_HEADER_MAGIC + MB_FLAGS)
	.long mb_header		/* header_addr */
	.long mb_load_start	/* load_addr: the image's first byte */
	.long mb_load_end	/* load_end_addr: the end of the file's contents */
	.long mb_bss_end	/* bss_end_addr: the loader zeroes up to here */
	.long mb_entry32	/* entry_addr */

	.globl mb_entry32
mb_entry32:
	cld
	cmpl $MB_LOADER_MAGIC, %eax
	jne bad_loader
	movl %ebx, %ebp			/* the multiboot information, for mb_main */
	movl $STACK0_TOP, %esp

	/* The GDT and the TSS: zero, then every port closed but PORT_DEBUGCON and PORT_DEBUG_EXIT. */
	movl $mb_gdt, %esi
	movl $GDT_GPA, %edi
	movl $((mb_gdt_end - mb_gdt) / 4), %ecx
	rep movsl
	xorl %eax, %eax
	movl $TSS_GPA, %edi
	movl $TSS_IOMAP_BASE, %ecx
	rep stosb
	movw $TSS_IOMAP_BASE, (TSS_GPA + 102)
	movb $0xff, %al
	movl $(IOMAP_BYTES + 1), %ecx
	rep stosb
	andb $~(1 << (PORT_DEBUGCON % 8)), (TSS_GPA + TSS_IOMAP_BASE + PORT_DEBUGCON / 8)
	andb $~(0xf << (PORT_DEBUG_EXIT % 8)), (TSS_GPA + TSS_IOMAP_BASE + PORT_DEBUG_EXIT / 8)
	lgdt mb_gdtr

	/*
	 * Page tables: PML4, PDPT and MAX_PDS PDs are consecutive pages from PML4_GPA. Low RAM
	 * ends at mem_upper + 1 MiB rounded up to a 2 MiB page: QEMU's mem_upper leaves out the
	 * firmware's last 128 KiB, and low RAM that RAM above 4 GiB follows ends at 3 GiB (or
	 * at the machine's max-ram-below-4g).
	 */
	movl 8(%ebp), %ebx		/* multiboot mem_upper, KiB above 1 MiB */
	addl $1024, %ebx
	shll $10, %ebx
	addl $0x1fffff, %ebx
	andl $0xffe00000, %ebx
	xorl %eax, %eax
	movl $PML4_GPA, %edi
	movl $((2 + MAX_PDS) * PAGE_SIZE / 4), %ecx
	rep stosl
	movl $(PDPT_GPA | 7), PML4_GPA	/* present, writable, user */
	movl $(PD_BASE_GPA | 7), %eax
	movl $PDPT_GPA, %edi
	movl $MAX_PDS, %ecx
1:	movl %eax, (%edi)
	addl $PAGE_SIZE, %eax
	addl $8, %edi
	loop 1b
	movl $0x87, %eax		/* present, writable, user, 2 MiB page; EDX:EAX is the PDE */
	xorl %edx, %edx
	movl $PD_BASE_GPA, %edi
	movl $(MAX_PDS * 512), %ecx
2:	testl %edx, %edx
	jnz 3f
	leal -0x87(%eax), %esi
	cmpl %ebx, %esi
	jne 3f
	movl $0x87, %eax		/* the end of low RAM: go on at 4 GiB */
	movl $1, %edx
3:	movl %eax, (%edi)
	movl %edx, 4(%edi)
	addl $0x200000, %eax
	adcl $0, %edx
	addl $8, %edi
	loop 2b

	/* Long mode. */
	movl $0x620, %eax		/* PAE | OSFXSR | OSXMMEXCPT */
	movl %eax, %cr4
	movl $PML4_GPA, %eax
	movl %eax, %cr3
	movl $0xc0000080, %ecx		/* EFER */
	rdmsr
	orl $0x100, %eax		/* LME */
	wrmsr
	movl $0x80000033, %eax		/* PG | NE | ET | MP | PE */
	movl %eax, %cr0
	ljmp $KERNEL_CODE_SEL, $entry64

bad_loader:
	movl $bad_loader_msg, %esi
5:	movb (%esi), %al
	testb %al, %al
	jz 6f
	outb %al, $PORT_DEBUGCON
	incl %esi
	jmp 5b
6:	movl $2, %eax
	outl %eax, $PORT_DEBUG_EXIT
	hlt
	jmp 6b

	.code64
entry64:
	movl $KERNEL_DATA_SEL, %eax
	movl %eax, %ss
	movl $USER_DATA_SEL, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %fs
	movl %eax, %gs
	movl $TSS_SEL, %eax
	ltr %ax
	/* iretq to CPL3: SS, RSP, RFLAGS (IOPL 3, interrupts off), CS, RIP. */
	pushq $USER_DATA_SEL
	pushq $(STACK0_TOP - 8)
	pushq $0x3002
	pushq $USER_CODE_SEL
	pushq $mb_user_entry
	iretq
	.globl mb_cpl0_end
mb_cpl0_end:

	/* From here on everything runs at CPL3. */
	.text
	.globl mb_user_entry
mb_user_entry:
	movl %ebp, %edi
	jmp mb_main
	ud2

	.section .rodata
	.align 16
mb_gdt:
	.quad 0
	.quad 0x00209A0000000000	/* kernel code, 64-bit */
	.quad 0x0000920000000000	/* kernel data */
	.quad 0x0020FA0000000000	/* user code, 64-bit, DPL3 */
	.quad 0x0000F20000000000	/* user data, DPL3 */
	/* 64-bit available TSS at TSS_GPA, limit TSS_SIZE - 1 (16 bytes) */
	.quad ((TSS_SIZE - 1) | ((TSS_GPA & 0xffffff) << 16) | (0x89 << 40) | (((TSS_GPA >> 24) & 0xff) << 56))
	.quad 0
mb_gdt_end:
	.align 4
	.word 0
mb_gdtr:
	.word mb_gdt_end - mb_gdt - 1
	.long GDT_GPA
bad_loader_msg:
	.asciz "godwit-qemu: panic not entered by a multiboot loader\n"

	.section .note.GNU-stack, "", @progbits
