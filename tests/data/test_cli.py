"""The command-line conventions: one-line errors with exit status 2 (traceback with --debug), no
partial output, quiet third-party logs (back with -v); and every command line's bad input."""

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.cli import (
    LOG_FILE_ENV,
    ArgumentParser,
    UsageError,
    output_to,
    removed_on_failure,
    run_cli,
)

REPO = Path(__file__).resolve().parents[2]


def toy_main(argv):
    parser = ArgumentParser(prog="toy")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--file", type=Path)
    args = parser.parse_args(argv)
    logging.getLogger("data.toy").info("project record %d", args.n)
    logging.getLogger("vllm.engine").warning("third-party warning %d", args.n)
    warnings.warn("a library's deprecation", DeprecationWarning, stacklevel=1)
    if args.file is not None:
        args.file.read_text()  # OSError for a missing file
    if args.n < 0:
        raise ValueError(f"--n {args.n}: must be >= 0")
    if args.n == 99:
        raise TypeError("a bug, not bad input")
    print(f"result {args.n}")
    return 0


def test_bad_arguments_and_bad_input_end_in_one_line_and_status_2(tmp_path, capsys):
    assert run_cli(toy_main, ["--n", "x"]) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == ["error: --n: invalid int value: 'x'"] and out == ""
    assert run_cli(toy_main, []) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --n: required"]
    assert run_cli(toy_main, ["--n", "-3"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: --n -3: must be >= 0"
    missing = tmp_path / "nothing.txt"
    assert run_cli(toy_main, ["--n", "1", "--file", str(missing)]) == 2
    assert (
        capsys.readouterr().err.splitlines()[-1] == f"error: {missing}: No such file or directory"
    )


def test_debug_shows_the_traceback_and_a_bug_keeps_its_own(capsys):
    assert run_cli(toy_main, ["--n", "-3", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith(
        "error: --n -3: must be >= 0\n"
    )
    with pytest.raises(TypeError, match="a bug"):
        run_cli(toy_main, ["--n", "99"])


@pytest.mark.filterwarnings("ignore:a library's deprecation")  # -v leaves it to pytest
def test_quiet_by_default_verbose_with_v_and_everything_in_the_log_file(tmp_path, capsys):
    log = tmp_path / "logs" / "toy.log"
    before = {k: os.environ.get(k) for k in ("VLLM_LOGGING_LEVEL", "MEDVOL_VERBOSE", LOG_FILE_ENV)}
    os.environ[LOG_FILE_ENV] = str(log)
    try:
        assert run_cli(toy_main, ["--n", "1"]) == 0
    finally:
        os.environ.pop(LOG_FILE_ENV)
    out, err = capsys.readouterr()
    assert out == "result 1\n"
    assert "project record 1" in err
    assert "third-party warning" not in err and "deprecation" not in err
    written = log.read_text()
    assert "project record 1" in written and "third-party warning 1" in written
    assert "a library's deprecation" in written
    # -v: third-party records and warnings on the console again
    assert run_cli(toy_main, ["--n", "2", "-v"]) == 0
    err = capsys.readouterr().err
    assert "third-party warning 2" in err and "project record 2" in err
    # nothing of either command's set-up outlives it
    assert {k: os.environ.get(k) for k in before} == before
    files = [getattr(h, "baseFilename", None) for h in logging.getLogger().handlers]
    assert str(log) not in files


def test_a_failed_command_removes_only_what_it_created(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    new = tmp_path / "new"
    with pytest.raises(RuntimeError), removed_on_failure(new, existing):
        new.mkdir()
        (new / "half.bin").write_bytes(b"x")
        (existing / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")
    assert not new.exists() and (existing / "keep.txt").exists()


def test_output_to_catches_what_child_processes_print(tmp_path, capfd):
    with output_to(tmp_path / "child.log"):
        subprocess.run([sys.executable, "-c", "print('a page of instructions')"], check=True)
    print("back on the console")
    assert (tmp_path / "child.log").read_text() == "a page of instructions\n"
    assert capfd.readouterr().out == "back on the console\n"


def test_the_parser_turns_an_unknown_option_into_a_usage_error():
    with pytest.raises(UsageError, match="^--bogus: unrecognized argument$"):
        ArgumentParser(prog="toy").parse_args(["--bogus"])


# Every command line, given bad input, as a user runs it.


def command(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(done, *fragments):
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert str(fragment) in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def broken_nifti(tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken")
    good = folder / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 16), np.int16), np.eye(4)), str(good))
    broken = folder / "ct.nii.gz"
    broken.write_bytes(good.read_bytes()[:200])
    return broken


def test_predict_bad_input(tmp_path, broken_nifti):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "out"
    base = ["evaluation.predict", "--query", "liver", "--model", model, "--out-dir", out]
    one_error_line(command(*base, "--image", broken_nifti), broken_nifti, "not a readable NIfTI")
    one_error_line(command(*base, "--image", tmp_path / "none.nii.gz"), "none.nii.gz", "no such")
    one_error_line(command(*base, "--image", broken_nifti, "--window", "abdomn"), "--window")
    queries = tmp_path / "q.txt"
    queries.write_text("x" * 1001 + "\n")
    one_error_line(
        command(*base, "--image", broken_nifti, "--queries", queries), "q.txt, line 1", "over 1000"
    )
    assert not out.exists()
    debug = command(*base, "--image", broken_nifti, "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert debug.stderr.splitlines()[-1].startswith(f"error: {broken_nifti}")


def test_evaluate_bad_input(tmp_path):
    one_error_line(
        command("evaluation.evaluate", "--config", tmp_path / "none.yaml"), "--config", "none.yaml"
    )
    one_error_line(
        command("evaluation.evaluate", "--config", "configs/tiny.yaml", "data.num_slices=many"),
        "configs/tiny.yaml",
        "data.num_slices",
    )
    out = tmp_path / "eval"
    one_error_line(
        command(
            "evaluation.evaluate",
            "--config",
            "configs/tiny.yaml",
            f"data.manifest={tmp_path / 'none.jsonl'}",
            "--out-dir",
            out,
        ),
        "none.jsonl",
    )
    assert not out.exists()


def test_score_bad_input(tmp_path, phantom_manifest):
    completions = tmp_path / "c.jsonl"
    completions.write_text("{not json\n")
    out = tmp_path / "scores.jsonl"
    args = ["--manifest", phantom_manifest, "--completions", completions, "--out-file", out]
    one_error_line(command("reward_server.score", *args), "c.jsonl, line 1", "not JSON")
    assert not out.exists() and not list(tmp_path.glob(".*partial*"))
    one_error_line(
        command(
            "reward_server.score", *args[:2], "--completions", tmp_path / "no.jsonl", *args[4:]
        ),
        "--completions",
        "no.jsonl",
    )


def test_sft_bad_input(tmp_path):
    one_error_line(
        command(
            "learner.sft",
            "--config",
            "configs/tiny.yaml",
            f"output_dir={tmp_path / 'run'}",
            f"data.manifest={tmp_path / 'none.jsonl'}",
        ),
        "data.manifest",
        "none.jsonl",
    )
    one_error_line(command("learner.sft", "--config", "configs/tiny.yaml", "sft.lr"), "sft.lr")
    assert not (tmp_path / "run").exists()


def test_phantoms_and_m3dseg_bad_input(tmp_path):
    out = tmp_path / "phantoms"
    one_error_line(command("data.phantoms", "--out-dir", out, "--cases", "0"), "--cases 0")
    one_error_line(
        command("data.phantoms", "--out-dir", out, "--volume-shape", "4", "8", "8"),
        "--volume-shape",
    )
    assert not out.exists()
    one_error_line(
        command("data.m3dseg", "--root", tmp_path / "nowhere", "--out-file", tmp_path / "m.jsonl"),
        "nowhere",
    )
    assert not (tmp_path / "m.jsonl").exists()


def test_default_run_bad_input(tmp_path):
    out = tmp_path / "run"
    one_error_line(command("cluster.default_run", "--out-dir", out, "--cases", "2"), "--cases 2")
    one_error_line(
        command("cluster.default_run", "--out-dir", out, "--val-every", "-1"), "--val-every -1"
    )
    one_error_line(
        command("cluster.default_run", "--out-dir", out, "grpo.lr=fast"),
        "configs/tiny.yaml",
        "grpo.lr",
    )
    one_error_line(command("cluster.default_run", "--config", tmp_path / "x.yaml"), "x.yaml")
    assert not out.exists()


def test_the_errors_name_a_file_when_a_manifest_row_is_bad(tmp_path, phantom_manifest):
    rows = [json.loads(line) for line in phantom_manifest.read_text().splitlines()]
    rows[0]["image"] = "../outside.nii.gz"
    bad = phantom_manifest.parent / "bad_manifest.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    completions = tmp_path / "c.jsonl"
    completions.write_text("")
    line = one_error_line(
        command(
            "reward_server.score",
            "--manifest",
            bad,
            "--completions",
            completions,
            "--out-file",
            tmp_path / "s.jsonl",
        ),
        "bad_manifest.jsonl",
    )
    assert "outside" in line
