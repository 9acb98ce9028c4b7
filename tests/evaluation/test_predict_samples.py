"""predict --samples N: the agreement and the consensus of N masks by hand, and a run with three
sampled answers whose evidence.json the review page reads."""

import json

import numpy as np
import pytest

from evaluation.metrics import consensus_mask, mask_agreement
from evaluation.predict import PredictError, console_line, predict
from tests.data.dicom_series import oblique_phantom

SLICES, SIZE = 16, 96
QUERY = "the organ that secretes bile"


def masks(*rows):
    return [np.array(row, bool).reshape(1, 1, -1) for row in rows]


def test_agreement_of_three_masks_by_hand():
    # A holds 4 voxels, B 4 (2 shared with A), C none:
    # Dice(A, B) = 2 * 2 / (4 + 4) = 0.5, Dice(A, C) = Dice(B, C) = 0 -> mean 0.5 / 3
    a, b, c = masks([1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0])
    assert mask_agreement([a, b, c]) == pytest.approx(1 / 6)
    # A, A, C: Dice 1, 0, 0 -> 1/3; three copies of A: 1
    assert mask_agreement([a, a, c]) == pytest.approx(1 / 3)
    assert mask_agreement([a, a, a]) == 1.0
    # two empty masks agree (Dice 1), as evaluation.metrics.dsc says; one mask agrees with itself
    assert mask_agreement([c, c]) == 1.0
    assert mask_agreement([b]) == 1.0


def test_consensus_is_the_voxel_majority_by_hand():
    a, b, c = masks([1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0])
    # votes [1, 1, 2, 2, 1, 1] of 3: in where more than 1.5
    np.testing.assert_array_equal(consensus_mask([a, b, c]).ravel(), [0, 0, 1, 1, 0, 0])
    # votes [2, 2, 2, 2, 0, 0] of 3 (an empty mask is a vote against)
    np.testing.assert_array_equal(consensus_mask([a, a, c]).ravel(), [1, 1, 1, 1, 0, 0])
    # an even N: a tie (1 of 2) is out
    np.testing.assert_array_equal(consensus_mask([a, b]).ravel(), [0, 0, 1, 1, 0, 0])


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return oblique_phantom(tmp_path_factory.mktemp("oblique"))


@pytest.fixture(scope="module")
def oracle_text(phantom):
    """The true anchor of the liver on the phantom, as an answer text."""
    from data.answer import format_answer
    from data.preprocess import prepare_arrays
    from data.targets import evidence_target
    from data.volume import load_volume

    nifti, _, labels, _, _ = phantom
    image, label_map = load_volume(nifti), load_volume(labels, "mask")
    prepared = prepare_arrays(image, label_map, [1], (-160.0, 240.0), SLICES, SIZE, "q")
    return format_answer(evidence_target(prepared, 1, np.random.default_rng(0), 4), "the liver")


def run(image, out, answer, **kwargs):
    return predict(
        image,
        [QUERY],
        None,
        out,
        num_slices=SLICES,
        size=SIZE,
        window="abdomen",
        device="cpu",
        answer=answer,
        progress=False,
        **kwargs,
    )


def test_three_samples_write_the_consensus_agreement_and_every_anchor(
    phantom, oracle_text, tmp_path
):
    from data.volume import load_volume
    from evaluation.review import _sampled

    nifti = phantom[0]
    (greedy,) = run(nifti, tmp_path / "greedy", lambda s, q: [oracle_text for _ in q])
    assert "agreement" not in greedy.evidence[0] and "anchors" not in greedy.evidence[0]

    def sampler(slices, queries):  # two draws give the true anchor, one does not parse
        return [[oracle_text, "no idea", oracle_text] for _ in queries]

    (sampled,) = run(nifti, tmp_path / "sampled", sampler, samples=3)
    evidence = json.loads((tmp_path / "sampled" / "evidence.json").read_text())
    assert evidence == json.loads(json.dumps(sampled.evidence[0]))
    # masks M, empty, M: Dice 0, 1, 0 -> agreement 1/3, below 0.5
    assert evidence["num_samples"] == 3 and evidence["agreement"] == pytest.approx(1 / 3, abs=1e-4)
    assert evidence["low_agreement"] is True and evidence["min_agreement"] == 0.5
    anchors = evidence["anchors"]
    assert [a["ok"] for a in anchors] == [True, False, True]
    assert [a["answer"] for a in anchors] == [oracle_text, "no idea", oracle_text]
    assert [a["agreement"] for a in anchors] == pytest.approx([0.5, 0.0, 0.5])
    assert "failure" in anchors[1] and anchors[0]["key_slice"] == greedy.evidence[0]["key_slice"]
    assert anchors[0]["boxes"] == greedy.evidence[0]["boxes"]
    # the top level is the sample closest to the consensus: the first true one
    assert evidence["ok"] and evidence["representative"] == 1
    assert evidence["answer"] == oracle_text
    # the consensus (2 of 3 votes) is the true anchor's mask
    consensus = load_volume(tmp_path / "sampled" / "mask.nii.gz", "mask").array
    alone = load_volume(tmp_path / "greedy" / "mask.nii.gz", "mask").array
    assert alone.sum() > 0 and evidence["mask_voxels"] == greedy.evidence[0]["mask_voxels"]
    np.testing.assert_array_equal(consensus, alone)
    # the review page reads every sampled anchor, with its agreement and failure
    shown = _sampled(anchors, SLICES, SIZE)
    assert [a.key_slice is not None for a in shown] == [True, False, True]
    assert [a.agreement for a in shown] == pytest.approx([0.5, 0.0, 0.5])
    line = console_line(nifti, evidence, tmp_path / "sampled")
    assert "agreement 0.33 of 3 samples LOW (< 0.5" in line
    # and the review page opens the folder with the agreement and the three anchors
    from common.config import load_run_config
    from evaluation.review import Review

    cfg = load_run_config(None, [f"data.num_slices={SLICES}", f"data.slice_size={SIZE}"])
    (case,) = Review(tmp_path / "sampled", cfg, progress=False).cases.values()
    assert case.agreement == pytest.approx(1 / 3, abs=1e-4) and len(case.sampled) == 3
    assert case.anchor.key_slice == anchors[0]["key_slice"] and case.sampled[1].failure


def test_samples_that_agree_are_not_flagged_and_one_unparsed_majority_is_empty(
    phantom, oracle_text, tmp_path
):
    nifti = phantom[0]
    (agreeing,) = run(nifti, tmp_path / "a", lambda s, q: [[oracle_text] * 3 for _ in q], samples=3)
    evidence = agreeing.evidence[0]
    assert evidence["agreement"] == 1.0 and evidence["low_agreement"] is False
    assert "LOW" not in console_line(nifti, evidence, tmp_path / "a")
    # two of three draws unparsed: the consensus is empty and the query has no usable answer
    (lost,) = run(
        nifti, tmp_path / "b", lambda s, q: [[oracle_text, "x", "y"] for _ in q], samples=3
    )
    evidence = lost.evidence[0]
    assert evidence["mask_voxels"] == 0 and evidence["agreement"] == pytest.approx(1 / 3, abs=1e-4)
    assert evidence["ok"] is True  # the one well-formed anchor is still shown
    (none,) = run(nifti, tmp_path / "c", lambda s, q: [["x", "y", "z"] for _ in q], samples=3)
    assert none.evidence[0]["ok"] is False and "none of the 3" in none.evidence[0]["failure"]
    assert none.evidence[0]["agreement"] == 1.0  # three empty masks agree


def test_bad_sampling_settings_and_answers_are_errors_naming_the_flag(phantom, tmp_path):
    nifti = phantom[0]
    with pytest.raises(PredictError, match="--samples 0: need 1"):
        run(nifti, tmp_path / "o", lambda s, q: ["x"], samples=0)
    with pytest.raises(PredictError, match="--temperature 0.0: need > 0"):
        run(nifti, tmp_path / "o", lambda s, q: ["x"], samples=2, temperature=0.0)
    with pytest.raises(PredictError, match="--min-agreement 1.5"):
        run(nifti, tmp_path / "o", lambda s, q: ["x"], samples=2, min_agreement=1.5)
    with pytest.raises(PredictError, match="--samples 3: .* not 3 answers for each"):
        run(nifti, tmp_path / "o", lambda s, q: [["x", "y"] for _ in q], samples=3)


def test_the_command_line_refuses_a_bad_samples_count(tmp_path, capsys):
    from evaluation.predict import main

    argv = ["--image", str(tmp_path), "--query", "q", "--out-dir", str(tmp_path / "out")]
    assert main([*argv, "--samples", "0"]) == 2
    assert "error: --samples 0: need 1..64" in capsys.readouterr().err
