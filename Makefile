# shadow: volume shadow sets with host-based minimerge.
GO        ?= go
FUZZTIME  ?= 30s
BIN       := bin/shadow

.DEFAULT_GOAL := help

.PHONY: help build run test testrace lint fuzz cover rewrite check

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

build: ## build bin/shadow
	$(GO) build -o $(BIN) ./cmd/shadow

run: build ## replay every script in testdata/replay with a trace
	./$(BIN) replay -v testdata/replay/*.txt

test: ## run every test (replay scripts, golden traces, fuzz seeds, property tests)
	$(GO) test -count=1 ./...

testrace: ## run every test under the race detector
	$(GO) test -race -count=1 ./...

lint: ## go vet, staticcheck (through go tool) and gofmt
	$(GO) vet ./...
	$(GO) tool staticcheck ./...
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt would change: $$out"; exit 1; fi

fuzz: ## run each fuzz target for FUZZTIME (default 30s)
	$(GO) test ./shadowset -run '^$$' -fuzz '^FuzzStep$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s
	$(GO) test ./shadowset -run '^$$' -fuzz '^FuzzRestore$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s
	$(GO) test ./shadowset/replay -run '^$$' -fuzz '^FuzzParseLine$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s

cover: ## coverage report in coverage.out, summary on stdout
	$(GO) test -count=1 -coverprofile=coverage.out ./...
	$(GO) tool cover -func=coverage.out | tail -1

rewrite: ## regenerate the golden traces in shadowset/testdata (review the diff!)
	$(GO) test ./shadowset -run TestInteraction -rewrite

check: lint test testrace ## everything CI runs
