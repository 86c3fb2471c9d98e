/*
 * tests/fuzz/fuzz-load.c - libFuzzer target for the stream loader.
 *
 * Loads arbitrary bytes into a destination with the test devices (an
 * iterable page device, a vmstate register file, a device-state buffer
 * device). Any crash, leak, hang or sanitizer report is a bug; a clean
 * error return is the expected outcome for almost every input.
 *
 * Build and run: `make fuzz` (long) or the short smoke run in `make check`.
 * Seeds: tests/fuzz/seeds/ holds a valid small stream.
 */
#include <stddef.h>
#include <stdint.h>

#include "ferry/ferry.h"
#include "../unit/testdev.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct testvm dst;
	struct ferry_error err = { 0 };
	struct ferry_chan *c;
	/* A small record cap keeps each run fast and memory flat. */
	struct ferry_load_opts opts = { .size = sizeof(opts), .max_record = 1u << 20 };

	testvm_init_small(&dst, false, 0);
	c = ferry_chan_new_mem_reader(data, size);
	if (c) {
		ferry_load(dst.ctx, c, &opts, &err);
		ferry_chan_free(c);
	}
	testvm_free(&dst);
	return 0;
}
