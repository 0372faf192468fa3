#!/usr/bin/env bash
# Installs the peer tools this project is benchmarked against, each into a git-ignored venv of its own in the
# repository root. They are AGPL-3.0 programs run as separate processes (subspace/baselines/), never imported
# and never a dependency of this project.
#
#   scripts/install_peers.sh                  # both
#   scripts/install_peers.sh abliterix        # one: heretic | abliterix
#   scripts/install_peers.sh --force heretic  # remove and rebuild a venv that is already there
#
#   heretic   (PyPI heretic-llm, AGPL-3.0)  -> .venv-heretic/    the project reads SUBSPACE_HERETIC_PYTHON to override
#   abliterix (PyPI abliterix, AGPL-3.0)    -> .venv-abliterix/  the project reads SUBSPACE_ABLITERIX_PYTHON to override
#
# Environment:
#   TORCH_SPEC      pip requirement(s) for torch, installed first and kept through the peer's install (default
#                   "torch==2.13.0", the CPU build this project's machines have locally). Neither peer pins torch,
#                   and an open range makes pip fetch the newest multi-GB CUDA build. GPU users set it to the CUDA
#                   build they want, e.g. TORCH_SPEC="torch==2.13.0" with PIP_INDEX_URL/PIP_EXTRA_INDEX_URL pointing
#                   at a CUDA wheel index, or TORCH_SPEC="torch" for whatever pip picks.
#   HERETIC_SPEC    default "heretic-llm==1.4.*" (the driver answers heretic 1.4's prompts)
#   ABLITERIX_SPEC  default "abliterix==1.12.*" (the driver reads abliterix 1.12's output)
#   BASE_PYTHON     interpreter the venvs are made from (default python3; both peers need >= 3.10)
set -euo pipefail

ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
HERETIC_SPEC="${HERETIC_SPEC:-heretic-llm==1.4.*}"
ABLITERIX_SPEC="${ABLITERIX_SPEC:-abliterix==1.12.*}"
BASE_PYTHON="${BASE_PYTHON:-python3}"

usage() {
    sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

force=0
peers=()
for arg in "$@"; do
    case "$arg" in
        --force|-f) force=1 ;;
        heretic|abliterix) peers+=("$arg") ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install_peers.sh: unknown argument '$arg' (expected heretic, abliterix, --force)" >&2; exit 2 ;;
    esac
done
[ ${#peers[@]} -gt 0 ] || peers=(heretic abliterix)

venv_of() { echo "$ROOT/.venv-$1"; }
dist_of() { case "$1" in heretic) echo heretic-llm ;; abliterix) echo abliterix ;; esac; }
module_of() { echo "$1"; }  # heretic-llm installs the package "heretic", abliterix "abliterix"
spec_of() { case "$1" in heretic) echo "$HERETIC_SPEC" ;; abliterix) echo "$ABLITERIX_SPEC" ;; esac; }
env_var_of() {
    case "$1" in heretic) echo SUBSPACE_HERETIC_PYTHON ;; abliterix) echo SUBSPACE_ABLITERIX_PYTHON ;; esac
}

# A venv "works" when its python runs and has both torch and the peer installed (checked from package metadata,
# without importing torch).
works() {
    local py="$1/bin/python"
    [ -x "$py" ] && "$py" - "$(dist_of "$2")" "$(module_of "$2")" <<'EOF' >/dev/null 2>&1
import importlib.metadata as md, importlib.util, sys
md.version("torch"); md.version(sys.argv[1])
sys.exit(importlib.util.find_spec(sys.argv[2]) is None)
EOF
}

install_one() {
    local peer="$1" venv dist spec start
    venv="$(venv_of "$peer")"
    dist="$(dist_of "$peer")"
    spec="$(spec_of "$peer")"
    if [ "$force" -eq 0 ] && works "$venv" "$peer"; then
        echo "== $peer: $venv already works ($dist $("$venv/bin/python" -c \
            "import importlib.metadata as m; print(m.version('$dist'))")); skipped (--force rebuilds it)"
        return 0
    fi
    start=$SECONDS
    echo "== $peer: installing $spec into $venv"
    rm -rf -- "$venv"
    "$BASE_PYTHON" -m venv "$venv"
    # torch first, on its own, so that the pinned build is the one installed ...
    # shellcheck disable=SC2086  # TORCH_SPEC may hold several requirements
    "$venv/bin/python" -m pip install $TORCH_SPEC
    # ... and named again with the peer, so that no dependency's range replaces it.
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install $TORCH_SPEC "$spec"
    if ! works "$venv" "$peer"; then
        echo "install_peers.sh: $venv was built but has no importable $dist" >&2
        return 1
    fi
    echo "== $peer: installed $dist $("$venv/bin/python" -c \
        "import importlib.metadata as m; print(m.version('$dist'))") in $((SECONDS - start)) s"
}

for peer in "${peers[@]}"; do
    install_one "$peer"
done

echo
for peer in "${peers[@]}"; do
    echo "$peer: $(venv_of "$peer")/bin/python  (override with $(env_var_of "$peer")=/path/to/python)"
done
