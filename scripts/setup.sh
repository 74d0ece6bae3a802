# Sourced by demo.sh and test.sh: make .venv with orch and its dev tools installed.
# Needs Python 3.11+, a C/C++ compiler and cmake (llama-cpp-python builds llama.cpp from
# source on first install: about 5 minutes on 2 cores; later runs reuse pip's cache).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "orch needs Python 3.11 or newer (found: $("$python" --version 2>&1)); set PYTHON=..." >&2
    exit 1
fi
for tool in cc c++ cmake; do
    command -v "$tool" >/dev/null || { echo "orch needs '$tool' to build llama.cpp; install it first" >&2; exit 1; }
done
stamp=".venv/.orch-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    [ -x .venv/bin/pip ] || "$python" -m venv --clear .venv || {
        echo "could not create .venv: install your Python's venv module (e.g. python3-venv)" >&2
        exit 1; }
    echo "installing orch into .venv (the first time builds llama.cpp: ~5 min on 2 cores)" >&2
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[dev]'
    touch "$stamp"
fi
# The checkout's testkit (shared by tests/ and bench/) is on the venv's path; no wheel has it.
site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
[ -f "$site/orch-checkout.pth" ] || echo "$root" > "$site/orch-checkout.pth"
export PATH="$root/.venv/bin:$PATH"
