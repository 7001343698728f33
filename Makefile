# `make demo` / `make test` work on a fresh machine: they create .venv, install torch, then diffalign.
# A user who already has torch (e.g. a CUDA build in their own venv) runs with SKIP_TORCH=1 VENV=/path/to/venv.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
SKIP_TORCH ?= 0
PYTEST_ARGS ?=
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: test demo setup lint assets bench clean

$(PY):
	python3 -m venv $(VENV)

# The stamp is rebuilt whenever pyproject.toml changes. Torch is then held at the installed distribution's
# version, read from package metadata (torch.__version__ carries a +cuXXX label that pip's resolver does not match).
$(VENV)/.diffalign-installed: pyproject.toml setup.py | $(PY)
ifeq ($(SKIP_TORCH),0)
	$(PY) -m pip install $(TORCH_PINS)
endif
	$(PY) -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" > $(VENV)/.torch-pins
	$(PY) -c "from importlib.metadata import version as v; print(f'torch=={v(\"torch\")}'); print(f'torchvision=={v(\"torchvision\")}')" > $(VENV)/constraints.txt
	$(PY) -m pip install -c $(VENV)/constraints.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.diffalign-installed

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadscope $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/diffalign demo

lint: setup
	$(VENV)/bin/ruff check diffalign tests scripts
	$(VENV)/bin/ruff format --check diffalign tests scripts

# Both toys, the UNet one first (toy-flow reuses its VAE, tokenizer and proxy reward).
assets: setup
	$(PY) scripts/make_toy_assets.py
	$(PY) scripts/make_toy_flow_assets.py

bench: setup
	$(PY) scripts/bench.py all

clean:
	rm -rf $(VENV) .pytest_cache
