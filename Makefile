# ferry - one non-recursive GNU Makefile.
#
#   make            libferry.a, libferry.so and the ferry binary (in build/)
#   make check      install missing deps, build, run every test
#   make bench      benchmarks (figures printed)
#   make demo       install missing deps, build, run the end-to-end demo
#   make fuzz       longer libFuzzer run of the stream loader
#
# Knobs: V=1 (echo commands), SAN=address|undefined|thread, WERROR=0, O=2.

O      ?= 2
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

LIBS := -lzstd -ljansson -lxxhash -lpthread

ifeq ($(V),1)
Q :=
else
Q := @
endif

# ---- library ---------------------------------------------------------------
LIB_SRCS := lib/error.c lib/channel.c lib/stream.c lib/vmstate.c \
            lib/registry.c lib/save.c lib/load.c lib/describe.c \
            lib/transport.c
LIB_OBJS := $(LIB_SRCS:%.c=$(B)/%.o)
LIB_PIC  := $(LIB_SRCS:%.c=$(B)/pic/%.o)
LIB_CFLAGS := -DFERRY_BUILDING_LIBRARY -fvisibility=hidden

# ---- CLI -------------------------------------------------------------------
# ---- reference VMM (linked into the ferry binary) ----------------------------
VMM_SRCS := vmm/devices.c
VMM_OBJS := $(VMM_SRCS:%.c=$(B)/%.o)

# ---- CLI -------------------------------------------------------------------
CLI_SRCS := cli/main.c cli/cmd-inspect.c cli/cmd-vmstate-schema.c
CLI_OBJS := $(CLI_SRCS:%.c=$(B)/%.o) $(VMM_OBJS)
$(CLI_SRCS:%.c=$(B)/%.o): CFLAGS_BASE += -Ivmm

# ---- tests -----------------------------------------------------------------
TEST_SRCS := tests/harness.c tests/main.c \
             tests/unit/test-channel.c tests/unit/test-stream.c \
             tests/unit/test-vmstate.c tests/unit/test-migration.c \
             tests/unit/test-hostile.c tests/unit/test-transport.c \
             tests/unit/test-cli.c tests/unit/testdev.c
TEST_OBJS := $(TEST_SRCS:%.c=$(B)/%.o)

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

$(B)/libferry.so: $(LIB_PIC)
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -shared -Wl,-soname,libferry.so.0 -o $@ $^ $(LDFLAGS_SAN) $(LIBS)

$(B)/ferry: $(CLI_OBJS) $(B)/libferry.a
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $(CLI_OBJS) $(B)/libferry.a $(LDFLAGS_SAN) $(LDFLAGS) $(LIBS)

$(B)/ferry-test: $(TEST_OBJS) $(B)/libferry.a
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $(TEST_OBJS) $(B)/libferry.a $(LDFLAGS_SAN) $(LDFLAGS) $(LIBS)

# ---- fuzzing (clang libFuzzer) --------------------------------------------
FUZZ_CFLAGS := -std=gnu11 -O1 -g -D_GNU_SOURCE -Iinclude -Ilib \
               -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
FUZZ_SECONDS ?= 600
FUZZ_SRCS := tests/fuzz/fuzz-load.c tests/unit/testdev.c tests/harness.c $(LIB_SRCS)
$(B)/fuzz-load: $(FUZZ_SRCS) $(wildcard lib/*.h include/ferry/*.h tests/unit/*.h)
	@mkdir -p $(dir $@)
	@$(if $(Q),echo "  FUZZ-CC $@")
	$(Q)$(CLANG) $(FUZZ_CFLAGS) -o $@ $(FUZZ_SRCS) $(LIBS)

fuzz: deps $(B)/fuzz-load
	@mkdir -p $(B)/fuzz-corpus
	$(B)/fuzz-load -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 \
		$(B)/fuzz-corpus tests/fuzz/seeds

fuzz-smoke: $(B)/fuzz-load
	@mkdir -p $(B)/fuzz-corpus
	$(Q)$(B)/fuzz-load -max_total_time=$${FUZZ_SMOKE_SECONDS:-10} -rss_limit_mb=2048 \
		-print_final_stats=0 $(B)/fuzz-corpus tests/fuzz/seeds 2>$(B)/fuzz-smoke.log \
		|| { tail -40 $(B)/fuzz-smoke.log; exit 1; }
	@grep -E '^#[0-9]+.*DONE' $(B)/fuzz-smoke.log | tail -1 || true

# ---- top-level targets -----------------------------------------------------
deps:
	$(Q)./scripts/install-deps.sh

check: deps
	$(Q)$(MAKE) --no-print-directory all $(B)/ferry-test
	$(Q)./scripts/check.sh $(B)

BENCHES := $(B)/bench-stream
$(B)/bench-%: $(B)/bench/bench-%.o $(B)/libferry.a
	@$(if $(Q),echo "  LD      $@")
	$(Q)$(CC) -o $@ $< $(B)/libferry.a $(LDFLAGS_SAN) $(LDFLAGS) $(LIBS)

bench: deps all $(BENCHES)
	$(Q)./scripts/bench.sh $(B)

# Until the live demo lands (issue 4): save/restore of the test VM, then
# decode a saved stream.
demo: deps all $(B)/ferry-test
	$(Q)FERRY_BIN=$(B)/ferry $(B)/ferry-test --filter migration_file_roundtrip
	$(Q)$(B)/ferry inspect tests/fuzz/seeds/small-vm.ferry

clean:
	rm -rf build build-*

.PHONY: all check bench demo fuzz fuzz-smoke clean deps

-include $(shell find $(B) -name '*.d' 2>/dev/null)
