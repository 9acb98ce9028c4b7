"""The wheels for a GPU box: pins with markers, the Ray-free closure, what the box already has."""

import pytest

from bench.gpu_wheels import LOCK, TOP, Wheel, carried_set, closure, parse_args, read_pins
from common.cli import UsageError


def test_pins_follow_the_boxs_python_and_canonical_names(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text(
        "# a comment\n"
        "PyYAML==6.0.4\n"
        "pydantic_core==2.50.5  # trailing comment\n"
        "-e ./local\n"
        "sam2 @ file:///wheels/sam2-1.1.0-py3-none-any.whl#sha256=00\n"
        'setuptools==84.2.1; python_version < "3.12"\n'
        'setuptools==80.10.2; python_version >= "3.12"\n'
    )
    assert read_pins(lock, "3.12") == {
        "pyyaml": "6.0.4",
        "pydantic-core": "2.50.5",
        "setuptools": "80.10.2",
    }
    assert read_pins(lock, "3.11")["setuptools"] == "84.2.1"
    # the real GPU lock, as the box's Python 3.12 reads it
    pins = read_pins(LOCK, "3.12")
    assert (pins["transformers"], pins["deepspeed"], pins["setuptools"]) == (
        "5.19.0",
        "0.19.8",
        "80.10.2",
    )


def test_a_line_that_is_no_requirement_names_the_file_and_line(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("numpy==2.3.5\nfoo bar==1\n")
    with pytest.raises(UsageError, match=r"lock.txt:2: 'foo bar==1' is not a requirement"):
        read_pins(lock, "3.12")
    with pytest.raises(UsageError, match=r"missing.txt: cannot read"):
        read_pins(tmp_path / "missing.txt", "3.12")


def test_the_closure_is_ray_free_and_leaves_torchs_own_to_the_box():
    names = closure(TOP, "3.12")
    # what the learner, MedSAM2 and the transformers engine import, and what those need
    needed = {"transformers", "peft", "deepspeed", "sam2", "hydra-core", "omegaconf", "iopath"}
    needed |= {"antlr4-python3-runtime", "pydantic", "tokenizers", "hjson", "nibabel"}
    assert needed <= set(names)
    for left_out in ("torch", "torchvision", "triton", "ray", "vllm", "mlflow"):
        assert left_out not in names
    assert not [name for name in names if name.startswith(("nvidia-", "cuda-"))]


def test_the_box_keeps_what_it_has_at_our_version_and_the_kept_numerics():
    names = ["hjson", "numpy", "scipy", "transformers"]
    lock = {"hjson": "3.1.0", "numpy": "2.3.5", "scipy": "1.17.1", "transformers": "5.19.0"}
    have = {"hjson": "3.1.0", "numpy": "2.4.6", "transformers": "5.17.0"}
    carried, served = carried_set(names, lock, have, ("NumPy", "scipy"))
    assert carried == [
        Wheel("scipy", "1.17.1", "the box lacks it"),
        Wheel("transformers", "5.19.0", "the box has 5.17.0"),
    ]
    assert served == [
        "hjson 3.1.0 (the box has it)",
        "numpy 2.4.6 on the box, not the lock's 2.3.5 (--keep)",
    ]
    # a box whose freeze is unknown gets every wheel at the lock's version
    carried, served = carried_set(names, lock, None, ("numpy",))
    assert [wheel.version for wheel in carried] == ["3.1.0", "2.3.5", "1.17.1", "5.19.0"]
    assert served == []


def test_the_command_refuses_a_folder_with_wheels_in_it_and_a_bad_python(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "transformers-5.17.0-py3-none-any.whl").write_bytes(b"")
    with pytest.raises(UsageError, match=r"old: not empty; give a new folder"):
        parse_args([str(tmp_path / "old")])
    with pytest.raises(UsageError, match=r"--python-version 3: give 3.11, 3.12"):
        parse_args([str(tmp_path / "new"), "--python-version", "3"])
    assert parse_args([str(tmp_path / "new")]).python_version == "3.12"
