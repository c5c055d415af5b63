# The README's commands. `make test` is what CI runs.
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(CURDIR)/node_modules/.bin:$(PATH)

.PHONY: dev test lint bootstrap bench faults mutate

# Run the bridge on an embedded broker: no Kafka cluster, no Docker.
dev:
	@test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	@$(VENV)/bin/python -m pip install -q -e '.[embedded]'
	$(VENV)/bin/luma-kafka-bridge dev

# Install what the suite needs (idempotent), then run all of it under coverage (subprocesses
# included); the report fails below `fail_under` in pyproject.toml.
test: bootstrap
	$(VENV)/bin/python -m coverage erase
	$(VENV)/bin/python -m coverage run -m pytest
	$(VENV)/bin/python -m coverage combine -q
	$(VENV)/bin/python -m coverage report
	@$(VENV)/bin/python scripts/coverage-totals

bootstrap:
	@./scripts/bootstrap

lint: bootstrap
	ruff check . && ruff format --check . && mypy && lint-imports

bench: bootstrap
	$(VENV)/bin/python -m pip install -q -e '.[bench]'
	$(VENV)/bin/python -m bench

# The fault-injection scenarios with Luma-scale outages; their numbers go to
# faults-report.jsonl, then into the README's fault table.
faults: bootstrap
	rm -f faults-report.jsonl
	FAULT_OUTAGE_SECONDS=30 FAULT_REPORT=faults-report.jsonl $(VENV)/bin/python -m pytest -m faults tests/faults -s
	$(VENV)/bin/python scripts/faults-table faults-report.jsonl README.md

# Mutation testing of the core with mutmut (docs/testing.md): slow, not part of CI.
mutate: bootstrap
	$(VENV)/bin/python -m pip install -q -e '.[test,mutate]'
	rm -rf mutants
	nice -n 10 $(VENV)/bin/mutmut run --max-children 2
	$(VENV)/bin/python scripts/mutation-scores --equivalent docs/testing.md
