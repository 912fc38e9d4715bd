# medseg set-up and main commands. Torch is installed first with an overridable pin so a
# plain `pip install -e .` never pulls a multi-GB CUDA build by accident:
#   make test                                   # CPU build (default pin)
#   make demo TORCH_SPEC="torch==2.13.0" ...    # GPU users: pass the CUDA build they want
TORCH_SPEC ?= torch==2.13.0
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MEDSEG := $(VENV)/bin/medseg
DEMO_OUT ?= runs/demo

.PHONY: setup demo test lint clean

setup: $(VENV)/.medseg-installed

$(VENV)/.medseg-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,export]"
	touch $@

# Main job on the embedded default: synthesise the demo phantoms that data_manifest.csv
# names, then compute their lesion statistics and the lesion-distribution curve.
demo: setup
	$(MEDSEG) synth --out demo_data --n 12 --seed 0 --manifest data_manifest.csv
	$(MEDSEG) stats data_manifest.csv --out $(DEMO_OUT)/stats
	@echo "demo finished: results in $(DEMO_OUT)/stats (lesion_curve.png, slice_stats.csv, case_stats.csv)"

test: setup
	@bash scripts/ensure_browser.sh
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check medseg tests benchmarks

clean:
	rm -rf demo_data runs .pytest_cache
