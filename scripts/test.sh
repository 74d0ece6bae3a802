#!/usr/bin/env bash
# The whole test suite (and lint). Extra arguments go to pytest.
source "$(dirname "$0")/setup.sh"
source "$(dirname "$0")/test-deps.sh"
ruff check .
lint-imports --no-cache
python -m pytest "$@"
