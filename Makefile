# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
STATE ?= ./demo-state
HTTPS_PORT ?= 8443
HTTP_PORT ?= 8080

.PHONY: run test lint system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

system-deps:
	scripts/system-deps

# One unit on embedded defaults: HTTPS on 127.0.0.1:8443, HTTP redirect on 8080
# (other ports: make run HTTPS_PORT=9443 HTTP_PORT=9080).
run: $(STAMP)
	$(VENV)/bin/unitcert device serve --state $(STATE) \
		--https-port $(HTTPS_PORT) --http-port $(HTTP_PORT)

test: $(STAMP) system-deps
	$(VENV)/bin/python -m pytest -W error tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy src

clean:
	rm -rf $(VENV) $(STATE)
