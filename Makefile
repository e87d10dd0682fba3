# moe: a Mixture-of-Experts transformer engine in C.
#   make            build libmoe and the moe command
#   make demo       install what is missing, build, make the corpus, train, generate
#   make test       install what is missing, build, run the whole test suite
#   make bench      measure against PyTorch and the machine's own peak
#   SANITIZE=address,undefined   sanitizer build (into build-san/)
CC      ?= gcc
OPT     ?= -O2 -march=native -fno-math-errno -fvect-cost-model=dynamic
CFLAGS  ?=
CFLAGS  += -std=c11 -D_GNU_SOURCE $(OPT) -g -fopenmp -Wall -Wextra -Wno-unused-parameter \
           -fno-fast-math -fvisibility=hidden -Iinclude -Isrc
LDLIBS  += -lm -fopenmp
BUILD   ?= build
ifneq ($(SANITIZE),)
  BUILD   := build-san
  CFLAGS  += -fsanitize=$(SANITIZE) -fno-omit-frame-pointer -O1
  LDLIBS  += -fsanitize=$(SANITIZE)
endif

LIB_SRC   := $(sort $(wildcard src/*/*.c))
LIB_OBJ   := $(LIB_SRC:%.c=$(BUILD)/%.o)
CLI_SRC   := $(sort $(wildcard tools/moe/*.c))
CLI_OBJ   := $(CLI_SRC:%.c=$(BUILD)/%.o)
TEST_SRC  := $(sort $(wildcard tests/test_*.c))
TEST_BIN  := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
BENCH_SRC := $(sort $(wildcard bench/*.c))
BENCH_BIN := $(BENCH_SRC:bench/%.c=$(BUILD)/bench/%)
HEADERS   := include/moe.h $(wildcard src/*/*.h) $(wildcard tests/*.h)

.PHONY: all demo test test-bins bench setup corpus corpus-small clean
all: $(BUILD)/moe

$(BUILD)/%.o: %.c $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/libmoe.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/moe: $(CLI_OBJ) $(BUILD)/libmoe.a
	$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/tests/%: tests/%.c $(BUILD)/libmoe.a $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Itests -o $@ $< $(BUILD)/libmoe.a $(LDLIBS)

$(BUILD)/bench/%: bench/%.c $(BUILD)/libmoe.a $(HEADERS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libmoe.a $(LDLIBS)

setup:
	@scripts/setup.sh

corpus-small: setup
	@scripts/build_corpus.sh --small

corpus: setup
	@scripts/build_corpus.sh

test-bins: $(BUILD)/moe $(TEST_BIN)

test: setup corpus-small
	@$(MAKE) --no-print-directory test-bins
	@BUILD=$(BUILD) tests/run.sh

demo: setup corpus-small all
	@scripts/demo.sh

bench: setup corpus-small all $(BENCH_BIN)
	@BUILD=$(BUILD) bench/run.sh

clean:
	rm -rf build build-san
