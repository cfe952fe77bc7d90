# Two commands do all the set-up: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VITSPEC := $(VENV)/bin/vitspec
# Everything CI installs is pinned here; regenerate with `make lock`.
CONSTRAINTS := constraints.txt
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -q -c $(CONSTRAINTS)

.PHONY: demo test test-core lint typecheck pytest install lock bench cases docs clean mutants fuzz

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install when the project's metadata or the pins change (the stamp remembers).
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP_INSTALL) -e ".[all,test]"
	@touch $@

install: $(VENV)/.installed

# The main job on a spec shipped in the repo: one set of weights, built natively in each framework
# and checked against the float64 reference; then a conversion to timm's layout. Outputs in out/.
demo: install
	@mkdir -p out
	$(VITSPEC) validate examples/mnist.yaml examples/vit-b16.yaml
	$(VITSPEC) build --backend torch examples/mnist.yaml --check --out out/mnist.safetensors --force
	$(VITSPEC) build --backend tensorflow examples/mnist.yaml --weights out/mnist.safetensors --check
	$(VITSPEC) build --backend jax examples/mnist.yaml --weights out/mnist.safetensors --check
	$(VITSPEC) convert out/mnist.safetensors out/mnist_timm.safetensors --to timm --force
	$(VITSPEC) diff --backend torch --backend jax examples/mnist.yaml --weights out/mnist.safetensors

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy sees the installed layout (backends/ as vitspec/backends ...) through a tree of links.
TYPECHECK_TREE := build/typecheck
typecheck: install
	rm -rf $(TYPECHECK_TREE) && mkdir -p $(TYPECHECK_TREE)/vitspec
	ln -s $(CURDIR)/vitspec/* $(TYPECHECK_TREE)/vitspec/
	ln -s $(CURDIR)/backends $(TYPECHECK_TREE)/vitspec/backends
	ln -s $(CURDIR)/conformance $(TYPECHECK_TREE)/vitspec/conformance
	ln -s $(CURDIR)/cli $(TYPECHECK_TREE)/vitspec/cli
	cd $(TYPECHECK_TREE) && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml --cache-dir $(CURDIR)/.mypy_cache

# Every framework and peer library is installed here, so a skipped test fails the run.
pytest: install
	VITSPEC_REQUIRE_ALL=1 $(VENV)/bin/pytest

test: lint typecheck pytest

# The core alone (no framework, no peer library): framework tests skip, each saying which and why.
CORE_VENV ?= .venv-core
test-core:
	test -x $(CORE_VENV)/bin/python || $(PYTHON) -m venv $(CORE_VENV)
	$(CORE_VENV)/bin/python -m pip install --disable-pip-version-check -q -c $(CONSTRAINTS) -e ".[test-core]"
	$(CORE_VENV)/bin/pytest -rs

lock: | $(PY)
	$(PY) -m pip install -q -e ".[all,test]"
	$(PY) -m pip freeze --exclude-editable | grep -vi '^vitspec' > $(CONSTRAINTS)

# Mutation testing (cosmic-ray), one part at a time; not part of `make test` (minutes per part).
# Prints the kill rate per module and every survivor. Parts: see PARTS in tests/mutants/run.py.
PART ?= spec
mutants: install
	$(PIP_INSTALL) -e ".[mutants]"
	nice -n 10 $(PY) tests/mutants/run.py $(PART)

# Fuzzing every file reader (tests/fuzz, docs/reliability.md): FUZZ_EXAMPLES inputs per reader,
# random seeds; the counts go to build/fuzz-report.json. A derandomized slice runs in `make test`.
FUZZ_EXAMPLES ?= 1500
fuzz: install
	@mkdir -p build && rm -f build/fuzz-report.json
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_REPORT=build/fuzz-report.json nice -n 10 $(VENV)/bin/pytest -p no:cacheprovider -s -q tests/fuzz
	@cat build/fuzz-report.json

# Regenerate the conformance corpus from the float64 reference (`--check` only compares).
cases: install
	$(PY) -m vitspec.conformance.generate

clean:
	rm -rf $(VENV) $(CORE_VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
