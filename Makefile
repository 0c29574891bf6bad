# `make demo` and `make test` each set up .venv when it is missing or stale, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
READY := $(VENV)/.ready
BENCH_READY := $(VENV)/.bench-ready

.PHONY: demo test test-scheduler airflow bench-train bench-dags bench-serve bench-prepare constraints clean

$(READY): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: $(READY)
	$(BIN)/sdxl-lora-ops demo --workdir outputs/demo

# The last demo's runs and reports (outputs/demo) when there is one, else a fresh outputs/airflow.
airflow: $(READY)
	$(BIN)/sdxl-lora-ops airflow

# Build and push the job images to ECR: make images REGION=eu-west-1 ACCOUNT=111122223333 [PREFIX=sdxl-lora] [TAG=...]
images: $(READY)
	PYTHON=$(BIN)/python containers/build_and_push.sh --region "$(REGION)" --account "$(ACCOUNT)" \
	  $(if $(PREFIX),--prefix "$(PREFIX)") $(if $(TAG),--tag "$(TAG)")

# Two pytest-xdist workers (TEST_WORKERS=0: one process); each test module runs whole in one of them, the
# real-scheduler modules together (tests/conftest.py: pytest_xdist_make_scheduler).
TEST_WORKERS ?= 2
test: $(READY)
	$(BIN)/python -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup)

# Only the tests under a real Airflow (api-server, scheduler, dag-processor, triggerer; PostgreSQL, Redis).
test-scheduler: $(READY)
	$(BIN)/python -m pytest -m scheduler -s

# The training benchmark's yardstick (diffusers' own script) also needs the `bench` extra.
$(BENCH_READY): $(READY)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,bench]'
	touch $@

bench-train: $(BENCH_READY)
	$(BIN)/python benchmarks/bench_train.py $(ARGS)

bench-dags: $(READY)
	$(BIN)/python benchmarks/bench_dags.py $(ARGS)

bench-serve: $(READY)
	$(BIN)/python benchmarks/bench_serve.py $(ARGS)

bench-prepare: $(READY)
	$(BIN)/python benchmarks/bench_prepare.py $(ARGS)

# Re-resolve the pinned set after changing pyproject.toml (needs a fresh venv).
constraints:
	rm -rf /tmp/sdxl-lora-constraints && $(PYTHON) -m venv /tmp/sdxl-lora-constraints
	/tmp/sdxl-lora-constraints/bin/pip install --quiet -e '.[dev,bench]'
	( sed -n 1,2p constraints.txt; /tmp/sdxl-lora-constraints/bin/pip freeze --exclude-editable \
	  | sed 's/^torch==\(.*\)+cpu/torch==\1/' ) > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) outputs .pytest_cache
