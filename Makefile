# Two entry points, each self-sufficient on a fresh machine:
#   make chat   installs what is needed, then chats with the built-in demo model
#   make test   installs what is needed, then runs the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup chat test

setup: $(VENV)/.installed

# torch 2.13.0 first: on these machines it is a local CPU build; any other request would pull CUDA.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

chat: setup
	$(BIN)/hmoe chat

test: setup
	$(BIN)/python -m pytest
