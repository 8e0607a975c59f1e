# Shared by unit.sh and e2e.sh (sourced). Sets CLIENT (client-vscode/) and REPO (the repository root).
CLIENT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO="$(cd "$CLIENT/.." && pwd)"

# `npm ci` only when node_modules is missing or package-lock.json changed since the last install.
ensure_node_modules() {
  local sum stamp="$CLIENT/node_modules/.star-lock.sha256"
  sum=$(sha256sum "$CLIENT/package-lock.json" | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sum" ]; then return 0; fi
  echo "npm ci (client-vscode)"
  (cd "$CLIENT" && npm ci --no-audit --no-fund --loglevel=error) || return 1
  echo "$sum" > "$stamp"
}

compile() {
  rm -rf "$CLIENT/out"
  (cd "$CLIENT" && node_modules/.bin/tsc -p .)
}
