# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv from scratch.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DEMO   := CMBDetector/Resources/SampleData/CMBDemo_SWI.nii.gz
OUT    ?= out/demo

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch is pinned: 2.13.0 is the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cmbdetector detect $(DEMO) --modality swi --output-dir $(OUT) --truth CMBDetector/Resources/SampleData/CMBDemo_SWI_truth.json

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/cmbdetector bench

clean:
	rm -rf $(VENV) out
