# gpuproxy's everyday commands. Each one runs inside .venv, which scripts/dev.py creates on
# first use: `just` itself is installed there too (pip package rust-just).

set shell := ["bash", "-euo", "pipefail", "-c"]

dev := "python3 scripts/dev.py"

[doc("list the recipes")]
default:
    @just --list

[group("run")]
[doc("start the whole system on embedded defaults (nats-server, SQLite, gateway, workers)")]
run *args:
    {{dev}} up {{args}}

[group("test")]
[doc("run the whole test suite (extra arguments go to pytest)")]
test *args:
    {{dev}} test {{args}}

[group("test")]
[doc("the long soak variants, left out of the default suite")]
test-soak *args:
    {{dev}} test -m soak -o addopts="--strict-markers -ra" {{args}}

[group("test")]
[doc("the same suite against outside infrastructure, e.g. NATS_URL=... DATABASE_URL=...")]
test-outside nats_url database_url *args:
    {{dev}} test --nats-url {{nats_url}} --database-url {{database_url}} {{args}}

[group("check")]
[doc("ruff (lint and format) and mypy strict on our packages")]
lint:
    {{dev}} lint

[group("check")]
[doc("regenerate gateway/pb from proto/gpuproxy.proto")]
proto:
    {{dev}} proto

[group("check")]
[doc("fail when the committed generated code differs from a fresh generation")]
proto-check: proto
    git diff --exit-code -- gateway/pb

[group("bench")]
[doc("measure the command path and print ratios against same-run baselines")]
bench *args:
    {{dev}} bench {{args}}
