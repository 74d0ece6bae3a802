"""Exactness on generated random-weight models: every supported architecture variant and
tensor type, split at the first, middle and last layer boundaries, equals the unsplit model.
"""

from __future__ import annotations

import pytest

from orchcore.modelgen import GType, preset
from testkit.chain import assert_split_exact
from testkit.models import generated_model

STEPS = 12
PROMPT = [1, 17, 300, 42, 99, 5, 260, 77]

ARCHS = ["tiny-llama-gqa", "tiny-llama-mha-untied", "tiny-qwen2", "tiny-qwen3"]
TYPES = [GType.F32, GType.F16, GType.Q8_0, GType.Q4_0, GType.Q4_K, GType.Q6_K]
K_QUANTS = {GType.Q4_K, GType.Q6_K}


def _check_exact(model, tmp_path, threads, cuts_list):
    assert_split_exact(model, tmp_path, threads, cuts_list, PROMPT, STEPS)


@pytest.mark.parametrize("wtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("name", ARCHS)
def test_generated_chain_equals_unsplit(name, wtype, tmp_path, threads):
    width = {"n_embd": 256, "n_ff": 512} if wtype in K_QUANTS else {}
    spec = preset(name, weight_type=wtype, n_layers=4, **width)
    model = generated_model(spec)
    _check_exact(model, tmp_path, threads, [[1], [3], [1, 2]])
