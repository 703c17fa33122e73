# pg_sales: `make run` and `make test` are all a newcomer needs.
SHELL := /bin/bash
.DEFAULT_GOAL := run

DB_USER     ?= sales_app
DB_PASSWORD ?= pg_sales_dev
DB_NAME     ?= pg_sales
# scripts/setup.sh creates the role and database under these names.
export PG_SALES_DB_USER     = $(DB_USER)
export PG_SALES_DB_PASSWORD = $(DB_PASSWORD)
export PG_SALES_DB_NAME     = $(DB_NAME)
export DATABASE_URL ?= postgres://$(DB_USER):$(DB_PASSWORD)@127.0.0.1:5432/$(DB_NAME)
export REDIS_URL    ?= redis://127.0.0.1:6379
export JWT_SECRET   ?= pg-sales-development-secret-change-me-in-production
export PORT         ?= 3001
export DEMO_ADMIN_EMAIL    ?= admin@pg-sales.local
export DEMO_ADMIN_PASSWORD ?= demo-admin-password
export CARGO_TERM_COLOR ?= never
# The secret above is published here: `serve` accepts it only in development
# mode, which `make run`, `make test` and the benchmarks are.
run test fuzz bench soak: export PG_SALES_DEV := 1

SERVER_RELEASE := target/release/sales-server
SERVER_DEBUG   := target/debug/sales-server

.PHONY: run test test-sql fuzz setup build build-debug migrate seed demo-admin bench soak fmt lint openapi reset-db services

setup:
	./scripts/setup.sh all

services:
	./scripts/setup.sh services

build: setup
	cargo build --release -p sales-server

build-debug: setup
	cargo build -p sales-server

migrate: build
	$(SERVER_RELEASE) migrate

seed: migrate
	$(SERVER_RELEASE) seed --if-empty

demo-admin: migrate
	@echo "$(DEMO_ADMIN_PASSWORD)" | $(SERVER_RELEASE) user add --email "$(DEMO_ADMIN_EMAIL)" --role admin >/dev/null
	@echo "demo admin: $(DEMO_ADMIN_EMAIL) / $(DEMO_ADMIN_PASSWORD)"

## Installs what is missing, starts Postgres and Redis, builds and installs the
## extension, migrates, loads demo data and serves on 127.0.0.1:$(PORT).
run: seed demo-admin
	@echo "serving on http://127.0.0.1:$(PORT)  (health: /health, docs: /docs)"
	exec $(SERVER_RELEASE) serve

## The same set-up, then every test: unit, extension (SQL) and end-to-end,
## then the API fuzzer (schemathesis, pinned and seeded) with zero failures.
test: setup
	./scripts/setup.sh browser
	cargo build -p sales-server
	status=0; \
	$(SQL_TESTS) || status=$$?; \
	cargo test -p pg_sales --lib || status=$$?; \
	cargo test --workspace --exclude pg_sales --no-fail-fast -- --test-threads=$${TEST_THREADS:-4} || status=$$?; \
	./scripts/fuzz_api.sh || status=$$?; \
	exit $$status

## The API fuzzer alone, against its own server and database.
fuzz: setup
	cargo build -p sales-server
	./scripts/fuzz_api.sh

## SQL regression tests of the extension's functions (pg_regress) against the
## cluster `make setup` manages; scripts/sql_tests.sh says how to aim elsewhere.
SQL_TESTS = PGHOST=127.0.0.1 PGPORT=5432 PGUSER=$(DB_USER) PGPASSWORD=$(DB_PASSWORD) ./scripts/sql_tests.sh
test-sql:
	$(SQL_TESTS)

## Benchmarks print ratios against floors measured in the same run.
bench: build
	command -v wrk >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null)
	cargo build --release -p sales-e2e --bins
	./scripts/bench.sh

## A mixed load for SOAK_SECONDS (default 300): zero errors, flat memory.
soak: build
	cargo build --release -p sales-e2e --bin soak
	./scripts/soak.sh

fmt:
	cargo fmt --all

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

## Regenerates openapi/openapi.json from the server's code.
openapi: build-debug
	$(SERVER_DEBUG) openapi > openapi/openapi.json.tmp
	mv openapi/openapi.json.tmp openapi/openapi.json

## Drops and recreates the demo database (after an incompatible extension change).
reset-db: setup
	sudo -u postgres dropdb --if-exists --force $(DB_NAME)
	./scripts/setup.sh database
