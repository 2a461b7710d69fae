# Each target bootstraps .venv when setup.cfg is newer than the last install.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: run test fuzz bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# compat mode puts the checkout itself on sys.path, so twistd finds
	# twisted/plugins/gateway_plugin.py without a copy in site-packages.
	$(VENV)/bin/pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

run: $(STAMP)
	mkdir -p var
	$(VENV)/bin/twistd --nodaemon --pidfile= gateway $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(ARGS)

# The fuzz suite with many fresh random examples (make test runs a small fixed set).
FUZZ_EXAMPLES ?= 3000
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/python -m pytest tests/test_fuzz.py $(ARGS)

# A few minutes; ARGS=--quick for a ~30-second sanity run.  See README, "Performance".
bench: $(STAMP)
	$(VENV)/bin/python -m bench.run $(ARGS)

clean:
	rm -rf $(VENV) var build *.egg-info
