# blocktf build.
#   make            builds ./train, ./infer, ./prepare and the test binary ./test_blocktf
#   make test       builds and runs every test (GPU cases report "skipped" on a machine without a GPU)
#   make clean
# Knobs (pinned defaults, printed at the start of every build, overridable on the command line):
#   GPU_ARCH   compute capability to compile for: 90 = Hopper (H100/H200). No autodetection: a silent
#              fallback to JIT-compiled PTX is worse than a clear mismatch error.
#   PRECISION  BF16 (bf16 weights/activations, fp32 master weights) or FP32 (everything fp32, for testing).
#   DATA_DIR   where the shared data lives (tokenizer, texts, shards); tests read it from there.
GPU_ARCH  ?= 90
PRECISION ?= BF16
DATA_DIR  ?= ../shared/data
NVCC      ?= nvcc

ifeq ($(filter $(PRECISION),BF16 FP32),)
  $(error PRECISION must be BF16 or FP32, not '$(PRECISION)')
endif

BUILD      := build
NVCC_FLAGS := -std=c++17 -O2 -arch=sm_$(GPU_ARCH) -DBLOCKTF_PRECISION_$(PRECISION) \
              -Xcompiler -Wall,-Wextra -Xcudafe --display_error_number -I.
# Test binaries link only what a machine without a GPU driver has: the CUDA runtime (static), cuBLAS and cuBLASLt.
LIBS       := -lcublas -lcublasLt

$(info blocktf build: GPU_ARCH=$(GPU_ARCH) PRECISION=$(PRECISION) DATA_DIR=$(DATA_DIR))
$(info blocktf build: $(NVCC) $(NVCC_FLAGS) ... $(LIBS))

# Every object depends on the flags, so switching PRECISION or GPU_ARCH rebuilds everything.
FLAGS_STAMP := $(BUILD)/flags.txt
$(shell mkdir -p $(BUILD)/test && echo '$(NVCC) $(NVCC_FLAGS) $(LIBS)' | cmp -s - $(FLAGS_STAMP) \
        || echo '$(NVCC) $(NVCC_FLAGS) $(LIBS)' > $(FLAGS_STAMP))

PROGRAMS   := train infer prepare
TEST_SRCS  := $(wildcard test/*.cpp test/*.cu)
TEST_OBJS  := $(patsubst %,$(BUILD)/%.o,$(TEST_SRCS))

.PHONY: all test clean
all: $(PROGRAMS) test_blocktf

$(BUILD)/%.o: % $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCC_FLAGS) -MMD -MP -c $< -o $@

train: $(BUILD)/train.cu.o
	$(NVCC) $(NVCC_FLAGS) $^ -o $@ $(LIBS)
infer: $(BUILD)/infer.cu.o
	$(NVCC) $(NVCC_FLAGS) $^ -o $@ $(LIBS)
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
