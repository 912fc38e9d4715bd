# medseg set-up and main commands. Torch is installed first with an overridable pin so a
# plain `pip install -e .` never pulls a multi-GB CUDA build by accident:
#   make test                                   # CPU build (default pin)
#   make demo TORCH_SPEC="torch==2.13.0" ...    # GPU users: pass the CUDA build they want
TORCH_SPEC ?= torch==2.13.0
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MEDSEG := $(VENV)/bin/medseg

.PHONY: setup demo test test-slow test-all lint clean

setup: $(VENV)/.medseg-installed

$(VENV)/.medseg-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,export,fast]"
	touch $@

# Main job on the embedded default: the demo pipeline (synthetic phantoms -> statistics ->
# training -> inference -> evaluation -> HTML report). It prints where the report is.
demo: setup
	$(MEDSEG) run pipelines/demo.yaml

# The suite without the tests marked slow (subprocess pipelines, kill-and-resume, real-data
# training: each over ~20 s); `make test-slow` runs those, `make test-all` both. CI runs both.
test: setup
	@bash scripts/ensure_browser.sh
	@bash scripts/ensure_orthanc.sh
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	@bash scripts/ensure_browser.sh
	@bash scripts/ensure_orthanc.sh
	$(PY) -m pytest -q -m slow

test-all: test test-slow

lint: setup
	$(VENV)/bin/ruff check medseg tests benchmarks

clean:
	rm -rf demo_data runs .pytest_cache
