# Sourced by each peer script: the shared helpers and the command dispatch.
# The script sets PEER (its name) and VERSION, and defines cmd_install, cmd_run and cmd_headers.

die() { echo "$PEER.sh: $*" >&2; exit 1; }

usage() {
    echo "usage: $0 install DIR | run DIR PORT UPSTREAM | headers UPSTREAM | version" >&2
    exit 2
}

pick_python() {
    local p
    for p in "${PYTHON:-}" python3.11 python3; do
        [ -n "$p" ] && command -v "$p" >/dev/null 2>&1 && { echo "$p"; return; }
    done
    die "no python3 found"
}

# A venv in DIR/venv with exactly one pinned package (and what it depends on).
pip_install() {
    local dir="$1" requirement="$2"
    [ -x "$dir/venv/bin/python" ] || "$(pick_python)" -m venv "$dir/venv"
    "$dir/venv/bin/python" -m pip install --disable-pip-version-check --no-input -q "$requirement"
}

peer_main() {
    [ $# -ge 1 ] || usage
    case "$1" in
        install) [ $# -eq 2 ] || usage; cmd_install "$2" ;;
        run)     [ $# -eq 4 ] || usage; cmd_run "$2" "$3" "$4" ;;
        headers) [ $# -eq 2 ] || usage; cmd_headers "$2" ;;
        version) echo "$VERSION" ;;
        *) usage ;;
    esac
}
