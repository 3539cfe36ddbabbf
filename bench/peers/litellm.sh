#!/usr/bin/env bash
# LiteLLM proxy as a benchmark peer.
#   litellm.sh install DIR
#   litellm.sh run DIR PORT UPSTREAM
#   litellm.sh headers UPSTREAM
#   litellm.sh version
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# Newest release whose `[proxy]` extra resolves from PyPI on Python 3.11
# (later 1.108.x/1.109.x/1.110.x pin litellm-enterprise / litellm-proxy-extras
# builds that are not published).
PEER=litellm
VERSION="1.108.7"

cmd_install() {
    local dir="$1" marker
    marker="$dir/.installed-litellm-$VERSION"
    [ -f "$marker" ] && [ -x "$dir/venv/bin/litellm" ] && return 0
    mkdir -p "$dir"
    pip_install "$dir" "litellm[proxy]==$VERSION"
    touch "$marker"
}

cmd_run() {
    local dir="$1" port="$2" upstream="$3"
    [ -x "$dir/venv/bin/litellm" ] || die "not installed in $dir (run: $0 install $dir)"

    cat >"$dir/config.yaml" <<EOF
model_list:
  - model_name: bench-model
    litellm_params:
      model: openai/bench-model
      api_base: "$upstream"
      api_key: sk-upstream-dummy
      max_retries: 0

litellm_settings:
  num_retries: 0
  cache: false
  set_verbose: false
  json_logs: false
  request_timeout: 600
  callbacks: []
  success_callback: []
  failure_callback: []

router_settings:
  num_retries: 0
  retry_after: 0
  disable_cooldowns: true
  enable_pre_call_checks: false

general_settings:
  master_key: sk-bench
  disable_spend_logs: true
  disable_error_logs: true
  background_health_checks: false
EOF

    cd "$dir"
    # No database: make sure nothing from the caller's environment points at one.
    unset DATABASE_URL DIRECT_URL REDIS_HOST REDIS_URL REDIS_PORT REDIS_PASSWORD
    export LITELLM_LOCAL_MODEL_COST_MAP=True   # do not fetch the cost map at startup
    export LITELLM_LOG=ERROR                   # also silences uvicorn's access log
    export LITELLM_MODE=PRODUCTION             # do not load a .env file
    export STORE_MODEL_IN_DB=False
    export DISABLE_ADMIN_UI=True
    export NO_DOCS=True
    export LITELLM_TELEMETRY_DISABLED=true     # veto the opt-in usage telemetry
    export PYTHONUNBUFFERED=1
    exec "$dir/venv/bin/litellm" \
        --config "$dir/config.yaml" \
        --host 127.0.0.1 --port "$port" \
        --num_workers 1
}

cmd_headers() {
    # Standard OpenAI path and model name; the client's bearer key is the master key.
    :
}

peer_main "$@"
