# ferry - one non-recursive GNU Makefile.
#
#   make            libferry.a, libferry.so and the ferry binary (in build/)
#   make check      install missing deps, build, run every test
#   make bench      benchmarks (figures printed)
#   make demo       install missing deps, build, run the end-to-end demo
#   make fuzz       longer libFuzzer runs of the stream loader and the
#                   control protocol's parser
#   make soak       1000 live migrations back and forth, faults, leak checks
#   make install    headers, libferry.so/.a and libferry.pc under PREFIX
#                   (default /usr/local; DESTDIR for staging)
#
# Knobs: V=1 (echo commands), SAN=address|undefined|thread, WERROR=0, O=2.

O      ?= 2
.DEFAULT_GOAL := all
B      := build$(if $(SAN),-$(SAN))
CC     ?= cc
CLANG  ?= clang

WARN   := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes \
          -Wpointer-arith -Wformat=2 -Wvla -Wno-missing-field-initializers
ifneq ($(WERROR),0)
WARN   += -Werror
endif

CFLAGS_BASE := -std=gnu11 -O$(O) -g -fno-strict-aliasing -D_GNU_SOURCE \
               -Iinclude -Ilib -MMD -MP $(WARN)
ifneq ($(SAN),)
CFLAGS_BASE += -fsanitize=$(SAN) -fno-omit-frame-pointer
LDFLAGS_SAN := -fsanitize=$(SAN)
endif
ifeq ($(SAN),undefined)
CFLAGS_BASE += -fno-sanitize-recover=all
endif

LIBS := -lzstd -ljansson -lxxhash -lssl -lcrypto -lpthread

ifeq ($(V),1)
Q :=
else
Q := @
endif

# ---- library ---------------------------------------------------------------
LIB_SRCS := lib/error.c lib/channel.c lib/stream.c lib/vmstate.c \
            lib/registry.c lib/save.c lib/load.c lib/describe.c \
            lib/transport.c lib/ram.c lib/return-path.c lib/multifd.c \
            lib/engine.c lib/engine-out.c lib/engine-in.c lib/postcopy.c \
            lib/devstate.c lib/pool.c lib/tls.c
LIB_OBJS := $(LIB_SRCS:%.c=$(B)/%.o)
LIB_PIC  := $(LIB_SRCS:%.c=$(B)/pic/%.o)
LIB_CFLAGS := -DFERRY_BUILDING_LIBRARY -fvisibility=hidden

# ---- CLI -------------------------------------------------------------------
# ---- the test guest: freestanding, ring 3, flat binary embedded in ferry ----
# Never built with sanitizers or the host's hardening: it runs on bare
# (virtual) metal with no runtime at all.
GUEST_CFLAGS := -std=gnu11 -Wall -Wextra -Werror -O2 -g0 -ffreestanding \
  -nostdlib -fno-pic -fno-pie -no-pie -static -mno-red-zone \
  -mgeneral-regs-only -mcmodel=small -fno-stack-protector \
  -fno-asynchronous-unwind-tables -fno-unwind-tables -fcf-protection=none
GUEST_LDFLAGS := -Wl,-T,vmm/guest/guest.ld -Wl,--build-id=none \
  -Wl,-z,noexecstack -Wl,--no-warn-rwx-segments
GUEST_SRCS := vmm/guest/guest.c
$(B)/guest/guest.elf: $(GUEST_SRCS) vmm/guest/layout.h vmm/guest/guest.ld $(wildcard vmm/guest/*.h)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  GUEST   $@")
	$(Q)$(CC) $(GUEST_CFLAGS) $(GUEST_LDFLAGS) -o $@ $(GUEST_SRCS)
$(B)/guest/guest.bin: $(B)/guest/guest.elf
	$(Q)objcopy -O binary $< $@
$(B)/vmm/guest/image.o: vmm/guest/image.S $(B)/guest/guest.bin
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  AS      $<")
	$(Q)$(CC) -c -DFERRY_GUEST_BIN='"$(B)/guest/guest.bin"' -o $@ $<

# ---- reference VMM (linked into the ferry binary) ----------------------------
# Every vmm/<folder>/*.c is part of the VMM (no per-file list to keep in
# sync), except vmm/guest/, the freestanding guest built above.
VMM_SRCS := $(sort $(filter-out vmm/guest/%,$(wildcard vmm/*/*.c)))
VMM_OBJS := $(VMM_SRCS:%.c=$(B)/%.o) $(B)/vmm/guest/image.o
$(VMM_SRCS:%.c=$(B)/%.o): CFLAGS_BASE += -Ivmm

# ---- CLI -------------------------------------------------------------------
CLI_SRCS := cli/main.c cli/cmd-inspect.c cli/cmd-vmstate-schema.c cli/cmd-ctl.c \
            cli/cmd-vm.c cli/cmd-migrate.c cli/cmd-demo.c
CLI_OBJS := $(CLI_SRCS:%.c=$(B)/%.o) $(VMM_OBJS)
$(CLI_SRCS:%.c=$(B)/%.o): CFLAGS_BASE += -Ivmm

# ---- tests -----------------------------------------------------------------
# The tests themselves are listed explicitly in tests/list.h.
TEST_SRCS := tests/harness.c tests/main.c tests/unit/testdev.c tests/unit/minivm.c \
             tests/e2e/vmproc.c tests/e2e/netns.c \
             $(sort $(wildcard tests/unit/test-*.c tests/e2e/test-*.c))
TEST_OBJS := $(TEST_SRCS:%.c=$(B)/%.o)
$(TEST_OBJS): CFLAGS_BASE += -Ivmm

all: $(B)/libferry.a $(B)/libferry.so $(B)/ferry

$(B)/lib/%.o: lib/%.c
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $<")
	$(Q)$(CC) $(CFLAGS_BASE) $(LIB_CFLAGS) $(CFLAGS) -c -o $@ $<

$(B)/pic/lib/%.o: lib/%.c
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC [pic] $<")
	$(Q)$(CC) $(CFLAGS_BASE) $(LIB_CFLAGS) -fPIC $(CFLAGS) -c -o $@ $<

$(B)/%.o: %.c
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $<")
	$(Q)$(CC) $(CFLAGS_BASE) $(CFLAGS) -c -o $@ $<

$(B)/libferry.a: $(LIB_OBJS)
	@$(if $(Q),echo "  AR      $@")
	$(Q)rm -f $@ && ar rcs $@ $^

# ABI version 1: soname libferry.so.1, symbols versioned FERRY_1
# (lib/libferry.map); the file is libferry.so.ABI.MINOR.PATCH of the ABI.
VERSION    := 0.1.0
ABI        := 1
SO_REAL    := libferry.so.$(ABI).0.0
$(B)/$(SO_REAL): $(LIB_PIC) lib/libferry.map
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -shared -Wl,-soname,libferry.so.$(ABI) \
		-Wl,--version-script,lib/libferry.map -Wl,--no-undefined \
		-o $@ $(LIB_PIC) $(LDFLAGS_SAN) $(LIBS)
$(B)/libferry.so: $(B)/$(SO_REAL)
	$(Q)ln -sf $(SO_REAL) $(B)/libferry.so.$(ABI) && ln -sf libferry.so.$(ABI) $@

$(B)/ferry: $(CLI_OBJS) $(B)/libferry.a
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $(CLI_OBJS) $(B)/libferry.a $(LDFLAGS_SAN) $(LDFLAGS) $(LIBS)

$(B)/ferry-test: $(TEST_OBJS) $(VMM_OBJS) $(B)/libferry.a
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $(TEST_OBJS) $(VMM_OBJS) $(B)/libferry.a $(LDFLAGS_SAN) $(LDFLAGS) $(LIBS)

# ---- tools: the link emulator of tests across hosts -------------------------
# ferry-linkemu (tools/linkemu.c): two network namespaces joined by a TUN
# link shaped in user space (docs/architecture.md, "Tests across hosts").
# `make` builds it, and the test binary needs it, so `make check` does too.
$(B)/ferry-linkemu: $(B)/tools/linkemu.o
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $< $(LDFLAGS_SAN) $(LDFLAGS)
all: $(B)/ferry-linkemu
$(B)/ferry-test: $(B)/ferry-linkemu
# bench-netns: live migration over emulated links (`make bench` runs it).
$(B)/bench-netns: $(B)/bench/bench-netns.o $(B)/bench/benchvm.o $(VMM_OBJS) \
		$(B)/libferry.a | $(B)/ferry-linkemu
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $< $(B)/bench/benchvm.o $(VMM_OBJS) $(B)/libferry.a \
		$(LDFLAGS_SAN) $(LDFLAGS) $(LIBS)
$(B)/bench/bench-netns.o: CFLAGS_BASE += -Ivmm
bench: $(B)/bench-netns

# ---- fuzzing (clang libFuzzer) --------------------------------------------
FUZZ_CFLAGS := -std=gnu11 -O1 -g -D_GNU_SOURCE -Iinclude -Ilib \
               -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
FUZZ_SECONDS ?= 600
FUZZ_SRCS := tests/fuzz/fuzz-load.c tests/unit/testdev.c tests/harness.c $(LIB_SRCS)
$(B)/fuzz-load: $(FUZZ_SRCS) $(wildcard lib/*.h include/ferry/*.h tests/unit/*.h)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  FUZZ-CC $@")
	$(Q)$(CLANG) $(FUZZ_CFLAGS) -o $@ $(FUZZ_SRCS) $(LIBS)

# The control socket's protocol parser (vmm/control/server.c, through
# control_feed(): no socket, no thread): framing, recovery, JSON, dispatch.
FUZZ_CONTROL_SRCS := tests/fuzz/fuzz-control.c vmm/control/server.c $(LIB_SRCS)
$(B)/fuzz-control: $(FUZZ_CONTROL_SRCS) $(wildcard lib/*.h include/ferry/*.h vmm/control/*.h) tests/control-cmds.h
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  FUZZ-CC $@")
	$(Q)$(CLANG) $(FUZZ_CFLAGS) -Ivmm -o $@ $(FUZZ_CONTROL_SRCS) $(LIBS)

# FUZZ_SECONDS for each target.
fuzz: deps $(B)/fuzz-load $(B)/fuzz-control
	@mkdir -p $(B)/fuzz-corpus $(B)/fuzz-corpus-control
	$(B)/fuzz-load -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 \
		$(B)/fuzz-corpus tests/fuzz/seeds
	$(B)/fuzz-control -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 \
		$(B)/fuzz-corpus-control tests/fuzz/seeds-control

fuzz-smoke: $(B)/fuzz-load $(B)/fuzz-control
	@mkdir -p $(B)/fuzz-corpus $(B)/fuzz-corpus-control
	$(Q)$(B)/fuzz-load -max_total_time=$${FUZZ_SMOKE_SECONDS:-10} -rss_limit_mb=2048 \
		-print_final_stats=0 $(B)/fuzz-corpus tests/fuzz/seeds 2>$(B)/fuzz-smoke.log \
		|| { tail -40 $(B)/fuzz-smoke.log; exit 1; }
	@grep -E '^#[0-9]+.*DONE' $(B)/fuzz-smoke.log | tail -1 || true
	$(Q)$(B)/fuzz-control -max_total_time=$${FUZZ_SMOKE_SECONDS:-10} -rss_limit_mb=2048 \
		-print_final_stats=0 $(B)/fuzz-corpus-control tests/fuzz/seeds-control \
		2>$(B)/fuzz-smoke-control.log \
		|| { tail -40 $(B)/fuzz-smoke-control.log; exit 1; }
	@grep -E '^#[0-9]+.*DONE' $(B)/fuzz-smoke-control.log | tail -1 || true

# ---- top-level targets -----------------------------------------------------
deps:
	$(Q)./scripts/install-deps.sh

check: deps
	$(Q)$(MAKE) --no-print-directory all $(B)/ferry-test $(B)/examples/mini-vmm
	$(Q)./scripts/check.sh $(B)

BENCHES := $(B)/bench-stream $(B)/bench-multifd
$(B)/bench-%: $(B)/bench/bench-%.o $(B)/libferry.a
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $< $(B)/libferry.a $(LDFLAGS_SAN) $(LDFLAGS) $(LIBS)

# Benchmarks of the reference VMM link its objects too.
$(B)/bench-dirty: $(B)/bench/bench-dirty.o $(VMM_OBJS) $(B)/libferry.a
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $< $(VMM_OBJS) $(B)/libferry.a $(LDFLAGS_SAN) $(LDFLAGS) $(LIBS)
# Those driving `ferry vm` processes share bench/benchvm.c.
$(B)/bench-migrate $(B)/bench-postcopy $(B)/bench-devices $(B)/bench-devload \
$(B)/bench-tls: $(B)/bench-%: $(B)/bench/bench-%.o \
		$(B)/bench/benchvm.o $(VMM_OBJS) $(B)/libferry.a
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $< $(B)/bench/benchvm.o $(VMM_OBJS) $(B)/libferry.a \
		$(LDFLAGS_SAN) $(LDFLAGS) $(LIBS)
$(B)/bench/bench-dirty.o $(B)/bench/bench-migrate.o $(B)/bench/benchvm.o \
$(B)/bench/bench-postcopy.o $(B)/bench/bench-devices.o \
$(B)/bench/bench-devload.o $(B)/bench/bench-tls.o: CFLAGS_BASE += -Ivmm
BENCHES += $(B)/bench-dirty $(B)/bench-migrate $(B)/bench-postcopy \
	   $(B)/bench-devices $(B)/bench-devload $(B)/bench-tls

bench: deps all $(BENCHES)
	$(Q)./scripts/bench.sh $(B)

demo: deps all
	$(Q)$(B)/ferry demo

# ---- soak: `make soak` (not part of `make check`) ----------------------------
# 1000 live migrations back and forth between two long-lived VMs, a fault
# every 10th, checking bad pages and the processes' RSS and fds
# (bench/soak.c; docs/performance.md, "Soak"). `make check` runs 50 of them
# (tests/e2e/test-soak.c), so the test binary needs ferry-soak too.
# SOAK_FLAGS: more ferry-soak options (-v, --keep, --default-malloc, ...).
SOAK_MIGRATIONS ?= 1000
SOAK_FLAGS ?=
$(B)/ferry-soak: $(B)/bench/soak.o $(B)/bench/benchvm.o $(VMM_OBJS) $(B)/libferry.a
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $< $(B)/bench/benchvm.o $(VMM_OBJS) $(B)/libferry.a \
		$(LDFLAGS_SAN) $(LDFLAGS) $(LIBS)
$(B)/bench/soak.o: CFLAGS_BASE += -Ivmm
$(B)/ferry-test: | $(B)/ferry-soak
soak: deps all $(B)/ferry-soak
	$(Q)$(B)/ferry-soak --ferry $(B)/ferry -n $(SOAK_MIGRATIONS) $(SOAK_FLAGS)
.PHONY: soak

# ---- install ----------------------------------------------------------------
PREFIX  ?= /usr/local
LIBDIR  := $(PREFIX)/lib
INCDIR  := $(PREFIX)/include
install: $(B)/libferry.a $(B)/libferry.so
	$(Q)install -d $(DESTDIR)$(INCDIR)/ferry $(DESTDIR)$(LIBDIR)/pkgconfig
	$(Q)install -m 644 include/ferry/*.h $(DESTDIR)$(INCDIR)/ferry/
	$(Q)install -m 644 $(B)/libferry.a $(DESTDIR)$(LIBDIR)/
	$(Q)install -m 755 $(B)/$(SO_REAL) $(DESTDIR)$(LIBDIR)/
	$(Q)ln -sf $(SO_REAL) $(DESTDIR)$(LIBDIR)/libferry.so.$(ABI)
	$(Q)ln -sf libferry.so.$(ABI) $(DESTDIR)$(LIBDIR)/libferry.so
	$(Q)sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@VERSION@|$(VERSION)|' \
		lib/libferry.pc.in > $(DESTDIR)$(LIBDIR)/pkgconfig/libferry.pc
	@echo "installed libferry $(VERSION) under $(DESTDIR)$(PREFIX)"

# ---- the example VMM, built as its readers would: against the installed
# library, through pkg-config (make check runs it) ---------------------------
EXAMPLE_PREFIX := $(abspath $(B))/install
$(B)/examples/mini-vmm: examples/mini-vmm.c $(B)/libferry.so $(B)/libferry.a
	$(Q)$(MAKE) --no-print-directory -s install PREFIX=$(EXAMPLE_PREFIX) DESTDIR=
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  CC      $@ (pkg-config libferry)")
	$(Q)PKG_CONFIG_PATH=$(EXAMPLE_PREFIX)/lib/pkgconfig; export PKG_CONFIG_PATH; \
	$(CC) -std=gnu11 -O2 -g $(WARN) -D_GNU_SOURCE $(if $(SAN),-fsanitize=$(SAN)) \
		-o $@ $< $$(pkg-config --cflags --libs libferry) \
		-Wl,-rpath,$(EXAMPLE_PREFIX)/lib

clean:
	rm -rf build build-*

.PHONY: all check bench demo fuzz fuzz-smoke clean deps install

-include $(shell find $(B) -name '*.d' 2>/dev/null)
