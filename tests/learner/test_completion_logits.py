"""completion_logits computes only the completion's rows of logits (the tiny Qwen3-VL, fp32)."""

import pytest
import torch

from learner.encoding import completion_logits, encode
from tests.rollout.conftest import make_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_and_processor(tiny_model):
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(tiny_model)


def test_only_the_completion_rows_go_through_the_lm_head_and_they_equal_the_full_slice(
    model_and_processor,
):
    """The LM head sees T rows (the positions predicting the T completion tokens), not the
    whole sequence's n + T, and the logits equal the rows n - 1 .. n + T - 2 of the
    full-sequence logits to 1e-6 absolute in fp32: the hidden states are the same, but the LM
    head's matmul over 5 rows rounds apart from one over 236 (measured: 4.2e-7 at most on
    logits up to 0.88; bit for bit at 64 completion tokens)."""
    model, processor = model_and_processor
    prompt = make_prompt("a", slices=2)
    ids = [20, 31, 40, 41, 900]
    seq = encode(processor, prompt.messages, ids)
    rows = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: rows.append(out.shape[1]))
    try:
        with torch.no_grad():
            ours = completion_logits(model, seq, "cpu")
            full = model(**seq.inputs, use_cache=False).logits[0]
    finally:
        hook.remove()
    n, total = seq.prompt_len, seq.inputs["input_ids"].shape[1]
    assert rows == [len(ids), total] and total == n + len(ids) and n > 50
    assert ours.shape == (len(ids), full.shape[-1])
    torch.testing.assert_close(ours, full[n - 1 : n - 1 + len(ids)], rtol=0, atol=1e-6)
