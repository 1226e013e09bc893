# mot — build, test, train.   make | make test | make train | make bench
CXX      ?= g++
CXXFLAGS ?= -std=c++17 -O3 -march=native -fopenmp -Wall -Wextra
# nvcc if the CUDA toolkit is installed (on PATH or in /usr/local/cuda), else a g++-only build
NVCC     ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
NVFLAGS  ?= -std=c++17 -O3 -Xcompiler -O3,-march=native,-fopenmp,-Wall -lgomp
TESTBINS  = test/test_mot test/test_files test/test_bpe test/test_vq test/test_speech
TOOLS     = tokenizers/bpe tokenizers/vq tokenizers/speech

.PHONY: all test train bench clean
all: train $(TOOLS)

train: train.cu mot.h
ifneq ($(NVCC),)
	$(NVCC) $(NVFLAGS) train.cu -o $@
else
	@echo "nvcc not found: building the CPU-only trainer with $(CXX)"
	$(CXX) $(CXXFLAGS) -x c++ train.cu -o $@
endif

test/%: test/%.cpp mot.h $(wildcard tokenizers/*.h)
	$(CXX) $(CXXFLAGS) -I. $< -o $@

tokenizers/%: tokenizers/%.cpp tokenizers/%.h
	$(CXX) $(CXXFLAGS) -I. $< -o $@

dev/bench_cpu: dev/bench_cpu.cpp mot.h
	$(CXX) $(CXXFLAGS) -I. $< -o $@

bench: dev/bench_cpu
	./dev/bench_cpu

test: train $(TOOLS) $(TESTBINS)
	@bash test/run.sh $(TESTBINS)

clean:
	rm -f train $(TESTBINS) $(TOOLS) dev/bench_cpu
