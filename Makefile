# The two set-up commands of the README, both idempotent from a clean clone:
#   make demo   create .venv and run the main job: the real handwritten digits on the `local` profile
#   make test   create .venv, check format, lint and types, start the real local Slurm cluster, run the whole test suite
# .ci/run calls `make test`.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch 2.13.0+cpu lies on local disk on the project's machines; installing it first keeps pip from
# resolving a multi-GB CUDA build for deepspeed. On a GPU cluster set TORCH_SPEC to your CUDA build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv demo demo-synth test test-fast lint typecheck format slurm-up slurm-down clean
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,realdata,tracking]'
	touch $@

# The main job: scikit-learn's real handwritten digits as shards (made once; again when the writer or
# the recipe changes), then the digits recipe (data/digits/train.toml, written by `vltrain data digits`
# from vltrain/data/digits_recipe.py) trained for real through `clusterctl submit --profile local`
# (submitit's local executor), streamed until it ends with zero-shot top-1 and Recall@K on the 300
# held-out digits; then its energy and GPU-hours.
demo: venv data/digits/train.toml
	$(BIN)/clusterctl submit --profile local --config data/digits/train.toml --name demo --wait
	$(BIN)/clusterctl report energy --run demo
	$(BIN)/clusterctl report gpu-hours --by profile

data/digits/train.toml: vltrain/data/digits.py vltrain/data/digits_recipe.py | venv
	rm -rf data/digits
	$(BIN)/vltrain data digits --out data/digits

# The synthetic demo (the tests' data): synthetic image-text shards and a SentencePiece tokenizer (made
# once), then the tiny preset on them (the local profile's recipe configs/tiny.toml), held-out Recall@K.
demo-synth: venv data/synth/tokenizer.model
	$(BIN)/clusterctl plan --profile a100x64
	$(BIN)/clusterctl submit --profile local --name demo-synth --wait
	$(BIN)/clusterctl report energy --run demo-synth
	$(BIN)/clusterctl report gpu-hours --by profile

data/synth/tokenizer.model: | venv
	$(BIN)/vltrain data synth --out data/synth --n 4000 --shards 8 --holdout 500 --image-size 32
	$(BIN)/vltrain tokenizer train --shards data/synth --vocab-size 1000 --out data/synth/tokenizer.model

test: venv lint typecheck slurm-up
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Formatting and lint rules are in pyproject.toml ([tool.ruff]); `make format` applies them.
lint: venv
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# mypy at its default level over both packages; the interfaces (clusterctl/specs.py, clusterctl/backends/api.py,
# vltrain/engines/api.py) at its strict level ([tool.mypy] in pyproject.toml).
typecheck: venv
	$(BIN)/mypy clusterctl vltrain

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Only the fast unit tests (no training, no Slurm).
test-fast: venv
	$(BIN)/python -m pytest -m "not slow and not slurm" $(PYTEST_ARGS)

# The real local Slurm cluster (docs/slurm-local.md); `up` is idempotent. Exit 3 means this machine
# cannot host it (not root, no apt-get): `make test` goes on and the tests marked `slurm` skip.
slurm-up:
	scripts/slurm-local.sh up || { rc=$$?; [ $$rc -eq 3 ] && echo "make: no local Slurm cluster; tests marked slurm will skip"; exit $$((rc == 3 ? 0 : rc)); }

slurm-down:
	scripts/slurm-local.sh down

clean:
	rm -rf $(VENV) .pytest_cache
