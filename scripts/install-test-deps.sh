#!/bin/sh
# System packages some tests use beyond the Python ones in .venv: `promtool` (Debian's
# `prometheus` package) checks deploy/prometheus/*.yaml. Run by `make test`; CI runs it as root.
# Never fails the build: a test whose tool is still missing skips and says why.
set -u
if command -v promtool >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-deps: promtool missing; install Debian's prometheus package as root" >&2
    exit 0
fi
echo "install-test-deps: apt-get install -y prometheus (for promtool)" >&2
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
        >/dev/null 2>&1; then
    apt-get update >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
        >/dev/null 2>&1 || echo "install-test-deps: could not install prometheus" >&2
fi
exit 0
