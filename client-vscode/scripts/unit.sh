#!/usr/bin/env bash
# Unit tests of the VS Code extension: npm ci (only when needed), tsc, node --test.
# Ends with node's test runner summary (# tests / # pass / # fail).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
export npm_config_update_notifier=false
ensure_node_modules
compile
cd "$CLIENT"
node --test out/test/*.test.js
