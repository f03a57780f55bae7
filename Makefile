# Meridian: build, run and test.
#
#   make run          build and start a local 3-region cluster; registry on localhost:5000
#   make test         install what the tests need (pinned), then run them all,
#                     ending with make chaos-short
#   make chaos        a 30-minute fault-injection run (3 regions, 5 nodes, 2 gateways)
#   make chaos-short  the same harness, smaller, at most 5 minutes
#   make bench        performance figures next to this machine's limits
#   make bench-scale  one repository filled with TAGS tags (1,000,000)
#   make compose-test three regions on one machine with docker compose
#                     (deploy/compose), proven with the docker CLI
#
# Tools are installed with `go install` at pinned versions into bin/tools;
# their builds are cached in the Go build cache.

SHELL        := bash
GO           ?= go
BIN          := $(CURDIR)/bin
TOOLS        := $(BIN)/tools
MERIDIAN     := $(BIN)/meridian
export GOPROXY ?= https://proxy.golang.org
export GOFLAGS ?= -mod=readonly

CONFORMANCE_VERSION  := v0.0.0-20260831232431-97274622c111
DISTRIBUTION_VERSION := v3.1.2
VERSITYGW_VERSION    := v1.8.0
MINIO_VERSION        := v0.0.0-20260212201848-7aac2a2c5b7c
CRANE_VERSION        := v0.22.1
ORAS_VERSION         := v1.3.6
REGCTL_VERSION       := v0.11.7
HELM_VERSION         := v3.21.4
VERSION              := $(shell git describe --always --dirty 2>/dev/null || echo dev)

.PHONY: skopeo podman protoc image helm-check compose-test all build run test test-minio unit conformance vet fmt-check proto proto-check fuzz bench bench-scale chaos chaos-short tools clean

all: build

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(MERIDIAN) ./cmd/meridian

## image: the container image (deploy/docker/Dockerfile.local) around a
## static binary built here, FROM scratch, so no base image is pulled;
## deploy/docker/Dockerfile builds the same image with the golang image.
IMAGE ?= meridian:dev
image:
	rm -rf $(BIN)/image && mkdir -p $(BIN)/image/data
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w -X main.version=$(VERSION)" -o $(BIN)/image/meridian ./cmd/meridian
	docker build -f deploy/docker/Dockerfile.local -t $(IMAGE) $(BIN)/image

## compose-test: deploy/compose/compose.yaml with docker-compose: the image
## (make image) and a versitygw S3 image FROM scratch around a static
## versitygw, five nodes and two gateways in three regions; pushes and pulls
## with the docker CLI, takes a region down and back (TestComposeThreeRegions,
## about two minutes once the images are built).
VERSITYGW_STATIC := $(TOOLS)/static/versitygw
compose-test: image $(VERSITYGW_STATIC)
	MERIDIAN_COMPOSE=1 MERIDIAN_COMPOSE_IMAGE=$(IMAGE) MERIDIAN_COMPOSE_VERSITYGW=$(VERSITYGW_STATIC) \
	  $(GO) test -count=1 -timeout 20m -v -run TestComposeThreeRegions ./deploy/compose/

# A static versitygw for an image FROM scratch (the one in bin/tools is
# built with cgo).
$(VERSITYGW_STATIC):
	CGO_ENABLED=0 GOBIN=$(TOOLS)/static $(GO) install github.com/versity/versitygw/cmd/versitygw@$(VERSITYGW_VERSION)

## run: a local cluster of three regions, one node each (dev-a on :5100,
## dev-b on :5200, dev-c on :5300) behind a gateway on localhost:5000,
## data under ./data/dev (kept between runs).
run: build
	$(MERIDIAN) dev --dir data/dev

## test: static checks, every package's tests (unit, integration, restart,
## real clients, geo-replication against real S3 servers, the container
## image and the compose deployment where a Docker engine runs) and the OCI
## conformance suite against a real node; then the short chaos run.
TEST_ENV := MERIDIAN_CONFORMANCE=$(TOOLS)/conformance MERIDIAN_VERSITYGW=$(TOOLS)/versitygw MERIDIAN_REQUIRE_S3=1 \
  MERIDIAN_DISTRIBUTION=$(TOOLS)/registry MERIDIAN_CRANE=$(TOOLS)/crane MERIDIAN_ORAS=$(TOOLS)/oras \
  MERIDIAN_REGCTL=$(TOOLS)/regctl MERIDIAN_HELM=$(TOOLS)/helm MERIDIAN_SKOPEO=$$(command -v skopeo) MERIDIAN_PODMAN=$$(command -v podman) \
  MERIDIAN_COMPOSE=1 MERIDIAN_COMPOSE_VERSITYGW=$(VERSITYGW_STATIC)
test: vet fmt-check proto-check helm-check fuzz $(TOOLS)/conformance $(TOOLS)/versitygw $(VERSITYGW_STATIC) $(TOOLS)/registry $(TOOLS)/crane $(TOOLS)/oras $(TOOLS)/regctl $(TOOLS)/helm skopeo podman
	$(TEST_ENV) $(GO) test -count=1 -timeout 25m ./...
	$(MAKE) chaos-short

## helm-check: lint the chart and render it with each values file it ships
## (the Go test in deploy/helm then checks what the rendered objects hold).
HELM_CHART := deploy/helm/meridian
helm-check: $(TOOLS)/helm
	$(TOOLS)/helm lint $(HELM_CHART)
	$(TOOLS)/helm lint $(HELM_CHART) -f $(HELM_CHART)/values-three-regions.yaml
	$(TOOLS)/helm template meridian $(HELM_CHART) >/dev/null
	$(TOOLS)/helm template meridian $(HELM_CHART) -f $(HELM_CHART)/values-three-regions.yaml >/dev/null

## chaos: real meridian processes, with mutual TLS and encrypted gossip,
## under a seeded workload and a seeded schedule that cycles through every
## fault kind (kill -9 of the leader and others, SIGSTOP, partitions,
## latency, S3 errors/stalls/outages, a gateway killed mid-upload, a node
## certificate re-issued in place, the gossip key rotated online, a robot account
## revoked mid-run), then the checkers; a run passes only if
## every check decided and every promised fault ran; the summary and a JSON
## report land in the run directory (and chaos-report.json). SEED=n
## reproduces a run; DURATION=10m changes its length; FAULTS=kill,partition
## limits the fault kinds.
CHAOS_FLAGS = -meridian $(MERIDIAN) -versitygw $(TOOLS)/versitygw $(if $(SEED),-seed $(SEED)) $(if $(DURATION),-duration $(DURATION)) $(if $(FAULTS),-faults $(FAULTS))
chaos: build $(TOOLS)/versitygw
	$(GO) run ./chaos/cmd/chaos -profile long -report chaos-report.json $(CHAOS_FLAGS)

chaos-short: build $(TOOLS)/versitygw
	$(GO) run ./chaos/cmd/chaos -profile short -report chaos-short-report.json $(CHAOS_FLAGS)

## test-minio: the S3 driver conformance suite, the S3 tests and the
## geo-replication tests against MinIO instead of versitygw (MinIO takes a
## few minutes to build the first time; make test does not need it).
test-minio: $(TOOLS)/minio
	MERIDIAN_S3_SERVER=minio MERIDIAN_MINIO=$(TOOLS)/minio MERIDIAN_REQUIRE_S3=1 \
	  $(GO) test -count=1 -timeout 20m ./replication/... ./node/ -run 'S3|Store|Geo|Replicat|Driver'

unit:
	$(GO) test -count=1 ./...

conformance: $(TOOLS)/conformance
	MERIDIAN_CONFORMANCE=$(TOOLS)/conformance $(GO) test -count=1 -run TestOCIConformance -v ./node/

vet:
	$(GO) vet ./...

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

$(TOOLS)/conformance:
	GOBIN=$(TOOLS) $(GO) install github.com/opencontainers/distribution-spec/conformance@$(CONFORMANCE_VERSION)

# versitygw: a light S3-compatible server the S3 driver and the
# geo-replication tests run against.
$(TOOLS)/versitygw:
	GOBIN=$(TOOLS) $(GO) install github.com/versity/versitygw/cmd/versitygw@$(VERSITYGW_VERSION)

$(TOOLS)/minio:
	GOBIN=$(TOOLS) $(GO) install github.com/minio/minio@$(MINIO_VERSION)

# Registry clients the HTTPS tests drive: crane (go-containerregistry, the
# version go.mod already uses), oras and regctl.
$(TOOLS)/crane:
	GOBIN=$(TOOLS) $(GO) install github.com/google/go-containerregistry/cmd/crane@$(CRANE_VERSION)

$(TOOLS)/oras:
	GOBIN=$(TOOLS) $(GO) install oras.land/oras/cmd/oras@$(ORAS_VERSION)

$(TOOLS)/regctl:
	GOBIN=$(TOOLS) $(GO) install github.com/regclient/regclient/cmd/regctl@$(REGCTL_VERSION)

# helm: `helm registry login`, `helm push` and `helm pull` of a chart.
$(TOOLS)/helm:
	GOBIN=$(TOOLS) $(GO) install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)

# skopeo and podman from Debian's packages (installed here when missing and
# apt-get works; the client test leaves out what is missing).
skopeo podman:
	@command -v $@ >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  { apt-get install -y $@ >/dev/null 2>&1 || \
	    { apt-get update >/dev/null 2>&1 && apt-get install -y $@ >/dev/null 2>&1; }; }; } || true

$(TOOLS)/registry:
	GOBIN=$(TOOLS) $(GO) install github.com/distribution/distribution/v3/cmd/registry@$(DISTRIBUTION_VERSION)

## proto: regenerate the committed protobuf code (needs protoc: Debian's
## protobuf-compiler and libprotobuf-dev).
PROTOC_GEN := PATH="$$(dirname $$($(GO) tool -n protoc-gen-go)):$$(dirname $$($(GO) tool -n protoc-gen-go-grpc)):$$PATH"
proto:
	@command -v protoc >/dev/null || { echo "protoc missing: apt-get install -y protobuf-compiler libprotobuf-dev"; exit 1; }
	$(PROTOC_GEN) protoc -I proto --go_out=proto --go_opt=paths=source_relative \
	  --go-grpc_out=proto --go-grpc_opt=paths=source_relative proto/meridianpb/*.proto

## proto-check: fail if the committed generated code is stale. protoc comes
## from Debian's packages (installed here when missing and apt-get works);
## without it the check fails, since it cannot tell.
proto-check: protoc
	@command -v protoc >/dev/null || { echo "proto-check: cannot check, protoc is not installed and could not be installed (as root: apt-get install -y protobuf-compiler libprotobuf-dev)"; exit 1; }
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && cp -r proto "$$tmp"/ && \
	{ $(PROTOC_GEN) protoc -I "$$tmp"/proto --go_out="$$tmp"/proto --go_opt=paths=source_relative \
	    --go-grpc_out="$$tmp"/proto --go-grpc_opt=paths=source_relative "$$tmp"/proto/meridianpb/*.proto || \
	  { echo "proto-check: protoc failed"; exit 1; }; } && \
	{ diff -r proto "$$tmp"/proto || { echo "generated protobuf code is stale: run make proto"; exit 1; }; }

protoc:
	@command -v protoc >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  { apt-get install -y protobuf-compiler libprotobuf-dev >/dev/null 2>&1 || \
	    { apt-get update >/dev/null 2>&1 && apt-get install -y protobuf-compiler libprotobuf-dev >/dev/null 2>&1; }; }; } || true

## fuzz: a bounded run of every fuzz target in the tree (FUZZTIME each:
## 80000 inputs by default, about 20s here), starting from the corpus
## committed under each package's testdata/fuzz/<Target>/ (plain `go test`
## replays that corpus too). An input that fails is written there; commit
## it with the fix. The budget is a count, not a duration: with a duration,
## Go's fuzz coordinator before 1.27 can report a spurious "context deadline
## exceeded" when its deadline fires while a starved worker is mid-input
## (go.dev/issue/75804).
FUZZTIME ?= 80000x
fuzz:
	@set -e; for dir in $$(grep -rl --include='*_test.go' --exclude-dir=.git --exclude-dir=bin --exclude-dir=data '^func Fuzz' . | xargs -r -n1 dirname | sort -u); do \
	  for target in $$(grep -ho '^func Fuzz[A-Za-z0-9_]*' $$dir/*_test.go | cut -c6-); do \
	    echo "fuzz: $$dir $$target, $(FUZZTIME)"; \
	    $(GO) test -run '^$$' -fuzz "^$$target\$$" -fuzztime $(FUZZTIME) $$dir; \
	  done; \
	done

## bench: `meridian bench`, one table with every performance target and its
## reference measured in the same run, MET or MISSED: a node's push, pull
## and manifest GETs beside the disk's fsync rate, the sha256 rate, nginx
## (installed from Debian when missing, else Go's file server, labelled) and
## CNCF Distribution; a `meridian gateway` in front of three `meridian serve`
## processes (mutual TLS, file:// regions): blob and manifest GETs beside
## the node, a 64-client pull storm beside nginx, tag commits through a
## follower; a gateway on a versitygw S3 region beside raw minio-go GET and
## multipart PUT. Then a 3-node loopback cluster's tag-update latency and
## throughput (1 and 32 writers), local vs strong tag reads, and leader
## failover time; then geo-replication on versitygw: the lag from a blob
## PUT's 201 to its placement in all three regions of a loopback cluster
## (one run: -benchtime 1x), and replication.Copy between two S3 servers
## beside a raw minio-go copy of the same bytes; then the gateway process's
## manifest GETs at 500 req/s with mTLS off and on and a 2 GiB blob streamed
## through it with its peak RSS (one run: -benchtime 1x); a
## garbage-collection pass over 100k manifests and 200k blobs (time, peak
## heap), and push latency with and without a collection loop running.
bench: build $(TOOLS)/registry $(TOOLS)/versitygw
	@command -v nginx >/dev/null || (apt-get install -y nginx >/dev/null 2>&1 || (apt-get update >/dev/null && apt-get install -y nginx >/dev/null)) || echo "nginx unavailable: comparing with Go's file server"
	$(MERIDIAN) bench --distribution $(TOOLS)/registry --versitygw $(TOOLS)/versitygw
	$(GO) test -run '^$$' -bench 'TagUpdate|TagRead' -benchtime 2000x -timeout 30m ./node/
	$(GO) test -run '^$$' -bench 'LeaderFailover' -benchtime 10x -timeout 30m ./node/
	$(GO) test -run '^$$' -bench 'LogStore|Propose' -benchtime 2000x ./consensus/
	$(GO) test -run '^$$' -bench 'GCPass' -benchtime 1x -timeout 30m ./consensus/
	$(GO) test -run '^$$' -bench 'PushWithGC' -benchtime 500x -timeout 30m ./node/
	MERIDIAN_VERSITYGW=$(TOOLS)/versitygw $(GO) test -run '^$$' -bench 'ReplicationLag' -benchtime 1x -timeout 30m ./node/
	MERIDIAN_VERSITYGW=$(TOOLS)/versitygw $(GO) test -run '^$$' -bench 'CrossRegionCopy' -benchtime 5x -timeout 30m ./replication/
	$(GO) test -run '^$$' -bench 'Gateway' -benchtime 1x -timeout 30m ./cmd/meridian/

## bench-scale: one repository of a 3-node cluster filled with TAGS tags
## through a follower: commit rate, tag GET p50/p99 at 1k and TAGS tags, the
## tags list paged through, RSS per node, the Raft snapshot's size and write
## time, a follower's restart and catch-up. TAGS=5000 is a quick check.
TAGS ?= 1000000
bench-scale: build
	$(MERIDIAN) bench --scale --tags $(TAGS)

clean:
	rm -rf bin data
