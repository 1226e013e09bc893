# mot — build, test, train.
#   make             build ./mot (the trainer, from train.cu) and the tokenizer tools
#   make check       the edit loop: the core of the suite in under two minutes (gradients, one GPU case,
#                    file formats, links); ends with "N passed, N failed, N skipped" like make test
#   make test        build everything and run every test; ends with "N passed, N failed, N skipped"
#   make dev-tools   the benchmarks and tools in dev/ (listed at DEVTOOLS below)
#   make format      lay out every C++/CUDA file as .clang-format says (make check checks it)
#   (these run dev/setup.sh first, which installs missing Debian packages)
#   make train       the main job: build the default dataset if missing, train, evaluate, sample,
#                    plot, all into the run folder $(RUN); SETTING=transfusion for images by diffusion
#   make bench       CPU benchmark (MoT vs dense step time)
#   make mot_cpu_cuda    the trainer's GPU path run on the CPU by test/cuda_cpu.h (no GPU needed)
#   make roofline    a model of one GPU training step, kernel by kernel (dev/roofline.cpp)
#   make test-asan   the CPU tests built with AddressSanitizer + UBSan (also part of make test)
#   make test-plain  the model tests built with -DMOT_PLAIN, mot.h's fast paths off (also part of make test)
#   make fuzz        every libFuzzer target (clang) for FUZZ_S seconds each (make fuzz FUZZ_S=60)
CXX      ?= g++
# -fno-math-errno lets GCC vectorise sqrt (results are the same: it only drops errno updates)
CXXFLAGS ?= -std=c++17 -O3 -march=native -fopenmp -fno-math-errno -Wall -Wextra
# Warnings: the project's own files compile with none (g++ -Wall -Wextra, clang, nvcc and its host
# compiler). make test and make check build with WERROR=-Werror, so a new warning fails them; a
# plain make does not (another compiler version may warn where this one does not).
WERROR   ?=
CXXFLAGS += $(WERROR)
# nvcc if the CUDA toolkit is installed (on PATH or in /usr/local/cuda), else a g++-only build
NVCC     ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
# CUDA code is compiled for A100 (sm_80) and H100 (sm_90); --threads 0 compiles the two in parallel
NVARCH   ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
NVFLAGS  ?= -std=c++17 -O3 $(NVARCH) --threads 0 -Xcompiler -O3,-march=native,-fopenmp,-fno-math-errno,-Wall -I.
NVFLAGS  += $(if $(WERROR),-Werror all-warnings -Xcompiler -Werror)
# The CUDA libraries are found through an rpath to the toolkit that built the binary, so ./mot runs
# where the toolkit's lib64 is not in the loader's configuration (e.g. a fresh Debian with CUDA).
CUDA_LIBDIR ?= $(abspath $(dir $(NVCC))../lib64)
NVLIBS    = -lcublas -lcublasLt -lgomp $(if $(wildcard $(CUDA_LIBDIR)),-Xlinker -rpath=$(CUDA_LIBDIR))
TOKH      = tokenizers/bpe.h tokenizers/vq.h tokenizers/speech.h
# JPEG is decoded by Debian's libjpeg-turbo (libjpeg62-turbo-dev), PNG by stb_image
JPEGLIBS  = -ljpeg
TESTBINS  = test/test_mot test/test_transfusion test/test_experts test/test_files test/test_bpe test/test_vq test/test_speech test/test_data \
            test/test_crash test/test_cuda_cpu test/test_gpu_cpu
TOOLS     = tokenizers/bpe tokenizers/vq tokenizers/speech
# dev/: bench_cpu (make bench), bench_gemm (the CPU matmul), bench_bpe, bench_vq, bench_speech (the
# tokenizers on real data), diffusion_t (a Transfusion model's error per diffusion step), roofline
# (make roofline), router_grad (the experts' router gradients), bench_gpu (make bench-gpu; with nvcc).
# make dev-tools builds them; make test too.
DEVTOOLS  = dev/bench_cpu dev/bench_gemm dev/bench_bpe dev/bench_vq dev/bench_speech dev/diffusion_t dev/roofline \
            dev/router_grad

# SETTING=transfusion: the main job in the Transfusion setting (images as pixel patches trained by
# diffusion; dev/DESIGN.md, "Transfusion"): its own dataset build (--transfusion, tf_*.bin) and run folder.
SETTING  ?= tokens
ifeq ($(SETTING),transfusion)
DATA     ?= data/default/transfusion
RUN      ?= runs/transfusion
SHARDS    = tf_
BUILD_FLAGS = --transfusion
SETTING_FLAG = --setting transfusion
else ifneq ($(SETTING),tokens)
$(error SETTING must be tokens or transfusion, not '$(SETTING)')
endif
DATA     ?= data/default
RUN      ?= runs/default
# The main job's model. On the CPU reference: D=128, 4 layers, 3,400 steps of 16 x 128 tokens.
# Measured on 2 idle cores (2026-12-02): 3,000 steps took 9 min 4 s from a fresh clone (compile,
# dataset, training, evaluation, plots), 3,400 steps 9 min 32 s without the compile and dataset
# (about 80 s more), so about 10-11 minutes in all; 3,400 because at 3,000 the model's generated
# captions named the class of 0.575 of 200 held-out images against 0.65 at 3,400 (0.6 aimed at).
# With a GPU (nvidia-smi lists one): D=512, 8 layers, T=512.
HAVE_GPU   := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
CPU_TRAIN_FLAGS ?= --layers 4 --dim 128 --heads 4 --seq 128 --batch 16 --steps 3400 --lr 3e-3 --warmup 100 \
                   --eval-every 1000 --eval-items 100 --eval-gen 3 --save-every 500 --log-every 25
GPU_TRAIN_FLAGS ?= --layers 8 --dim 512 --heads 8 --seq 512 --batch 32 --steps 5000 --lr 1e-3 --warmup 200 \
                   --eval-every 500 --eval-items 200 --eval-gen 5 --save-every 500
ifneq ($(NVCC),)
DEVTOOLS += dev/bench_gpu
endif
ifeq ($(HAVE_GPU),1)
TESTBINS += test/test_gpu
TRAIN_FLAGS ?= $(GPU_TRAIN_FLAGS)
else
TRAIN_FLAGS ?= $(CPU_TRAIN_FLAGS)
endif

# Sanitizers: the CPU tests, ./mot and the tools again with ASan + UBSan, in build/asan (the
# tests run there: they call ./mot, tokenizers/* and data/build.sh relative to it).
ASAN_DIR   = build/asan
ASANFLAGS ?= -std=c++17 -O1 -g1 -fopenmp -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all \
             -Wall -Wextra
ASANFLAGS += $(WERROR)
ASAN_TESTS = test/test_mot test/test_transfusion test/test_files test/test_bpe test/test_vq test/test_speech test/test_data test/test_crash
ASANBINS   = $(ASAN_TESTS:%=$(ASAN_DIR)/%) $(ASAN_DIR)/mot $(TOOLS:%=$(ASAN_DIR)/%)
ASANLINKS  = $(ASAN_DIR)/data $(ASAN_DIR)/mot.h $(TOKH:%=$(ASAN_DIR)/%)
# The plain path: the model tests again, built with -DMOT_PLAIN (every fast twin of mot.h's section
# 7 off: the plain matmul, gradient norm, AdamW and router products), in build/plain. The cases
# named "mot ..." are left out: they run the ./mot binary (the trainer's flags and files, which
# make test checks once), not the math.
PLAIN_DIR   = build/plain
PLAIN_TESTS = test/test_mot test/test_experts test/test_transfusion
PLAINBINS   = $(PLAIN_TESTS:%=$(PLAIN_DIR)/%)
PLAIN_RUN   = $(PLAIN_TESTS:%="$(PLAIN_DIR)/% -tce=mot *")
# Fuzzing: libFuzzer targets for every reader (test/fuzz), with ASan + UBSan. make test replays
# their seed corpora and fuzzes each for FUZZ_CI_S seconds; make fuzz for FUZZ_S seconds.
FUZZ_CXX   ?= clang++
FUZZFLAGS  ?= -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -Wall -Wextra -Wno-unknown-pragmas -I.
FUZZFLAGS  += $(WERROR)
FUZZ_S     ?= 60
FUZZ_CI_S  ?= 10
FUZZBINS    = $(patsubst %,test/fuzz/fuzz_%,shard checkpoint debug_state bpe vq_model speech_model wav image)

.PHONY: all test check format test-asan test-plain fuzz train bench bench-gpu roofline test-cuda-asan clean setup dev-tools
all: mot $(TOOLS)

# Installs what is missing (compilers, doctest, stb, gnuplot ...): the one package list is in the
# script. Order-only below: it runs before any compile and never forces a rebuild.
setup:
	@bash dev/setup.sh

mot: train.cu mot.h mot.cu $(TOKH) | setup
ifneq ($(NVCC),)
	$(NVCC) $(NVFLAGS) train.cu -o $@ $(NVLIBS) $(JPEGLIBS)
else
	@echo "nvcc not found: building the CPU-only trainer with $(CXX)"
	$(CXX) $(CXXFLAGS) -x c++ train.cu -o $@ $(JPEGLIBS)
endif

test/%: test/%.cpp mot.h test/common.h $(TOKH) | setup
	$(CXX) $(CXXFLAGS) -I. $< -o $@ $(JPEGLIBS)

tokenizers/%: tokenizers/%.cpp tokenizers/%.h | setup
	$(CXX) $(CXXFLAGS) -I. $< -o $@ $(JPEGLIBS)

# Data parallel over GPUs (NCCL, launched with mpirun): needs Open MPI (libopenmpi-dev openmpi-bin)
MPI_CFLAGS = $(filter -I%,$(shell mpicxx --showme:compile 2>/dev/null))
MPI_LIBS   = $(filter -L% -l%,$(shell mpicxx --showme:link 2>/dev/null))
mot_mpi: train.cu mot.h mot.cu $(TOKH)
	@[ -n "$(NVCC)" ] || { echo "mot_mpi needs nvcc (the CUDA toolkit)"; exit 1; }
	@[ -n "$(MPI_LIBS)" ] || { echo "mot_mpi needs Open MPI: apt-get install libopenmpi-dev openmpi-bin"; exit 1; }
	$(NVCC) $(NVFLAGS) -DMOT_MPI $(MPI_CFLAGS) train.cu -o $@ $(NVLIBS) $(JPEGLIBS) -lnccl $(MPI_LIBS)

test/test_gpu: test/test_gpu.cu mot.cu mot.h test/common.h
	$(NVCC) $(NVFLAGS) $< -o $@ $(NVLIBS)

dev/bench_gpu: dev/bench_gpu.cu mot.cu mot.h
	$(NVCC) $(NVFLAGS) $< -o $@ $(NVLIBS)

dev/roofline: dev/roofline.cpp | setup
	$(CXX) -std=c++17 -O2 -Wall -Wextra $(WERROR) $< -o $@
roofline: dev/roofline
	./dev/roofline

# The CPU tools in dev/ (DEVTOOLS; each file's header says what it measures and how to run it)
dev/%: dev/%.cpp mot.h $(TOKH) | setup
	$(CXX) $(CXXFLAGS) -I. $< -o $@ $(JPEGLIBS)
dev-tools: $(DEVTOOLS)

# ---- the GPU code on the CPU (test/CUDA_CPU.md) -----------------------------------------------------
# test/cuda_cpu.pl copies each .cu to build/cuda_cpu/ with kernel launches, __shared__ and
# __launch_bounds__ rewritten (lines unchanged); g++ compiles the copy with test/cuda_cpu.h
# force-included and links test/cuda_cpu.o, which stands in for libcudart, cuBLAS and NCCL.
CUDA_HOME ?= /usr/local/cuda
CUDA_CPU_OPT  ?= -O2
CUDA_CPU_BASE  = -std=c++17 $(CUDA_CPU_OPT) -g -march=native -fno-math-errno -Wall -Wextra -Wno-unknown-pragmas \
                 -Ibuild/cuda_cpu -I. -I$(CUDA_HOME)/include $(WERROR)
CUDA_CPU_FLAGS = $(CUDA_CPU_BASE) -include test/cuda_cpu.h -fopenmp
CUDA_CPU_HDRS  = test/cuda_cpu.h $(CUDA_HOME)/include/cuda_runtime.h
$(CUDA_HOME)/include/cuda_runtime.h:
	@echo "the CUDA-on-CPU build needs the CUDA toolkit's headers in $(CUDA_HOME)/include (set CUDA_HOME)"; exit 1
build/cuda_cpu/%.cu: %.cu test/cuda_cpu.pl | setup
	@mkdir -p $(dir $@)
	perl test/cuda_cpu.pl $< $@
test/cuda_cpu.o: test/cuda_cpu.cpp $(CUDA_CPU_HDRS) | setup
	$(CXX) $(CUDA_CPU_BASE) -c $< -o $@
test/cuda_cpu_mpi.o: test/cuda_cpu.cpp $(CUDA_CPU_HDRS) | setup
	@[ -n "$(MPI_LIBS)" ] || { echo "needs Open MPI: apt-get install libopenmpi-dev openmpi-bin"; exit 1; }
	$(CXX) $(CUDA_CPU_BASE) -DCUDA_CPU_MPI $(MPI_CFLAGS) -c $< -o $@
# The tests are compiled with -fsanitize=thread for its instrumentation alone: every load and store
# calls a hook, and test/cuda_cpu_race.o answers the hooks with the shared-memory race check
# (libtsan is not linked: the link line has no -fsanitize).
test/cuda_cpu_race.o: test/cuda_cpu.cpp $(CUDA_CPU_HDRS) | setup
	$(CXX) $(CUDA_CPU_BASE) -DCUDA_CPU_RACE -c $< -o $@
test/test_gpu_cpu: build/cuda_cpu/test/test_gpu.cu build/cuda_cpu/mot.cu mot.h test/common.h dev/roofline.cpp test/cuda_cpu_race.o
	$(CXX) $(CUDA_CPU_FLAGS) -fsanitize=thread -x c++ -c $< -o $@.o
	$(CXX) -fopenmp $@.o test/cuda_cpu_race.o -o $@ && rm -f $@.o
test/test_cuda_cpu: build/cuda_cpu/test/test_cuda_cpu.cu test/cuda_cpu_race.o mot mot_cpu_cuda mot_cpu_cuda_mpi
	$(CXX) $(CUDA_CPU_FLAGS) -fsanitize=thread -x c++ -c $< -o $@.o
	$(CXX) -fopenmp $@.o test/cuda_cpu_race.o -o $@ && rm -f $@.o
# The same test under AddressSanitizer + UBSan (device allocations from ASan's malloc: every byte
# past an allocation, and shared arrays' redzones, are caught). About 2 CPU minutes; not part of CI.
test/cuda_cpu_asan.o: test/cuda_cpu.cpp $(CUDA_CPU_HDRS) | setup
	$(CXX) $(CUDA_CPU_BASE) -fsanitize=address,undefined -c $< -o $@
test/test_gpu_cpu_asan: build/cuda_cpu/test/test_gpu.cu build/cuda_cpu/mot.cu mot.h test/common.h dev/roofline.cpp test/cuda_cpu_asan.o
	$(CXX) $(CUDA_CPU_FLAGS) -fsanitize=address,undefined -x c++ $< -x none test/cuda_cpu_asan.o -o $@ $(JPEGLIBS)
test-cuda-asan: test/test_gpu_cpu_asan
	@bash test/run.sh test/test_gpu_cpu_asan

mot_cpu_cuda: build/cuda_cpu/train.cu build/cuda_cpu/mot.cu mot.h $(TOKH) test/cuda_cpu.o
	$(CXX) $(CUDA_CPU_FLAGS) -x c++ $< -x none test/cuda_cpu.o -o $@ $(JPEGLIBS)
mot_cpu_cuda_mpi: build/cuda_cpu/train.cu build/cuda_cpu/mot.cu mot.h $(TOKH) test/cuda_cpu_mpi.o
	$(CXX) $(CUDA_CPU_FLAGS) -DMOT_MPI $(MPI_CFLAGS) -x c++ $< -x none test/cuda_cpu_mpi.o -o $@ $(MPI_LIBS) $(JPEGLIBS)

# make check: the edit loop (README, "The edit loop: make check"): the finite-difference gradient checks
# (dense, MoT, ties, experts, Transfusion), one GPU-through-CPU case, the file formats' round trips
# and refusals, the Markdown files' links and the layout of every file (test/format.sh); under two minutes on 2 cores from a clean tree. Test cases
# named "mot ..." run the ./mot binary and are left to make test (its nvcc build alone is a minute).
CHECK_BINS = test/test_mot test/test_experts test/test_transfusion test/test_files test/test_gpu_cpu
CHECK_RUN  = test/test_mot "test/test_experts -tce=mot *" "test/test_transfusion -tce=mot *" \
             "test/test_files -tc=shard:*,checkpoint:*,debug state*" "test/test_gpu_cpu -tc=gpu: make check*" \
             test/links.sh test/format.sh
check:
	@start=$$(date +%s); \
	if $(MAKE) --no-print-directory -j2 WERROR=-Werror $(CHECK_BINS); then \
	  RUN_START=$$start bash test/run.sh $(CHECK_RUN); \
	else echo "make check: the build failed"; echo "0 passed, 1 failed, 0 skipped"; exit 1; fi

TEST_DEPS = mot $(TOOLS) $(TESTBINS) $(ASANBINS) $(ASANLINKS) $(PLAINBINS) $(FUZZBINS) $(DEVTOOLS)
test: WERROR = -Werror
test: $(TEST_DEPS)
	@FUZZ_S=$(FUZZ_CI_S) bash test/run.sh $(TESTBINS) $(ASAN_TESTS:%=$(ASAN_DIR):%) $(PLAIN_RUN) test/fuzz/run.sh \
	  test/links.sh test/format.sh

test-plain: $(PLAINBINS)
	@bash test/run.sh $(PLAIN_RUN)
$(PLAIN_DIR)/test/%: test/%.cpp mot.h test/common.h $(TOKH) | setup
	@mkdir -p $(@D)
	$(CXX) $(CXXFLAGS) -DMOT_PLAIN -I. $< -o $@ $(JPEGLIBS)

test-asan: $(ASANBINS) $(ASANLINKS)
	@bash test/run.sh $(ASAN_TESTS:%=$(ASAN_DIR):%)

$(ASAN_DIR)/test/%: test/%.cpp mot.h test/common.h $(TOKH) | setup
	@mkdir -p $(@D)
	$(CXX) $(ASANFLAGS) -I. $< -o $@ $(JPEGLIBS)
$(ASAN_DIR)/tokenizers/%: tokenizers/%.cpp tokenizers/%.h | setup
	@mkdir -p $(@D)
	$(CXX) $(ASANFLAGS) -I. $< -o $@ $(JPEGLIBS)
$(ASAN_DIR)/mot: train.cu mot.h $(TOKH) | setup
	@mkdir -p $(@D)
	$(CXX) $(ASANFLAGS) -x c++ train.cu -o $@ $(JPEGLIBS)
$(ASAN_DIR)/data $(ASAN_DIR)/mot.h:
	@mkdir -p $(@D)
	ln -sfn $(CURDIR)/$(@F) $@
$(ASAN_DIR)/tokenizers/%.h:
	@mkdir -p $(@D)
	ln -sfn $(CURDIR)/tokenizers/$(@F) $@

test/fuzz/fuzz_%: test/fuzz/fuzz_%.cpp test/fuzz/fuzz.h mot.h $(TOKH) | setup
	$(FUZZ_CXX) $(FUZZFLAGS) $< -o $@ $(JPEGLIBS)

fuzz: mot $(TOOLS) $(FUZZBINS)
	@FUZZ_S=$(FUZZ_S) bash test/fuzz/run.sh $(FUZZBINS)

$(DATA)/manifest.txt: | setup
	bash data/build.sh $(DATA) $(BUILD_FLAGS)

# OMP_WAIT_POLICY=passive: threads waiting at a barrier sleep instead of spinning. On a machine
# shared with other jobs, spinning threads take the CPU the thread being waited for needs: 2-thread
# training steps measured 3.5-4.4 s with the default policy and 0.5-1.0 s passive (load ~6, 2 cores).
# The trainer's compile and the dataset build run side by side (-j2): each keeps about one core
# busy for its minute, so together they should take about 40 s less than one after the other
# (an estimate: only the whole job was timed, 9 min 4 s at 3,000 steps).
train:
	@$(MAKE) --no-print-directory -j2 mot $(DATA)/manifest.txt
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-passive} ./mot --data '$(DATA)/$(SHARDS)train_*.bin' --val '$(DATA)/$(SHARDS)val_*.bin' $(SETTING_FLAG) \
	      --out $(RUN) --resume $(TRAIN_FLAGS)
	bash dev/plot.sh loss $(RUN)/loss.png MoT=$(RUN)
	bash dev/plot.sh samples $(RUN)
	@echo "run folder: $(RUN) (log.csv, eval.csv, loss.png, model.ckpt, samples/grid.png, samples/speech.wav)"

# One layout for every C++/CUDA file (.clang-format; clang-format 14, Debian 12's): make format
# applies it, test/format.sh (in make check and make test) fails on a file that differs.
format: | setup
	bash test/format.sh --apply

bench: dev/bench_cpu
	./dev/bench_cpu

bench-gpu: dev/bench_gpu
	./dev/bench_gpu

clean:
	rm -f mot mot_mpi mot_cpu_cuda mot_cpu_cuda_mpi $(TESTBINS) test/test_gpu test/test_gpu_cpu_asan $(TOOLS) $(FUZZBINS) \
	      $(DEVTOOLS) dev/bench_gpu test/*.o
	rm -rf build
