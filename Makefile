# mot — build, test, train.   make | make test | make train | make bench
CXX      ?= g++
CXXFLAGS ?= -std=c++17 -O3 -march=native -fopenmp -Wall -Wextra
# nvcc if the CUDA toolkit is installed (on PATH or in /usr/local/cuda), else a g++-only build
NVCC     ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
NVFLAGS  ?= -std=c++17 -O3 -Xcompiler -O3,-march=native,-fopenmp,-Wall -lgomp
TESTBINS  = test/test_mot test/test_files

.PHONY: all test train bench clean
all: train

train: train.cu mot.h
ifneq ($(NVCC),)
	$(NVCC) $(NVFLAGS) train.cu -o $@
else
	@echo "nvcc not found: building the CPU-only trainer with $(CXX)"
	$(CXX) $(CXXFLAGS) -x c++ train.cu -o $@
endif

test/%: test/%.cpp mot.h
	$(CXX) $(CXXFLAGS) -I. $< -o $@

test: train $(TESTBINS)
	@bash test/run.sh $(TESTBINS)

clean:
	rm -f train $(TESTBINS) dev/bench_cpu
