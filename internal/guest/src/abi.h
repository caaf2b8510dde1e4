/*
 * The guest side of the ABI between godwit's built-in guest and its VMM. Every number here
 * mirrors internal/guest/abi.go, which is the reference; the Go test TestABIHeaderMatchesGo
 * compares the two so that they cannot drift apart.
 */
#ifndef GODWIT_ABI_H
#define GODWIT_ABI_H

#define PAGE_SIZE 4096

#define GDT_GPA 0x1000
#define PARAMS_GPA 0x2000
#define PARAMS_SIZE 0x2000
#define PML4_GPA 0x10000
#define PDPT_GPA 0x11000
#define PD_BASE_GPA 0x12000
#define MAX_PDS 64
#define MAILBOX_GPA 0x60000
#define ENTRY_GPA 0x100000
#define IMAGE_MAX 0x100000
#define STACK_GPA 0x200000
#define STACK_SIZE 0x10000
#define MAX_VCPUS 64
#define DATA_GPA 0x800000

#define PORT_CONSOLE 0x500
#define PORT_HEARTBEAT 0x501
#define PORT_SLEEP 0x502
#define PORT_VERIFIED 0x503
#define PORT_EXIT 0x504
#define PORT_PANIC 0x505
#define PORT_FREE_PAGES 0x506
#define PORT_FREE_DONE 0x507
#define PORT_BALLOON_TARGET 0x508
#define PORT_BALLOON_INFLATE 0x509

#define CMD_CONTINUE 0
#define CMD_VERIFY 1
#define CMD_EXIT 2
#define CMD_REPORT_FREE 3
#define CMD_BALLOON 4

#define BALLOON_AUTO 0x80000000

#define WORKLOAD_IDLE 0
#define WORKLOAD_DIRTY 1
#define WORKLOAD_CHURN 2

#define CONTENT_ZERO 0
#define CONTENT_TEXT 1
#define CONTENT_RANDOM 2
#define CONTENT_IMAGE 3
#define CONTENT_PATCH 4

#define PATTERN_SEQUENTIAL 0
#define PATTERN_RANDOM 1
#define PATTERN_HOTCOLD 2

#define VERSION_FREE 0x80000000
#define VERSION_MASK 0x3fffffff

#define PARAMS_MAGIC 0x3150544957444f47ULL
#define ABI_VERSION 1

#define PAR_MAGIC 0x00
#define PAR_ABI_VERSION 0x08
#define PAR_NR_VCPUS 0x10
#define PAR_TSC_KHZ 0x18
#define PAR_WORKLOAD 0x20
#define PAR_CONTENT 0x28
#define PAR_PATTERN 0x30
#define PAR_SEED 0x38
#define PAR_RATE 0x40
#define PAR_BATCH_PAGES 0x48
#define PAR_TOUCH_PERMILLE 0x50
#define PAR_IDLE_INTERVAL_US 0x58
#define PAR_HOT_PERMILLE 0x60
#define PAR_HOT_PROB_PERMILLE 0x68
#define PAR_IMAGE_POOL_PAGES 0x70
#define PARAMS_VCPU_OFFSET 0x400
#define PARAMS_VCPU_RECORD 0x40
#define VCPU_VERSION_TABLE_GPA 0x00
#define VCPU_DATA_GPA 0x08
#define VCPU_DATA_PAGES 0x10
#define VCPU_WSS_PAGES 0x18
#define VCPU_MAILBOX_GPA 0x20
#define VCPU_STACK_TOP 0x28

#define MB_WORK_UNITS 0x000
#define MB_PAGES_WRITTEN 0x008
#define MB_VERIFY_SEQ 0x010
#define MB_PAGES_CHECKED 0x018
#define MB_MISMATCHES 0x020
#define MB_FIRST_BAD_PAGE 0x028
#define MB_FIRST_BAD_OFFSET 0x030
#define MB_EXPECTED 0x038
#define MB_FOUND 0x040
#define MB_PAGES_VERSIONED 0x048
#define MB_PAGES_FREE 0x050
#define MB_BALLOON_PAGES 0x058
#define MB_FREE_LIST 0x100
#define MB_FREE_MAX 448
#define MB_CONSOLE 0x800
#define MB_CONSOLE_MAX 0x800

#endif
