# Two commands do everything from a fresh clone: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test test-under-load demo bench lint clean protos

# torch goes first and alone: any looser torch spec (hivemind asks for one) would
# otherwise resolve to a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "torch==2.13.0"
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: venv
	$(BIN)/python -m pytest -q

# The suite on a busy machine (cores + 1 spinning processes beside it): what CI's neighbours can do.
test-under-load: venv
	bash scripts/test_under_load.sh

demo: venv
	$(BIN)/expertmesh demo

bench: venv
	$(BIN)/python scripts/bench_profile.py
	$(BIN)/python scripts/bench_kernels.py
	$(BIN)/python scripts/bench_protocol.py
	$(BIN)/python scripts/bench_network.py
	$(BIN)/python scripts/bench_copies.py --miners 12 --shard 600
	$(BIN)/python scripts/bench_reliability.py

# Regenerate the committed gRPC stubs after editing protocol/expertmesh.proto (a test checks for drift).
# protoc names imports after the proto's path, so it is compiled as expertmesh/protocol/expertmesh.proto.
protos: venv
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
