"""The tiny Qwen3-VL folder: loads like the real checkpoint, deterministic, reused, token counts."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from rollout.tiny_model import SPECIAL_TOKENS, THINK_TOKENS, build_tiny_qwen3vl, main


def digest(folder):
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_same_seed_same_weights_other_seed_other_weights_and_reuse(tiny_model, tmp_path):
    again = build_tiny_qwen3vl(tmp_path / "again", "test", seed=0)
    assert digest(again) == digest(tiny_model)
    assert (again / "tokenizer.json").read_text() == (tiny_model / "tokenizer.json").read_text()
    other = build_tiny_qwen3vl(tmp_path / "other", "test", seed=1)
    assert digest(other) != digest(tiny_model)
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    assert main(["--out-dir", str(again), "--model-size", "test"]) == 0
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt


@pytest.mark.parametrize("size", ["medium", "small"])
def test_each_larger_size_builds_with_its_dimensions(size, tmp_path):
    import json

    from rollout.tiny_model import SIZES

    config = json.loads((build_tiny_qwen3vl(tmp_path, size) / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    want = SIZES[size]
    assert (text["hidden_size"], text["num_hidden_layers"]) == (want["hidden"], want["layers"])
    assert text["num_attention_heads"] == want["heads"]
    assert text["num_key_value_heads"] == want["kv_heads"]
    assert text["head_dim"] == 64  # every size keeps the test size's head width
    assert (vision["hidden_size"], vision["depth"]) == (want["vision_hidden"], want["vision_depth"])
    assert vision["out_hidden_size"] == want["hidden"]


def test_unknown_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny model size 'huge'"):
        build_tiny_qwen3vl(tmp_path, "huge")


def test_processor_tokens_and_slices_pass_unresized(tiny_model):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model)
    tok = processor.tokenizer
    for token in SPECIAL_TOKENS + THINK_TOKENS:
        assert tok.convert_tokens_to_ids(token) is not None
        assert tok.tokenize(token) == [token]
    # <think> survives decoding (answers carry it); <|im_end|> ends a turn.
    ids = tok.encode('<think>a</think> {"k": 12}')
    assert tok.decode(ids, skip_special_tokens=True) == '<think>a</think> {"k": 12}'
    assert tok.eos_token == "<|im_end|>"
    for size, tokens in ((256, 64), (64, 4)):
        image = Image.fromarray(np.zeros((size, size, 3), np.uint8))
        out = processor.image_processor(images=[image])
        assert out["image_grid_thw"].tolist() == [[1, size // 16, size // 16]]  # not resized
        assert int(out["image_grid_thw"].prod()) // 4 == tokens  # merge 2x2 patches a token
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>q<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_every_coordinate_is_one_token_and_answers_decode_back(tiny_model):
    from transformers import AutoProcessor

    from rollout.tiny_model import NUMBER_TOKENS

    tok = AutoProcessor.from_pretrained(tiny_model).tokenizer
    for n in (0, 7, 64, 99, 100, 255, 256, NUMBER_TOKENS - 1):
        assert tok.tokenize(str(n)) == [str(n)], n
    answer = '{"key_slice": 12, "bbox_2d_list": [[18, 41, 169, 95], [127, 3, 99, 108]]}'
    ids = tok.encode(answer)
    pieces = [tok.decode([i]) for i in ids]
    numbers = ["12", "2", "18", "41", "169", "95", "127", "3", "99", "108"]  # "2" of bbox_2d
    assert [p for p in pieces if p.isdigit()] == numbers
    assert tok.decode(ids) == answer


def test_transformers_and_peft_load_it_and_it_generates(tiny_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model, dtype=torch.float32)
    assert model.config.text_config.head_dim == 64
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert 0 < trainable < total
    ids = torch.tensor([[1, 2, 3]])
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)
