# kaapana_assets — the two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
export KAAPANA_HOME ?= $(CURDIR)/.kaapana
export DAGSTER_HOME ?= $(KAAPANA_HOME)/dagster
# Tests never reach the network: no telemetry, no model or data downloads.
export DAGSTER_DISABLE_TELEMETRY = 1
export HF_HUB_OFFLINE = 1

.PHONY: install tools lint test test-all check-runtime-install demo dev viewer oidc-provider bench-ingest bench-segment bench-receive bench-federated bench-arrival bench-qido bench-wado bench-gateway bench-lake-s3 s3-server clean

# The stamp is rebuilt when the dependency list changes. torch comes first and pinned:
# the machine carries the 2.13.0 CPU wheel; anything unpinned would pull CUDA builds.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# The Debian tools the tests use as peers and oracles (dcmtk, GDCM, OpenJPH, dcm2niix,
# dicom3tools, Orthanc, Prometheus, Chromium, Postgres), listed once in .ci/debian-packages.
# As root: installed with apt-get, no service started (tests start their own, confined).
# Otherwise: the exact command to run is printed and make stops. Installed means dpkg's
# "install ok installed" (a removed package whose configuration is kept still has a status).
DEBIAN_PACKAGES := $(shell sed -e 's/\#.*//' .ci/debian-packages)
tools:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done | tr '\n' ' '); \
	if [ -z "$$missing" ]; then echo "Debian tools: all installed"; exit 0; fi; \
	if [ "$$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "Missing Debian packages: $$missing"; \
	  echo "Install them (as root, or run 'make tools' as root), then run make again:"; \
	  echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends $$missing"; \
	  exit 1; fi; \
	echo "Installing Debian packages: $$missing"; \
	printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d; \
	DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	status=$$?; rm -f /usr/sbin/policy-rc.d; exit $$status

# pyflakes, isort and bugbear (ruff), and types (mypy): configured in pyproject.toml.
lint: install
	$(BIN)/ruff check kaapana_assets resources sensors definitions.py tests bench
	$(BIN)/mypy

# The fast tier: everything but the tests marked slow (training, demo, servers, browser), in
# two workers as test-all.
test: tools lint
	$(BIN)/python -m pytest -m "not slow" -q -n 2 --dist loadgroup

# Both tiers: what CI runs, in two workers (pytest-xdist): the tests that share a costly
# session fixture (the demo, a trained model, a federation) run in one worker each, so each
# is built once. The slowest tests are listed at the end: CI must stay under 15 minutes.
# The browser test of the viewer needs OHIF's build: fetched here, before the tests, not by them.
test-all: tools lint viewer oidc-provider
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=20

# What deploy/ builds: `pip install .` without extras, in a clean venv, must import the code
# location (a runtime import that only a dev extra brought once broke production).
RUNTIME_VENV ?= $(CURDIR)/build/runtime-venv
# --no-compile: this venv imports the code location once and is removed. (The dev venv is
# byte-compiled at install: where PYTHONDONTWRITEBYTECODE is set, nothing else would, and
# every test process would compile torch, Dagster and Flower from source again.)
PIP_INSTALL := -m pip install --quiet --no-compile
check-runtime-install:
	rm -rf $(RUNTIME_VENV) && $(PYTHON) -m venv $(RUNTIME_VENV)
	$(RUNTIME_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(RUNTIME_VENV)/bin/python $(PIP_INSTALL) torch==2.13.0
	$(RUNTIME_VENV)/bin/python $(PIP_INSTALL) .
	cd $(RUNTIME_VENV) && DAGSTER_HOME= $(RUNTIME_VENV)/bin/python -c "import definitions; print('definitions imports without dev extras:', len(list(definitions.defs.resolve_all_asset_keys())), 'assets')"
	rm -rf $(RUNTIME_VENV)

# The lake on S3: `make s3-server` in one shell, then
# `make demo KAAPANA_LAKE_URI=s3://kaapana/demo AWS_ENDPOINT_URL=http://127.0.0.1:9000 AWS_ALLOW_HTTP=true
#  AWS_ACCESS_KEY_ID=kaapana-test AWS_SECRET_ACCESS_KEY=kaapana-test-secret` (docs/deployment.md#storage-the-object-store-and-the-volume).
demo: install
	$(BIN)/kaapana demo

# moto's S3 API on 127.0.0.1:9000, bucket `kaapana`, until Ctrl-C.
s3-server: install
	$(BIN)/python -m bench.s3_server --port 9000

# The OHIF viewer's published build (MIT), fetched from the npm registry at install time and
# served by `kaapana dicomweb --viewer`. The stamp names the version: a new one refetches.
# No npm needed: a stdlib script downloads the tarball and checks it against the integrity
# pinned with the version (for a new version: `npm view @ohif/app@<version> dist.integrity`);
# the previous build stays until the new one is complete.
OHIF_VERSION   := 3.13.2
OHIF_INTEGRITY := sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA==
VIEWER_DIR     := build/ohif
$(VIEWER_DIR)/.version-$(OHIF_VERSION):
	$(PYTHON) -m kaapana_assets.dicomweb.fetch_viewer --ohif-version $(OHIF_VERSION) --integrity $(OHIF_INTEGRITY) $(VIEWER_DIR)
	touch $@

viewer: $(VIEWER_DIR)/.version-$(OHIF_VERSION)

# The OpenID Connect provider the gateway's tests start (panva's oidc-provider, MIT, under
# Node), installed at install time from the lock in tests/gateway/oidc (exact versions and
# integrity hashes), never at test time; a new lock reinstalls.
OIDC_PROVIDER_DIR := build/oidc-provider
$(OIDC_PROVIDER_DIR)/.installed: tests/gateway/oidc/package.json tests/gateway/oidc/package-lock.json | tools
	@command -v npm >/dev/null || { echo "npm not found: it comes with Node (NodeSource's nodejs, or Debian's npm)"; exit 1; }
	rm -rf $(OIDC_PROVIDER_DIR) && mkdir -p $(OIDC_PROVIDER_DIR)
	cp tests/gateway/oidc/package.json tests/gateway/oidc/package-lock.json $(OIDC_PROVIDER_DIR)/
	cd $(OIDC_PROVIDER_DIR) && npm ci --ignore-scripts --no-audit --no-fund --silent
	touch $@

oidc-provider: $(OIDC_PROVIDER_DIR)/.installed

# The demo's data (made first if missing), the DICOMweb service with the viewer in the
# background (stopped by its PID when the UI stops), then the UI with the sensors running.
DICOMWEB_PORT ?= 8080
dev: install viewer
	test -d $(KAAPANA_HOME)/lake/studies || $(BIN)/kaapana demo
	mkdir -p $(DAGSTER_HOME) && cp -n dagster.yaml $(DAGSTER_HOME)/dagster.yaml || true
	@echo "Dagster UI: http://localhost:3000"
	@echo "Viewer (OHIF on DICOMweb): http://localhost:$(DICOMWEB_PORT)  (DICOMweb: http://localhost:$(DICOMWEB_PORT)/dicom-web)"
	@echo "MLflow UI (another shell): $(BIN)/mlflow ui --backend-store-uri sqlite:///$(KAAPANA_HOME)/mlflow.db"
	$(BIN)/kaapana dicomweb --home $(KAAPANA_HOME) --host 127.0.0.1 --port $(DICOMWEB_PORT) --viewer $(VIEWER_DIR)/dist & \
	  dicomweb=$$!; trap 'kill $$dicomweb 2>/dev/null' EXIT INT TERM; \
	  KAAPANA_VIEWER_URL=http://localhost:$(DICOMWEB_PORT) KAAPANA_FEDERATION=$(KAAPANA_HOME)/federation.yaml \
	  $(BIN)/dagster dev -h 127.0.0.1 -p 3000

bench-receive: install
	$(BIN)/python bench/receive.py

bench-federated: install
	$(BIN)/python bench/federated.py

bench-segment: install
	$(BIN)/python bench/segment.py

bench-ingest: install
	$(BIN)/python bench/ingest.py

# The real daemon (`dagster dev`) on a prepared site: spool → SEG for 1 study and a burst of 10.
bench-arrival: install
	$(BIN)/python bench/arrival.py --burst 10

# QIDO-RS study searches over 10,000 studies against Orthanc-DICOMweb (root: a private network namespace).
bench-qido: install
	$(BIN)/python bench/dicomweb_qido.py

# WADO-RS metadata and frames of a 300-slice series against Orthanc-DICOMweb (root: a private network namespace).
bench-wado: install
	$(BIN)/python bench/dicomweb_wado.py

# QIDO-RS and a Dagster GraphQL query through `kaapana gateway` and straight to the service, alternating.
bench-gateway: install oidc-provider
	$(BIN)/python bench/gateway.py

# Ingest and a burst of segmentation commits with the lake on moto's S3 server vs local disk.
bench-lake-s3: install
	$(BIN)/python bench/lake_s3.py

clean:
	rm -rf $(KAAPANA_HOME) .pytest_cache
