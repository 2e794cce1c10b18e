# blocktf build.
#   make            builds ./train, ./infer, ./prepare and the test binary ./test_blocktf
#   make test       builds and runs every test (GPU cases report "skipped" on a machine without a GPU)
#   make train      builds and runs the main training job (TRAIN_ARGS) on one GPU
#   make infer      builds and samples from the checkpoint that `make train` wrote (INFER_ARGS)
#   make clean
# Knobs (pinned defaults, printed at the start of every build, overridable on the command line):
#   GPU_ARCH   compute capability to compile for: 90a = Hopper (H100/H200) with its architecture-specific
#              instructions (wgmma, which the head-size-64 flash attention uses); 90 builds without them.
#              Machine code only, no PTX: a silent JIT fallback is worse than a clear mismatch error.
#   PRECISION  BF16 (bf16 weights/activations, fp32 master weights) or FP32 (everything fp32, for testing).
#   DATA_DIR   where the shared data lives (tokenizer, texts, shards); tests read it from there.
GPU_ARCH  ?= 90a
PRECISION ?= BF16
DATA_DIR  ?= ../shared/data
NVCC      ?= nvcc

ifeq ($(filter $(PRECISION),BF16 FP32),)
  $(error PRECISION must be BF16 or FP32, not '$(PRECISION)')
endif

BUILD      := build
NVCC_FLAGS := -std=c++17 -O2 -gencode arch=compute_$(GPU_ARCH),code=sm_$(GPU_ARCH) -DBLOCKTF_PRECISION_$(PRECISION) \
              $(if $(filter 90a,$(GPU_ARCH)),-DBLOCKTF_SM90A) -Xcompiler -Wall,-Wextra -Xcudafe --display_error_number -I.
# Test binaries link only what a machine without a GPU driver has: the CUDA runtime (static), cuBLAS and cuBLASLt.
LIBS       := -lcublas -lcublasLt

$(info blocktf build: GPU_ARCH=$(GPU_ARCH) PRECISION=$(PRECISION) DATA_DIR=$(DATA_DIR))
$(info blocktf build: $(NVCC) $(NVCC_FLAGS) ... $(LIBS))

# Every object depends on the flags, so switching PRECISION or GPU_ARCH rebuilds everything.
FLAGS_STAMP := $(BUILD)/flags.txt
$(shell mkdir -p $(BUILD)/test && echo '$(NVCC) $(NVCC_FLAGS) $(LIBS)' | cmp -s - $(FLAGS_STAMP) \
        || echo '$(NVCC) $(NVCC_FLAGS) $(LIBS)' > $(FLAGS_STAMP))

PROGRAMS   := train infer prepare
# `make train` and `make infer` run the programs, so their binaries are built under build/bin/ and
# ./train, ./infer are symlinks to them.
BIN        := $(BUILD)/bin
# `make train` prepares the shipped texts into a training shard and a held-out validation shard (one book), then
# trains CONFIG for a few minutes; `make infer` samples from the checkpoint it wrote. CONFIG=vanilla_31 trains the
# vanilla baseline.
CONFIG     ?= block_main_b4_5
TEXT_DIR   := $(DATA_DIR)/text
VAL_TEXT   := $(TEXT_DIR)/gutenberg/pg84-frankenstein.txt
TRAIN_TEXT := $(TEXT_DIR)/tinyshakespeare.txt $(TEXT_DIR)/enwik8-first100.txt \
              $(filter-out $(VAL_TEXT),$(sort $(wildcard $(TEXT_DIR)/gutenberg/*.txt)))
TOKENIZER  := $(DATA_DIR)/tokenizer/pythia-tokenizer.json
# A second `make train` continues the run in out/CONFIG (after Ctrl-C, say) instead of starting over.
# STEPS sets the length (300 updates: about 30 s for the block default on an H200, 80 s for vanilla_31); the
# 10-minute runs of README.md's loss curves set STEPS, VAL_INTERVAL, CHECKPOINT_INTERVAL and OUT_DIR.
STEPS               ?= 300
VAL_INTERVAL        ?= 25
CHECKPOINT_INTERVAL ?= 100
OUT_DIR             ?= out/$(CONFIG)
TRAIN_ARGS ?= --config $(CONFIG) --data out/data/train --val-data out/data/val --out $(OUT_DIR) \
              $(if $(wildcard $(OUT_DIR)/checkpoint-*),--resume $(OUT_DIR)) \
              --steps $(STEPS) --warmup 30 --batch-size 64 --micro-batch 32 --val-interval $(VAL_INTERVAL) \
              --checkpoint-interval $(CHECKPOINT_INTERVAL)
INFER_ARGS ?= --checkpoint out/$(CONFIG) --tokenizer $(TOKENIZER) --prompt "It was a dark and stormy night" --max-new-tokens 64

TEST_SRCS  := $(wildcard test/*.cpp test/*.cu)
TEST_OBJS  := $(patsubst %,$(BUILD)/%.o,$(TEST_SRCS))

.PHONY: all test clean train infer
.SECONDARY:   # keep the objects of every program between builds
all: $(BIN)/train $(BIN)/infer prepare test_blocktf

$(BUILD)/%.o: % $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCC_FLAGS) -MMD -MP -c $< -o $@

$(BIN)/%: $(BUILD)/%.cu.o
	@mkdir -p $(BIN)
	$(NVCC) $(NVCC_FLAGS) $^ -o $@ $(LIBS)
	ln -sf $@ $*

out/data/train.idx out/data/val.idx &: prepare
	@mkdir -p out/data
	BLOCKTF_DATA_DIR=$(DATA_DIR) ./prepare --out out/data/train $(TRAIN_TEXT)
	BLOCKTF_DATA_DIR=$(DATA_DIR) ./prepare --out out/data/val $(VAL_TEXT)
train: $(BIN)/train out/data/train.idx out/data/val.idx
	./train $(TRAIN_ARGS)
infer: $(BIN)/infer
	./infer $(INFER_ARGS)
prepare: $(BUILD)/prepare.cpp.o
	$(NVCC) $(NVCC_FLAGS) $^ -o $@
test_blocktf: $(TEST_OBJS)
	$(NVCC) $(NVCC_FLAGS) $^ -o $@ $(LIBS)

# The test binary runs from the repository root (fixtures are under test/fixtures).
test: test_blocktf
	BLOCKTF_DATA_DIR=$(DATA_DIR) ./test_blocktf $(TEST_ARGS)

clean:
	rm -rf $(BUILD) $(PROGRAMS) test_blocktf

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
