#!/usr/bin/env bash
# Portkey AI gateway (open-source Node build) as a benchmark peer.
#   portkey.sh install DIR
#   portkey.sh run DIR PORT UPSTREAM
#   portkey.sh headers UPSTREAM
#   portkey.sh version
#
# The gateway takes its port from `--port=N` and passes no hostname to the
# Node HTTP server (so it would listen on every interface); `run` preloads a
# small module that makes a listen() without a host use 127.0.0.1.
# Routing is per request: `x-portkey-provider: openai` plus
# `x-portkey-custom-host: UPSTREAM`; the client's bearer key is forwarded
# to the upstream as the OpenAI key. No config, cache or retries are used
# unless a request asks for them with x-portkey-* headers.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PEER=portkey
VERSION="1.15.2"

entry() { echo "$1/node_modules/@portkey-ai/gateway/build/start-server.js"; }

cmd_install() {
    local dir="$1" marker
    marker="$dir/.installed-portkey-$VERSION"
    [ -f "$marker" ] && [ -f "$(entry "$dir")" ] && return 0
    command -v node >/dev/null 2>&1 || die "needs node (20+) and npm"
    mkdir -p "$dir"
    # Dependencies are held at the versions in the gateway's own lockfile for
    # this release. With the newest @hono/node-server (1.19.x) every streamed
    # response fails ("TypeError: immutable" when the gateway adds its
    # x-portkey-* headers to the proxied upstream response).
    cat >"$dir/package.json" <<EOF
{
  "name": "portkey-bench-peer",
  "private": true,
  "dependencies": {
    "@portkey-ai/gateway": "$VERSION"
  },
  "overrides": {
    "@aws-crypto/sha256-js": "5.2.0",
    "@cfworker/json-schema": "4.0.3",
    "@hono/node-server": "1.13.5",
    "@hono/node-ws": "1.2.0",
    "@portkey-ai/mustache": "2.1.3",
    "@smithy/signature-v4": "2.1.1",
    "async-retry": "1.3.3",
    "avsc": "5.7.7",
    "hono": "4.9.7",
    "ioredis": "5.8.0",
    "jose": "6.0.11",
    "ws": "8.18.3",
    "zod": "3.25.76"
  }
}
EOF
    # The package's only install script is patch-package, which has nothing
    # to apply in the published tarball.
    npm install --prefix "$dir" --no-audit --no-fund --ignore-scripts --loglevel=error
    [ -f "$(entry "$dir")" ] || die "gateway entry point missing after npm install"
    touch "$marker"
}

upstream_host() {
    # http://host:port/path -> host (brackets stripped for IPv6 literals)
    local rest="${1#*://}"
    rest="${rest%%/*}"
    case "$rest" in
        \[*) rest="${rest#[}"; echo "${rest%%]*}" ;;
        *) echo "${rest%%:*}" ;;
    esac
}

cmd_run() {
    local dir="$1" port="$2" upstream="$3"
    [ -f "$(entry "$dir")" ] || die "not installed in $dir (run: $0 install $dir)"

    cat >"$dir/listen-loopback.mjs" <<'EOF'
// Give the gateway's HTTP server a loopback address when it asks for none.
import net from "node:net";
const host = process.env.BENCH_LISTEN_HOST || "127.0.0.1";
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === "number" && (args[1] === undefined || typeof args[1] === "function")) {
    args.splice(1, args[1] === undefined ? 1 : 0, host);
  }
  return listen.apply(this, args);
};
EOF

    cd "$dir"
    # Production mode and --headless: no bundled log UI and no /log/stream.
    export NODE_ENV=production
    # Custom hosts on loopback are allowed by default; also allow the
    # upstream's host in case it is not a loopback name.
    TRUSTED_CUSTOM_HOSTS="$(upstream_host "$upstream"),localhost,127.0.0.1,::1"
    export TRUSTED_CUSTOM_HOSTS
    export BENCH_LISTEN_HOST=127.0.0.1
    unset HTTP_PROXY HTTPS_PROXY http_proxy https_proxy REDIS_CONNECTION_STRING
    exec node --import "$dir/listen-loopback.mjs" "$(entry "$dir")" --port="$port" --headless
}

cmd_headers() {
    local upstream="$1"
    echo "x-portkey-provider: openai"
    echo "x-portkey-custom-host: $upstream"
}

peer_main "$@"
