"""The early-exit head on the trust_remote_code families: the last index equals the model's own logits,
whether or not the family's last hidden state already carries the final norm (GLM-4V's does not)."""
import pytest
import torch

import hallupatch
import tiny_remote
from hallupatch.spec import resolve


@pytest.mark.parametrize("family", ["qwen", "chatglm"])
def test_last_index_equals_model_logits_and_lower_layers_use_the_final_norm(family, tmp_path):
    model = tiny_remote.build_remote_model(family)
    inputs = tiny_remote.benchmark_inputs(family, prompt_tokens=6, workdir=tmp_path)
    out = model(**inputs, output_hidden_states=True)
    parts = resolve(model)
    n = parts.num_layers
    assert len(out.hidden_states) == n + 1
    torch.testing.assert_close(hallupatch.early_exit_logits(model, out.hidden_states, n), out.logits.float(),
                               rtol=1e-5, atol=1e-5)
    h = out.hidden_states[1]
    assert torch.equal(hallupatch.early_exit_logits(model, out.hidden_states, 1), parts.lm_head(parts.final_norm(h)))
    assert torch.equal(hallupatch.early_exit_logits(model, h, 1, norm=False), parts.lm_head(h))
