/* SPDX-License-Identifier: MIT */
/*
 * image.S - embed the flat guest binary into the VMM.
 *
 * Assembled by the host compiler with -DFERRY_GUEST_BIN='"path/guest.bin"';
 * layout.h declares the two symbols.  .incbin keeps the VMM binary
 * self-contained and, unlike `ld -r -b binary`, gives stable symbol names
 * and a proper non-executable-stack note.
 */
	.section .rodata.ferry_guest_image, "a"
	.balign 4096
	.globl ferry_guest_image
	.type ferry_guest_image, @object
ferry_guest_image:
	.incbin FERRY_GUEST_BIN
	.globl ferry_guest_image_end
ferry_guest_image_end:
	.size ferry_guest_image, . - ferry_guest_image

	.section .note.GNU-stack, "", @progbits
