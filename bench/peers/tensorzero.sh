#!/usr/bin/env bash
# TensorZero gateway as a benchmark peer.
#   tensorzero.sh install DIR
#   tensorzero.sh run DIR PORT UPSTREAM
#   tensorzero.sh headers UPSTREAM
#   tensorzero.sh version
#
# The `tensorzero` wheel on PyPI ships no gateway executable: it is a Python
# client whose native module (tensorzero.abi3.so) compiles in the whole Rust
# gateway core. That module exposes `_start_http_gateway`, which runs the real
# axum HTTP server of the gateway (OpenAI-compatible routes only, at
# /openai/v1/...) on the module's tokio runtime inside the Python process.
# It always binds 127.0.0.1 on a kernel-chosen port, so `run` preloads a tiny
# shim (compiled with cc at install time) that turns that single bind of
# 127.0.0.1:0 into 127.0.0.1:$PORT. Nothing else in the process is touched;
# after start-up the Python main thread only waits for SIGTERM/SIGINT.
# Like TensorZero's standalone gateway, the server leaves Nagle on; set
# BENCH_TCP_NODELAY=1 in the environment of `run` to turn it off.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

PEER=tensorzero
VERSION="2026.6.0"

write_shim_source() {
    cat >"$1" <<'EOF'
/* LD_PRELOAD shim: the first bind() to 127.0.0.1:0 goes to 127.0.0.1:$BENCH_BIND_PORT.
 * With BENCH_TCP_NODELAY=1 that listener also gets TCP_NODELAY (inherited by
 * accepted connections); TensorZero itself does not set it. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);
static atomic_int rewritten;

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real_bind;
    if (!real_bind) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
    const char *want = getenv("BENCH_BIND_PORT");
    if (want && addr && len >= (socklen_t)sizeof(struct sockaddr_in) && addr->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)addr;
        if (in->sin_port == 0 && in->sin_addr.s_addr == htonl(INADDR_LOOPBACK)
            && !atomic_exchange(&rewritten, 1)) {
            struct sockaddr_in fixed = *in;
            fixed.sin_port = htons((unsigned short)atoi(want));
            const char *nodelay = getenv("BENCH_TCP_NODELAY");
            if (nodelay && strcmp(nodelay, "1") == 0) {
                int one = 1;
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            }
            return real_bind(fd, (const struct sockaddr *)&fixed, sizeof fixed);
        }
    }
    return real_bind(fd, addr, len);
}
EOF
}

write_server() {
    cat >"$1" <<'EOF'
import os
import signal
import sys

# Block SIGTERM/SIGINT before the gateway's runtime threads exist, so they
# inherit the mask and the signal always reaches the sigwait() below.
STOP = {signal.SIGTERM, signal.SIGINT}
signal.pthread_sigmask(signal.SIG_BLOCK, STOP)

import tensorzero  # noqa: E402

port = os.environ["BENCH_BIND_PORT"]
gateway = tensorzero._start_http_gateway(
    config_file=sys.argv[1],
    clickhouse_url=None,
    postgres_url=None,
    valkey_url=None,
    async_setup=False,
)
if not gateway.base_url.startswith(f"http://127.0.0.1:{port}/"):
    sys.exit(f"tensorzero gateway bound {gateway.base_url}, not port {port} (bind shim not applied?)")
print(f"tensorzero {tensorzero.__version__}: gateway serving at {gateway.base_url}", flush=True)
signal.sigwait(STOP)
os._exit(0)
EOF
}

shim_is_current() {
    local dir="$1"
    [ -f "$dir/bindport.so" ] && [ -f "$dir/bindport.c" ] || return 1
    write_shim_source "$dir/.bindport.c.new"
    local same=1
    if cmp -s "$dir/.bindport.c.new" "$dir/bindport.c"; then same=0; fi
    rm -f "$dir/.bindport.c.new"
    return "$same"
}

cmd_install() {
    local dir="$1" marker
    marker="$dir/.installed-tensorzero-$VERSION"
    [ -f "$marker" ] && shim_is_current "$dir" && return 0
    mkdir -p "$dir"
    command -v cc >/dev/null 2>&1 || die "needs a C compiler (cc) for the bind shim: apt-get install gcc"
    if [ ! -f "$marker" ]; then
        pip_install "$dir" "tensorzero==$VERSION"
        "$dir/venv/bin/python" - <<'EOF' || die "this tensorzero wheel has no embedded HTTP gateway (_start_http_gateway)"
import tensorzero, sys
sys.exit(0 if hasattr(tensorzero, "_start_http_gateway") else 1)
EOF
    fi
    write_shim_source "$dir/bindport.c"
    cc -O2 -shared -fPIC -o "$dir/bindport.so" "$dir/bindport.c" -ldl
    touch "$marker"
}

cmd_run() {
    local dir="$1" port="$2" upstream="$3"
    [ -f "$dir/.installed-tensorzero-$VERSION" ] && [ -f "$dir/bindport.so" ] \
        || die "not installed in $dir (run: $0 install $dir)"

    cat >"$dir/tensorzero.toml" <<EOF
[gateway]
observability.enabled = false
disable_pseudonymous_usage_analytics = true
debug = false

[models.bench-model]
routing = ["upstream"]

[models.bench-model.providers.upstream]
type = "openai"
model_name = "bench-model"
api_base = "$upstream"
api_key_location = "env::BENCH_UPSTREAM_API_KEY"
EOF
    write_server "$dir/serve.py"

    cd "$dir"
    unset TENSORZERO_CLICKHOUSE_URL TENSORZERO_POSTGRES_URL TENSORZERO_VALKEY_URL \
          OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
    export TENSORZERO_DISABLE_PSEUDONYMOUS_USAGE_ANALYTICS=1
    export BENCH_UPSTREAM_API_KEY=sk-upstream-dummy
    export RUST_LOG=warn
    export PYTHONUNBUFFERED=1
    export BENCH_BIND_PORT="$port"
    export LD_PRELOAD="$dir/bindport.so${LD_PRELOAD:+:$LD_PRELOAD}"
    exec "$dir/venv/bin/python" "$dir/serve.py" "$dir/tensorzero.toml"
}

cmd_headers() {
    echo "#model: tensorzero::model_name::bench-model"
    echo "#path: /openai/v1/chat/completions"
}

peer_main "$@"
