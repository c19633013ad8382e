# The project image every cluster manifest runs (cluster/README.md):  make image IMAGE=YOUR_REGISTRY/tans-on-ray:0.1.0
# Ray's own image at the project's pinned Ray version (pyproject.toml: ray==2.60.*), plus the project
# with its pinned dependencies (torch, torchvision, ofa, ...), the built-in corpus's Debian and PyPI
# packages, and the repository as the working directory (so `python -m jobs.<stage>` and Serve's
# `serve.app:app_builder` import). Ray's entrypoint and `ray` user are kept; no credentials go in here:
# nodes get bucket access from their role / service account at run time.
ARG RAY_TAG=2.60.0-py311-gpu
FROM rayproject/ray:${RAY_TAG}

# Debian packages the built-in sources read (datasets, fonts): the list `make setup` installs.
USER root
COPY tans/data/builtin/debian_packages.txt /tmp/tans/debian_packages.txt
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $(grep -v '^\s*#' /tmp/tans/debian_packages.txt | awk 'NF{print $1}') \
    && rm -rf /var/lib/apt/lists/* /tmp/tans
USER ray

# The pinned dependencies first, in a layer of their own, so a code change does not download torch
# again: requirements.lock, every package at its tested version, installed as `make setup` does
# (--no-deps: the lock is a whole environment; it includes the corpus-only packages).
COPY --chown=ray:users requirements.lock /tmp/tans-deps/
RUN pip install --no-cache-dir --no-deps -r /tmp/tans-deps/requirements.lock \
    && rm -rf /tmp/tans-deps

# The project itself (a regular, non-editable install: the wheel carries configs/ as tans/configs);
# its build leftovers go, so the working directory holds only the repository. COPY comes before
# WORKDIR so that it creates the directory, owned by `ray` (pip builds in the source tree).
COPY --chown=ray:users . /home/ray/tans
WORKDIR /home/ray/tans
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build *.egg-info

ENV RAY_USAGE_STATS_ENABLED=0
# Ray Serve's latency switches (serve/args.py: SERVE_LATENCY_ENV) for every Ray process of every
# node, the Serve proxies included: the app's runtime_env sets them only for its own replicas.
ENV RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0
