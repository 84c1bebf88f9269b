# shadow: volume shadow sets with host-based minimerge.
GO        ?= go
FUZZTIME  ?= 30s
BIN       := bin/shadow

.DEFAULT_GOAL := help

.PHONY: help build run replay tools test clustertest testrace lint fuzz cover rewrite check bench

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

build: ## build bin/shadow
	$(GO) build -o $(BIN) ./cmd/shadow

DATA ?= data

run: build ## start a single-host agent with DSA1 on two 1 GiB files under $(DATA)/; prints the NBD URI
	@mkdir -p $(DATA)
	./$(BIN) agent --socket $(DATA)/agent.sock --nbd-unix $(DATA)/nbd.sock \
	  --mount DSA1=$(DATA)/m1.img,$(DATA)/m2.img --create-size 1GiB

replay: build ## replay every script in testdata/replay with a trace
	./$(BIN) replay -v testdata/replay/*.txt

tools: ## install the Debian tools the end-to-end tests drive (when missing)
	@./.ci/install-tools

test: tools ## run every test: unit, replay scripts, golden traces, fuzz seeds, end to end with real tools
	$(GO) test -count=1 -timeout 60m ./...

CLUSTER_REPEAT ?= 10

clustertest: tools ## the cluster end-to-end scenarios, each repeated CLUSTER_REPEAT times (10) with random timing
	SHADOW_CLUSTER_REPEAT=$(CLUSTER_REPEAT) $(GO) test -count=1 -timeout 60m -run '^TestClusterE2E' -v ./cmd/shadow

testrace: ## run the tests under the race detector (-short: the end-to-end tests drive a separate binary)
	$(GO) test -race -short -count=1 -timeout 60m ./...

lint: ## go vet, staticcheck (through go tool) and gofmt
	$(GO) vet ./...
	$(GO) tool staticcheck ./...
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt would change: $$out"; exit 1; fi

fuzz: ## run each fuzz target for FUZZTIME (default 30s)
	$(GO) test ./shadowset -run '^$$' -fuzz '^FuzzStep$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s
	$(GO) test ./shadowset -run '^$$' -fuzz '^FuzzRestore$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s
	$(GO) test ./shadowset/replay -run '^$$' -fuzz '^FuzzParseLine$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s
	$(GO) test ./bitmap -run '^$$' -fuzz '^FuzzDecode$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s
	$(GO) test ./bitmap/wire -run '^$$' -fuzz '^FuzzDecode$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s
	$(GO) test ./cmd/internal/meta -run '^$$' -fuzz '^FuzzDecode$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s
	$(GO) test ./cmd/internal/nbd -run '^$$' -fuzz '^FuzzRequests$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s
	$(GO) test ./cmd/internal/nbd -run '^$$' -fuzz '^FuzzNegotiation$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s
	$(GO) test ./cmd/internal/agent -run '^$$' -fuzz '^FuzzParseHBMMPolicy$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s
	$(GO) test ./bitmap/wlog -run '^$$' -fuzz '^FuzzLoad$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s
	$(GO) test ./cluster -run '^$$' -fuzz '^FuzzLogApply$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 5s

bench: tools ## side-by-side comparison with the peers (fio; 5 alternating runs, medians); table in bench.out
	rm -f bench.out
	SHADOW_BENCH=1 SHADOW_BENCH_OUT=$(CURDIR)/bench.out $(GO) test ./cmd/shadow -run '^TestPerformance(Comparison|Bitmaps|Cluster|ClusterFencing|ClusterHBMM)$$' -count=1 -v -timeout 60m

cover: ## coverage report in coverage.out, summary on stdout
	$(GO) test -count=1 -coverprofile=coverage.out ./...
	$(GO) tool cover -func=coverage.out | tail -1

rewrite: ## regenerate the golden traces in shadowset/testdata (review the diff!)
	$(GO) test ./shadowset -run TestInteraction -rewrite

check: lint test clustertest testrace ## everything CI runs
