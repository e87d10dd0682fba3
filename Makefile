# moe: a Mixture-of-Experts transformer engine in C.
#   make            build libmoe and the moe command
#   make demo       install what is missing, build, make the corpus, train, generate
#   make test       install what is missing, build, run the whole test suite
#   make bench      measure against PyTorch and the machine's own peak
#   make fuzz       libFuzzer + ASan + UBSan on every target in tests/fuzz/ (clang;
#                   FUZZ_SECONDS per target, default 60; FUZZ_TARGETS to pick some)
#   SANITIZE=address,undefined   sanitizer build (into build-san/)
#   MPI=1           the distributed moe (mpicc, into build-mpi/; docs/distributed.md)
CC      ?= gcc
OPT     ?= -O2 -march=native -fno-math-errno -fvect-cost-model=dynamic
CFLAGS  ?=
# -fno-fast-math goes before OPT: placed after it, it would turn -fno-math-errno
# back off, and every sqrtf would stay a scalar call with an errno check
CFLAGS  += -std=c11 -D_GNU_SOURCE -fno-fast-math $(OPT) -g -fopenmp -Wall -Wextra \
           -Wmissing-prototypes -Wno-unused-parameter -fvisibility=hidden -Iinclude -Isrc
LDLIBS  += -lm -fopenmp
BUILD   ?= build
ifneq ($(SANITIZE),)
  BUILD   := build-san
  CFLAGS  += -fsanitize=$(SANITIZE) -fno-sanitize-recover=all -fno-omit-frame-pointer -O1
  LDLIBS  += -fsanitize=$(SANITIZE)
endif

# src/dist: dist_mpi.c with MPI=1, its single-rank stand-in dist_local.c otherwise
ifeq ($(MPI),1)
  BUILD   := build-mpi$(if $(SANITIZE),-san)
  CC      := mpicc
  CFLAGS  += -DMOE_MPI
  DIST_OUT := src/dist/dist_local.c
else
  DIST_OUT := src/dist/dist_mpi.c
endif

LIB_SRC   := $(filter-out $(DIST_OUT),$(sort $(wildcard src/*/*.c)))
LIB_OBJ   := $(LIB_SRC:%.c=$(BUILD)/%.o)
CLI_SRC   := $(sort $(wildcard tools/moe/*.c))
CLI_OBJ   := $(CLI_SRC:%.c=$(BUILD)/%.o)
TEST_SRC  := $(sort $(wildcard tests/test_*.c))
TEST_BIN  := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
CLI_LIB_OBJ := $(filter-out %/main.o,$(CLI_OBJ))
# fuzz targets: tests/fuzz/fuzz_NAME.c with seeds in tests/fuzz/NAME/
FUZZ_SRC  := $(sort $(wildcard tests/fuzz/fuzz_*.c))
FUZZ_ALL  := $(FUZZ_SRC:tests/fuzz/fuzz_%.c=%)
REPLAY_BIN := $(FUZZ_ALL:%=$(BUILD)/fuzz/fuzz_%)
BENCH_SRC := $(sort $(wildcard bench/*.c))
BENCH_BIN := $(BENCH_SRC:bench/%.c=$(BUILD)/bench/%)
HEADERS   := include/moe.h $(wildcard src/*/*.h) $(wildcard tests/*.h)

.PHONY: all demo test test-bins bench setup corpus corpus-small clean fuzz fuzz-bins valgrind experiments experiments-scale
all: $(BUILD)/moe

$(BUILD)/%.o: %.c $(HEADERS) Makefile
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

# the quantised tiles index small arrays of vectors by compile-time loop
# counters, and the llama.cpp-order kernels (ops.c, attention.c) keep 16
# scalar lanes: -O2 leaves those loops (the arrays on the stack, the lanes
# scalar), -O3 unrolls and vectorises them. Same operations, so the same
# bits: -std=c11 contracts nothing, and nothing is reassociated.
$(BUILD)/src/kernels/quant_avx512.o $(BUILD)/src/kernels/ops.o $(BUILD)/src/kernels/attention.o: CFLAGS += -O3

$(BUILD)/libmoe.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/moe: $(CLI_OBJ) $(BUILD)/libmoe.a
	$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/tests/%: tests/%.c $(BUILD)/libmoe.a $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests -o $@ $< $(BUILD)/libmoe.a $(LDLIBS)

$(BUILD)/libmoecli.a: $(CLI_LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

# each fuzz target as a plain program replaying files and directories
$(BUILD)/fuzz/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/replay.c tests/fuzz/fuzz.h $(BUILD)/libmoecli.a $(BUILD)/libmoe.a $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests/fuzz -Itools/moe -o $@ $< tests/fuzz/replay.c $(BUILD)/libmoecli.a $(BUILD)/libmoe.a $(LDLIBS)

$(BUILD)/bench/%: bench/%.c $(BUILD)/libmoe.a $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libmoe.a $(LDLIBS)

setup:
	@scripts/setup.sh

corpus-small: setup
	@scripts/build_corpus.sh --small

corpus: setup
	@scripts/build_corpus.sh

# the distributed moe (build-mpi/) beside the plain one, where MPI is installed
MPI_TOO = if [ -z "$(MPI)" ] && command -v mpicc >/dev/null; then $(MAKE) --no-print-directory MPI=1 SANITIZE= all; fi

test-bins: $(BUILD)/moe $(TEST_BIN) $(REPLAY_BIN)

test: setup corpus-small
	@$(MAKE) --no-print-directory test-bins
	@$(MPI_TOO)
	@BUILD=$(BUILD) tests/run.sh

demo: setup corpus-small all
	@scripts/demo.sh

bench: setup corpus-small all $(BENCH_BIN)
	@$(MPI_TOO)
	@BUILD=$(BUILD) bench/run.sh

# ---- fuzzing: clang, libFuzzer, ASan, UBSan; objects in build-fuzz/ ----
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= $(FUZZ_ALL)
FUZZ_DIR     := build-fuzz
FUZZ_FLAGS   := -std=c11 -D_GNU_SOURCE -O1 -g -march=native -fno-math-errno -fopenmp \
                -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all \
                -Wno-pass-failed -Iinclude -Isrc -Itools/moe -Itests/fuzz
FUZZ_LIB_OBJ := $(LIB_SRC:%.c=$(FUZZ_DIR)/%.o) $(CLI_LIB_OBJ:$(BUILD)/%=$(FUZZ_DIR)/%)
FUZZ_BIN     := $(FUZZ_ALL:%=$(FUZZ_DIR)/fuzz_%)

$(FUZZ_DIR)/%.o: %.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_FLAGS) -fsanitize=fuzzer-no-link -c $< -o $@

$(FUZZ_DIR)/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz.h $(FUZZ_LIB_OBJ)
	$(FUZZ_CC) $(FUZZ_FLAGS) -fsanitize=fuzzer -o $@ $< $(FUZZ_LIB_OBJ) -lm

.SECONDARY: $(FUZZ_LIB_OBJ)
fuzz-bins: $(FUZZ_BIN)

# New inputs go to build-fuzz/corpus/NAME (seeds are read from tests/fuzz/NAME);
# a crash leaves build-fuzz/NAME-crash-* and stops. Totals: build-fuzz/stats.
fuzz: $(FUZZ_TARGETS:%=$(FUZZ_DIR)/fuzz_%)
	@set -e; for t in $(FUZZ_TARGETS); do \
	    mkdir -p $(FUZZ_DIR)/corpus/$$t tests/fuzz/$$t; \
	    echo "fuzz $$t: $(FUZZ_SECONDS) s"; \
	    ASAN_OPTIONS=detect_leaks=1 OMP_NUM_THREADS=1 $(FUZZ_DIR)/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) \
	        -timeout=20 -rss_limit_mb=2048 -max_len=65536 -close_fd_mask=3 -print_final_stats=1 \
	        -artifact_prefix=$(FUZZ_DIR)/$$t- $(FUZZ_DIR)/corpus/$$t tests/fuzz/$$t \
	        >$(FUZZ_DIR)/$$t.log 2>&1 || { tail -n 60 $(FUZZ_DIR)/$$t.log; exit 1; }; \
	    runs=$$(sed -n 's/^stat::number_of_executed_units: *//p' $(FUZZ_DIR)/$$t.log); \
	    echo "  $$runs executions, $$(ls $(FUZZ_DIR)/corpus/$$t | wc -l) new corpus files"; \
	    echo "$$(date -u +%FT%TZ) $$t $(FUZZ_SECONDS)s $$runs" >>$(FUZZ_DIR)/stats; \
	done

# memcheck on a baseline x86-64 build (valgrind cannot decode AVX-512)
valgrind: setup
	@$(MAKE) --no-print-directory BUILD=build-vg OPT="-O1 -march=x86-64-v2" build-vg/moe
	@tests/valgrind.sh build-vg/moe

clean:
	rm -rf build build-san build-fuzz build-vg build-mpi build-mpi-san

# issue 3: MoE vs dense, routing collapse, granularity (about an hour); writes docs/experiments.md
experiments: all corpus-small
	@/usr/bin/python3 scripts/experiments.py

# issue 11: experiments 1 and 3 at 24.6M tokens per run on the full corpus, 3 seeds (about 7
# hours on 2 cores); resumable: run it again after any interruption. Writes docs/experiments-scale.md
experiments-scale: all corpus
	@/usr/bin/python3 scripts/experiments.py --scale
