# kproxy: `make demo` runs the main job, `make test` the whole suite.
# Every target runs the bootstrap first (idempotent, quick when set up).

PY := .venv/bin/python
PYTEST := $(PY) -m pytest

.PHONY: bootstrap demo test test-fast lint bench clean

bootstrap:
	@scripts/bootstrap.sh

demo: bootstrap
	@scripts/demo.sh

# The full suite with the compiled fast path, then the tiers that exercise
# the fast path again with the pure-Python twin.
test: bootstrap lint
	$(PYTEST) tests
	KPROXY_NO_EXTENSIONS=1 $(PYTEST) -q -p no:cacheprovider tests/unit

lint: bootstrap
	.venv/bin/ruff check kproxy tests bench setup.py
	.venv/bin/ruff format --check kproxy tests bench setup.py
	.venv/bin/mypy
	$(PY) -m tests.support.layering

bench: bootstrap
	@scripts/bench.sh

clean:
	rm -rf build kproxy/_fastpath.c kproxy/_fastpath.*.so .venv/.kproxy-bootstrap
