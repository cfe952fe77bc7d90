# Two commands do all the set-up: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VITSPEC := $(VENV)/bin/vitspec
# Everything CI installs is pinned here; regenerate with `make lock`.
CONSTRAINTS := constraints.txt
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -q -c $(CONSTRAINTS)

.PHONY: demo test lint pytest install lock bench cases docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install when the project's metadata or the pins change (the stamp remembers).
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP_INSTALL) -e ".[all,test]"
	@touch $@

install: $(VENV)/.installed

demo: install
	$(VITSPEC) validate examples/mnist.yaml examples/vit-b16.yaml
	$(VITSPEC) layout examples/mnist.yaml
	$(PY) examples/reference_demo.py

lint: install
	$(VENV)/bin/ruff check .

pytest: install
	$(VENV)/bin/pytest

test: lint pytest

lock: | $(PY)
	$(PY) -m pip install -q -e ".[all,test]"
	$(PY) -m pip freeze --exclude-editable | grep -vi '^vitspec' > $(CONSTRAINTS)

# Regenerate the conformance corpus from the float64 reference (`--check` only compares).
cases: install
	$(PY) -m vitspec.conformance.generate

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
