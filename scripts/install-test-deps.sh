#!/bin/sh
# System packages some tests use beyond the Python ones in .venv:
# - `promtool` (Debian's `prometheus` package) checks deploy/prometheus/*.yaml;
# - `chromium` and `chromium-driver` (Debian's) drive the dashboard's browser test
#   (tests/http/test_dashboard_browser.py, marker `browser`); nothing is downloaded by Selenium.
# Run by `make test`; CI runs it as root. Never fails the build: a test whose tool is still
# missing skips and says why.
set -u

install() {  # install PACKAGE... unless COMMAND exists: install COMMAND PACKAGE...
    command -v "$1" >/dev/null 2>&1 && return 0
    shift
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "install-test-deps: $* missing; install Debian's $* as root" >&2
        return 0
    fi
    echo "install-test-deps: apt-get install -y $*" >&2
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" \
            >/dev/null 2>&1; then
        apt-get update >/dev/null 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" \
            >/dev/null 2>&1 || echo "install-test-deps: could not install $*" >&2
    fi
}

install promtool prometheus
install chromedriver chromium chromium-driver
exit 0
