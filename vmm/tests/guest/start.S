/* Entry of the Grove test guest, reached through the Linux 64-bit boot protocol:
 * long mode, identity-mapped first GiB, %rsi = zero page, stack set by the VMM. */
    .text
    .globl _start
_start:
    mov %rsi, %rdi
    call guest_main
1:  hlt
    jmp 1b
    .section .note.GNU-stack,"",@progbits
