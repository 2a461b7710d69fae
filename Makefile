# Each target bootstraps .venv when setup.cfg is newer than the last install.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: run demo test fuzz bench mutate clean

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

# The gateway with the fake Telphin and Altegio, a demo tenant and three calls, shown in the
# terminal; it keeps running until Ctrl-C.  Its files live in var/demo/.  ARGS=--help for options.
demo: $(STAMP)
	$(VENV)/bin/python -m bench.demo $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m tests.run $(ARGS)

# The fuzz suite with many fresh random examples (make test runs a small fixed set).
FUZZ_EXAMPLES ?= 3000
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/python -m pytest tests/test_fuzz.py $(ARGS)

# A few minutes; ARGS=--quick for a ~30-second sanity run.  See README, "Performance".
bench: $(STAMP)
	$(VENV)/bin/python -m bench.run $(ARGS)

# Mutation testing, tens of minutes over all of gateway/; not part of `make test`.
# ARGS may name modules: make mutate ARGS="gateway/calls.py gateway/store".  See README, "Tests".
$(VENV)/.installed-mutate: $(STAMP)
	$(VENV)/bin/pip install --quiet -e '.[test,mutate]' --config-settings editable_mode=compat
	touch $@

mutate: $(VENV)/.installed-mutate
	nice -n 10 $(VENV)/bin/python -m tests.mutation.run $(ARGS)

clean:
	rm -rf $(VENV) var build *.egg-info
