/* The guest of QEMU in `cargo bench --bench migrate`: a 64 KiB image for `-bios`, which QEMU
 * maps at the top of 4 GiB (reset vector at offset 0xFFF0) and again at 0xF0000.
 *
 * Why not a Linux guest or a protected-mode loop: /dev/kvm here is PVM, which runs guest
 * ring-0 and real-mode code in KVM's instruction emulator (~1 MIPS), and once CR0.PE has been
 * set from real mode the vCPU executes no further instruction (measured: RIP stays on the
 * instruction after `mov %eax, %cr0`, be it a far jump or a segment load, and a host core
 * spins). SeaBIOS never gets to protected mode either: 10 s after start it sits halted in
 * 16-bit code (f000:b7b9, CR0.PE clear). So:
 *
 * - idle (`cycles` = 0): halts in real mode forever; the vCPU sleeps.
 * - busy: in real mode, writes page tables (identity map of the first GiB in 2 MiB user
 *   pages) at 0x1000–0x3FFF and a GDT, then spins with EAX = 0x600DF00D. The bench then
 *   puts the vCPU into 64-bit ring 3 at `entry64` through QEMU's gdbstub (CR3, CR4.PAE,
 *   EFER.LME/LMA, CR0.PG/PE, CS/SS/DS/ES, RIP, RSP, RFLAGS), as ftvm's own loader does
 *   through KVM_SET_SREGS. Ring 3 runs natively under PVM: the loop writes the counter RCX
 *   into one page after another from `start` to `end`, one page every `cycles` TSC cycles
 *   (a page written late does not start a burst: the deadline restarts from now after 64
 *   missed pages), and starts over.
 *
 * Assemble: as -o fw.o qemu_firmware.S && ld -Ttext=0 -e 0 --oformat binary -o fw.bin fw.o
 * The bench patches `cycles`, `start` and `end` (offsets 0x100, 0x108, 0x110).
 */
    .set LOW, 0x000F0000
    .set READY, 0x600DF00D
    .code16
    .org 0
start16:
    cli
    ljmp $0xF000, $low16            /* run from the alias below 1 MiB */
low16:
    movl %cs:cycles, %ebp
    testl %ebp, %ebp
    jz idle
    xorw %ax, %ax
    movw %ax, %ds
    movl $0x2007, 0x1000            /* PML4[0] → PDPT (present, writable, user) */
    movl $0, 0x1004
    movl $0x3007, 0x2000            /* PDPT[0] → PD */
    movl $0, 0x2004
    movw $0x3000, %di
    movl $0x87, %eax                /* 2 MiB pages: present, writable, user, large */
pd:
    movl %eax, (%di)
    movl $0, 4(%di)
    addl $0x200000, %eax
    addw $8, %di
    cmpw $0x4000, %di
    jb pd
    lgdtl %cs:gdt_desc
    movl $READY, %eax
ready:
    jmp ready
idle:
    hlt
    jmp idle

    .p2align 3
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF        /* 0x08: ring-0 64-bit code */
    .quad 0x00CF92000000FFFF        /* 0x10: ring-0 data */
    .quad 0x00AFFA000000FFFF        /* 0x18: ring-3 64-bit code (selector 0x1b) */
    .quad 0x00CFF2000000FFFF        /* 0x20: ring-3 data (selector 0x23) */
gdt_desc:
    .word 39
    .long LOW + gdt

    .org 0x100
cycles:
    .quad 0                         /* TSC cycles per page; 0 = idle */
start:
    .quad 0x00100000
end:
    .quad 0x40000000

    .code64
    .org 0x200
entry64:
    movq cycles(%rip), %rbp
    movq %rbp, %rdi
    shlq $6, %rdi                   /* 64 pages of slack before the deadline restarts */
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, %rbx                 /* rbx: when the next page is due */
    movl $1, %ecx
restart:
    movq start(%rip), %rsi
page:
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    cmpq %rbx, %rax
    jb page
    addq %rbp, %rbx
    movq %rax, %rdx
    subq %rbx, %rdx
    cmpq %rdi, %rdx
    jl 1f
    movq %rax, %rbx
1:
    movq %rcx, (%rsi)
    incq %rcx
    addq $4096, %rsi
    cmpq end(%rip), %rsi
    jb page
    jmp restart

    .code16
    .org 0xFFF0
    jmp start16                     /* the reset vector */
    .org 0x10000
