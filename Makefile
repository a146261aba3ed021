# Every target creates the virtual environment it needs, so each works on a
# fresh machine with only Python 3.11 and pip.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-all docs lint benchmark clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)  ## Fit eight schools with PMA and NUTS, print the table, save plots.
	$(BIN)/numpyro-pma demo --output-dir demo-output

test: $(STAMP)  ## The default test run (slow tests excluded), about 10 minutes on 2 cores.
	$(BIN)/python -m pytest -m "not slow" -n 2 --dist loadfile --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -n 2 --dist loadfile

test-all: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(BIN)/ruff check numpyro_pma tests examples
	$(BIN)/ruff format --check numpyro_pma tests examples

benchmark: $(STAMP)
	$(BIN)/numpyro-pma benchmark

clean:
	rm -rf $(VENV) site demo-output .pytest_cache
