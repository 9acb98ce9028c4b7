"""The review page: its endpoints on predict and evaluation folders (400s named by field, two
accepts at once), the command line, and a real headless Chromium driving the page."""

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.cli import UsageError
from common.config import load_run_config
from data.answer import EvidenceAnchor, ParsedAnswer, format_answer, parse_answer
from evaluation.review import Review, main, make_server

SLICES, SIZE = 16, 96
FRAME = [f"data.num_slices={SLICES}", f"data.slice_size={SIZE}", "data.cache_dir=null"]
GOOD, SHIFTED, SPLEEN, MALFORMED = (
    "ctorg_0000",
    "abdomenct1k_0001/query-1",
    "abdomenct1k_0001/query-2",
    "ctorg_0003",
)


def _dataset(manifest):
    from data.dataset import VolumeDataset

    cfg = load_run_config(None, [f"data.manifest={manifest}", *FRAME])
    return cfg, VolumeDataset(manifest, cfg.data)


def true_anchor(manifest, sample_id) -> EvidenceAnchor:
    """The oracle anchor of a manifest sample: its largest slice and component boxes."""
    from data.targets import evidence_target

    cfg, dataset = _dataset(manifest)
    _, prepared = dataset.by_id(sample_id)
    return evidence_target(prepared, 1, np.random.default_rng(0), cfg.data.min_box_area)


@pytest.fixture(scope="module")
def predict_folder(phantom_manifest, tmp_path_factory):
    """A predict output of three phantom scans: one query answered with the true anchor, a scan
    with two queries (a box shifted off the liver, the spleen's true anchor) and one answer that
    does not parse. Returns (folder, overrides)."""
    from evaluation.predict import predict

    _, dataset = _dataset(phantom_manifest)
    query = {sid: dataset.by_id(sid)[0].query for sid in dataset._index}
    liver = true_anchor(phantom_manifest, "abdomenct1k_0001/liver")
    x1, y1, x2, y2 = liver.boxes[0]
    shifted = EvidenceAnchor(liver.key_slice, ((x1 + (x2 - x1) // 2, y1, min(x2 + 30, SIZE), y2),))
    answers = {
        query["ctorg_0000/liver"]: format_answer(
            true_anchor(phantom_manifest, "ctorg_0000/liver"), "the liver, right upper quadrant"
        ),
        query["abdomenct1k_0001/liver"]: format_answer(shifted, "a box beside the liver"),
        query["abdomenct1k_0001/spleen"]: format_answer(
            true_anchor(phantom_manifest, "abdomenct1k_0001/spleen"), "the spleen"
        ),
        query["ctorg_0003/liver"]: "I cannot tell.",
    }
    out = tmp_path_factory.mktemp("review") / "predict"
    for scan, targets in [
        ("ctorg_0000", ["liver"]),
        ("abdomenct1k_0001", ["liver", "spleen"]),
        ("ctorg_0003", ["liver"]),
    ]:
        predict(
            dataset.by_id(f"{scan}/{targets[0]}")[0].image,
            [query[f"{scan}/{t}"] for t in targets],
            None,
            out / scan,
            num_slices=SLICES,
            size=SIZE,
            window="abdomen",
            device="cpu",
            progress=False,
            answer=lambda slices, queries: [answers[q] for q in queries],
        )
    return out, [f"data.manifest={phantom_manifest}", *FRAME]


@pytest.fixture
def serve():
    """serve(folder, overrides) -> base URL of a review server on a free port, stopped after
    the test."""
    servers = []

    def start(folder, overrides, rows=None):
        review = Review(folder, load_run_config(None, overrides), "cpu", rows, progress=False)
        server = make_server(review, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def folder(predict_folder, tmp_path):
    """A fresh copy of the predict output (accepts write into it)."""
    source, overrides = predict_folder
    copy = tmp_path / "predict"
    shutil.copytree(source, copy)
    return copy, overrides


def request(url, body=None, raw: bytes | None = None, headers=None):
    """(status, content type, body: parsed JSON, or bytes for an image)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            status, kind, content = (
                response.status,
                response.headers["Content-Type"],
                response.read(),
            )
    except urllib.error.HTTPError as err:
        status, kind, content = err.code, err.headers["Content-Type"], err.read()
    return status, kind, json.loads(content) if kind == "application/json" else content


def truth_and_mask(folder: Path, case_folder: str, manifest, sample_id):
    from data.dataset import VolumeDataset
    from data.volume import load_volume

    cfg = load_run_config(None, [f"data.manifest={manifest}", *FRAME])
    dataset = VolumeDataset(manifest, cfg.data)
    sample, _ = dataset.by_id(sample_id)
    truth = np.isin(load_volume(sample.mask, "mask").array, dataset.label_values(sample_id))
    mask = load_volume(folder / case_folder / "mask.nii.gz", "mask").array != 0
    return truth, mask


# ---- endpoints ---------------------------------------------------------------------------------


def test_the_page_and_its_files_are_served(folder, serve):
    base = serve(*folder)
    status, kind, page = request(base + "/")
    assert status == 200 and kind.startswith("text/html")
    assert b"/static/app.js" in page and b"/static/style.css" in page
    for name, kind_wanted in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        status, kind, _ = request(f"{base}/static/{name}")
        assert (status, kind.split(";")[0]) == (200, kind_wanted)
    assert request(base + "/static/../review.py")[0] == 404
    assert request(base + "/nowhere")[0] == 404


def test_the_case_list_gives_each_written_masks_dsc_against_the_manifest(
    folder, serve, phantom_manifest
):
    from evaluation.metrics import dsc

    path, overrides = folder
    status, _, listing = request(serve(path, overrides) + "/api/cases")
    assert status == 200 and listing["kind"] == "predict"
    cases = {c["id"]: c for c in listing["cases"]}
    assert set(cases) == {GOOD, SHIFTED, SPLEEN, MALFORMED}
    for case, folder_name, sample_id in [
        (GOOD, "ctorg_0000", "ctorg_0000/liver"),
        (SHIFTED, "abdomenct1k_0001/query-1", "abdomenct1k_0001/liver"),
        (MALFORMED, "ctorg_0003", "ctorg_0003/liver"),
    ]:
        truth, mask = truth_and_mask(path, folder_name, phantom_manifest, sample_id)
        assert cases[case]["dsc"] == pytest.approx(dsc(mask, truth))
    assert cases[GOOD]["dsc"] > 0.8 > cases[SHIFTED]["dsc"]
    assert cases[MALFORMED]["dsc"] == 0.0 and not cases[MALFORMED]["ok"]
    assert all(c["agreement"] is None for c in cases.values())


def test_a_case_shows_its_anchor_reasoning_sampled_anchors_agreement_and_mask(folder, serve):
    path, overrides = folder
    evidence_file = path / "ctorg_0000" / "evidence.json"
    evidence = json.loads(evidence_file.read_text())
    other = format_answer(EvidenceAnchor(3, ((1, 2, 30, 40),)), "another look")
    evidence.update(
        agreement=0.75,
        anchors=[evidence["answer"], {"answer": other, "agreement": 0.5}, "no tags here"],
    )
    evidence_file.write_text(json.dumps(evidence))
    base = serve(path, overrides)
    listing = request(base + "/api/cases")[2]
    assert {c["id"]: c["agreement"] for c in listing["cases"]}[GOOD] == 0.75

    status, _, view = request(f"{base}/api/case?case={GOOD}")
    assert status == 200
    assert view["anchor"] == {"key_slice": evidence["key_slice"], "boxes": evidence["boxes"]}
    assert view["think"] == "the liver, right upper quadrant"
    assert view["answer"] == evidence["answer"]
    assert (view["num_slices"], view["size"], view["has_truth"]) == (SLICES, SIZE, True)
    assert evidence["key_slice"] in view["mask_slices"]
    assert view["metrics"]["mask_voxels"] == evidence["mask_voxels"]
    sampled = view["sampled"]
    assert [s["key_slice"] for s in sampled] == [evidence["key_slice"], 3, None]
    assert sampled[1]["boxes"] == [[1, 2, 30, 40]] and sampled[1]["agreement"] == 0.5
    assert sampled[2]["failure"].startswith("tags are []")

    malformed = request(f"{base}/api/case?case={MALFORMED}")[2]
    assert malformed["anchor"] is None and malformed["failure"]


def test_slices_come_as_png_with_the_mask_and_the_truths_outline(folder, serve):
    from PIL import Image

    path, overrides = folder
    base = serve(path, overrides)
    view = request(f"{base}/api/case?case={GOOD}")[2]
    k = view["anchor"]["key_slice"]

    def picture(**params):
        query = "&".join(f"{name}={value}" for name, value in params.items())
        status, kind, png = request(f"{base}/api/slice.png?case={GOOD}&k={k}&{query}")
        assert (status, kind) == (200, "image/png")
        return np.asarray(Image.open(__import__("io").BytesIO(png)).convert("RGB")).astype(int)

    plain, masked, outlined = picture(mask="none"), picture(mask="answer"), picture(truth=1)
    assert plain.shape == (SIZE, SIZE, 3)
    assert (plain[..., 0] == plain[..., 1]).all()  # grey
    reddened = (masked[..., 0] - masked[..., 1]) > 40
    assert reddened.sum() > 50
    assert ((outlined == (40, 230, 90)).all(axis=2)).sum() > 20


def test_propagate_returns_the_propagators_mask_and_its_dsc(folder, serve, phantom_manifest):
    from data.preprocess import to_source_grid
    from evaluation.metrics import dsc
    from reward_server.propagation import build_propagator

    path, overrides = folder
    anchor = true_anchor(phantom_manifest, "ctorg_0003/liver")
    body = {"case": MALFORMED, "key_slice": anchor.key_slice, "boxes": [list(anchor.boxes[0])]}
    status, _, result = request(serve(path, overrides) + "/api/propagate", body)
    assert status == 200

    # the same propagation done here, as the reward does it
    cfg, dataset = _dataset(phantom_manifest)
    sample, prepared = dataset.by_id("ctorg_0003/liver")
    mask = build_propagator("baseline").propagate(
        "x", np.asarray(prepared.slices), anchor.key_slice, (anchor.boxes[0],), None
    )
    truth, _ = truth_and_mask(path, "ctorg_0003", phantom_manifest, "ctorg_0003/liver")
    assert result["dsc"] == pytest.approx(dsc(to_source_grid(mask, prepared), truth))
    assert result["dsc"] > 0.5
    assert result["mask_slices"] == [int(k) + 1 for k in np.flatnonzero(mask.any(axis=(1, 2)))]
    assert result["propagator"].startswith("baseline")


def test_accept_appends_the_corrected_anchor_and_writes_the_mask_on_the_scans_grid(
    folder, serve, phantom_manifest
):
    path, overrides = folder
    base = serve(path, overrides)
    anchor = true_anchor(phantom_manifest, "abdomenct1k_0001/liver")
    boxes = [list(b) for b in anchor.boxes]
    evidence = json.loads((path / SHIFTED / "evidence.json").read_text())
    body = {"case": SHIFTED, "key_slice": anchor.key_slice, "boxes": boxes, "think": "moved"}
    proposed = request(
        base + "/api/propagate", {k: body[k] for k in ("case", "key_slice", "boxes")}
    )[2]
    status, _, row = request(base + "/api/accept", body)
    assert status == 200, row

    rows = [json.loads(line) for line in (path / "corrections.jsonl").read_text().splitlines()]
    assert rows == [row]
    assert row["case"] == SHIFTED and row["query"] == evidence["query"]
    assert (row["key_slice"], row["bbox_2d_list"]) == (anchor.key_slice, boxes)
    parsed = parse_answer(row["answer"], SLICES, SIZE)
    assert isinstance(parsed, ParsedAnswer) and parsed.think == "moved"
    assert parsed.anchor == EvidenceAnchor(anchor.key_slice, tuple(map(tuple, boxes)))
    assert row["original_answer"] == evidence["answer"]
    assert row["original_anchor"] == {
        "key_slice": evidence["key_slice"],
        "bbox_2d_list": evidence["boxes"],
    }
    assert row["dsc"] == pytest.approx(proposed["dsc"]) and row["dsc"] > row["original_dsc"]
    assert row["number"] == 1 and row["mask"] == "corrections/1/mask.nii.gz"
    assert row["segmentation"] is None  # a NIfTI input

    image = nib.load(evidence["image"])
    written = nib.load(path / row["mask"])
    assert written.shape == image.shape
    np.testing.assert_allclose(written.affine, image.affine)
    assert int(np.asarray(written.dataobj).sum()) == row["mask_voxels"] > 0

    view = request(f"{base}/api/case?case={SHIFTED}")[2]
    assert [r["number"] for r in view["corrections"]] == [1]
    listing = request(base + "/api/cases")[2]
    assert {c["id"]: c["corrected"] for c in listing["cases"]}[SHIFTED] == 1


BAD_REQUESTS = [
    # (endpoint, body or query, the message's start)
    ("propagate", {"case": "nobody", "key_slice": 3, "boxes": []}, "case: 'nobody' is not a case"),
    ("propagate", {"case": GOOD, "key_slice": 17, "boxes": []}, "key_slice: 17 is not in 1..16"),
    ("propagate", {"case": GOOD, "key_slice": 0, "boxes": []}, "key_slice: 0 is not in 1..16"),
    ("propagate", {"case": GOOD, "key_slice": "3", "boxes": []}, "key_slice: '3' is not an int"),
    ("propagate", {"case": GOOD, "key_slice": True, "boxes": []}, "key_slice: True is not an int"),
    ("propagate", {"case": GOOD, "key_slice": 3, "boxes": [[0, 0, 97, 10]]}, "boxes[0]: [0, 0, 97"),
    ("propagate", {"case": GOOD, "key_slice": 3, "boxes": [[-1, 0, 9, 9]]}, "boxes[0]: [-1, 0,"),
    (
        "propagate",
        {"case": GOOD, "key_slice": 3, "boxes": [[5, 5, 5, 9]]},
        "boxes[0]: [5, 5, 5, 9]",
    ),
    (
        "accept",
        {"case": GOOD, "key_slice": 3, "boxes": [[1, 1, 9, 9], [9, 9, 1, 20]]},
        "boxes[1]: [9, 9, 1, 20] is degenerate",
    ),
    ("accept", {"case": GOOD, "key_slice": 3, "boxes": [[1, 1.5, 9, 9]]}, "boxes[0]: [1, 1.5"),
    ("accept", {"case": GOOD, "key_slice": 3, "boxes": [[1, 1, 9]]}, "boxes[0]: [1, 1, 9] is not"),
    (
        "accept",
        {"case": GOOD, "key_slice": 3, "boxes": "1,1,9,9"},
        "boxes: '1,1,9,9' is not a list",
    ),
    ("accept", {"case": GOOD, "boxes": []}, "key_slice: missing"),
    ("accept", {"case": GOOD, "key_slice": 3, "boxes": [], "slice": 2}, "request body: unknown"),
    ("accept", [GOOD, 3], "request body: a JSON list, not an object"),
    ("accept", b'{"case": "ctorg_0000", "key_slice": 3,', "request body: not JSON"),
    (
        "accept",
        {"case": GOOD, "key_slice": 3, "boxes": [], "think": "<answer>x</answer>"},
        "think: ",
    ),
    ("slice.png", f"case={GOOD}&k=17", "k: 17 is not in 1..16"),
    ("slice.png", f"case={GOOD}&k=two", "k: 'two' is not an integer"),
    ("slice.png", f"case={GOOD}", "k: None is not an integer"),
    ("slice.png", "case=nobody&k=2", "case: 'nobody' is not a case"),
    ("slice.png", f"case={GOOD}&k=2&mask=heat", "mask: 'heat' is not one of"),
    ("slice.png", f"case={GOOD}&k=2&mask=proposal", "key_slice, boxes: mask=proposal needs"),
    ("slice.png", f"case={GOOD}&k=2&mask=proposal&key_slice=2&boxes=[[1,2", "boxes: '[[1,2' is"),
    (
        "slice.png",
        f"case={GOOD}&k=2&mask=proposal&key_slice=2&boxes=[[1,2,3,200]]",
        "boxes[0]: [1, 2, 3, 200] is outside the 96 x 96 slice",
    ),
    ("case", "case=nobody", "case: 'nobody' is not a case"),
    ("case", "", "case: None is not a case"),
]


def test_bad_requests_get_a_400_naming_the_field_and_the_value_and_write_nothing(folder, serve):
    path, overrides = folder
    base = serve(path, overrides)
    for endpoint, given, message in BAD_REQUESTS:
        if endpoint in ("slice.png", "case"):
            status, kind, answer = request(f"{base}/api/{endpoint}?{given}")
        elif isinstance(given, bytes):
            status, kind, answer = request(f"{base}/api/{endpoint}", raw=given)
        else:
            status, kind, answer = request(f"{base}/api/{endpoint}", given)
        assert (status, kind) == (400, "application/json"), (endpoint, given, answer)
        assert answer["error"].startswith(message), (endpoint, given, answer["error"])
    status, _, answer = request(
        base + "/api/accept", raw=b"{}", headers={"Content-Length": str(10**9)}
    )
    assert status == 400 and answer["error"].startswith("Content-Length: 1000000000 bytes")
    assert request(base + "/api/accept")[0] == 405  # GET on a POST endpoint
    assert not (path / "corrections.jsonl").exists()
    # the server is still there and right after all of that
    assert request(base + "/api/cases")[0] == 200


def test_two_accepts_on_one_case_at_once_both_land(folder, serve, phantom_manifest):
    path, overrides = folder
    base = serve(path, overrides)
    anchor = true_anchor(phantom_manifest, "ctorg_0003/liver")
    x1, y1, x2, y2 = anchor.boxes[0]
    bodies = [
        {"case": MALFORMED, "key_slice": anchor.key_slice, "boxes": [[x1, y1, x2, y2]]},
        {"case": MALFORMED, "key_slice": anchor.key_slice, "boxes": [[x1 + 2, y1, x2, y2]]},
    ]
    for body in bodies:  # warm: the scan is read and both masks propagated, so the accepts race
        request(base + "/api/propagate", body)
    barrier, answers = threading.Barrier(2), [None, None]

    def accept(i):
        barrier.wait()
        answers[i] = request(base + "/api/accept", bodies[i])

    threads = [threading.Thread(target=accept, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a[0] for a in answers] == [200, 200]
    rows = [json.loads(line) for line in (path / "corrections.jsonl").read_text().splitlines()]
    assert sorted(r["number"] for r in rows) == [1, 2]
    assert sorted(r["bbox_2d_list"][0][0] for r in rows) == [x1, x1 + 2]
    for row in rows:
        assert nib.load(path / row["mask"]).shape == nib.load(row["image"]).shape


def test_an_evaluation_folder_shows_its_recorded_anchors_propagated_again(
    oracle_records, serve, tmp_path
):
    cfg, overrides, samples, records = oracle_records
    out = tmp_path / "eval"
    out.mkdir()
    (out / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    base = serve(out, overrides)
    listing = request(base + "/api/cases")[2]
    assert listing["kind"] == "evaluation"
    assert len(listing["cases"]) == len(records)
    record = records[0]
    case_id = f"oracle | {record['id']}"
    listed = {c["id"]: c for c in listing["cases"]}[case_id]
    assert listed["dsc"] == pytest.approx(record["dsc"]) and listed["row"] == "oracle"

    view = request(f"{base}/api/case?case={urllib.request.quote(case_id)}")[2]
    assert view["anchor"] == {"key_slice": record["key_slice"], "boxes": record["boxes"]}
    assert view["answer"] is None and view["think"] == ""
    # the same frame and propagator as the evaluation: the same mask, the same DSC
    assert view["dsc_shown_mask"] == pytest.approx(record["dsc"])
    body = {"case": case_id, "key_slice": record["key_slice"], "boxes": record["boxes"]}
    status, _, row = request(base + "/api/accept", body)
    assert status == 200 and row["row"] == "oracle" and row["sample_id"] == record["id"]
    image = next(s for s, _ in samples if s.id == record["id"]).image
    assert nib.load(out / row["mask"]).shape == nib.load(image).shape
    with pytest.raises(UsageError, match="no row 'SFT'"):
        Review(out, load_run_config(None, overrides), "cpu", ["SFT"], progress=False)


def test_an_evaluation_consensus_row_shows_its_draws_reasoning_and_their_majority(
    oracle_records, serve, tmp_path
):
    """A row of evaluate --samples: the page lists the draws, shows the answer's reasoning, and
    the mask shown is the draws' voxel majority propagated again (the recorded DSC)."""
    from data.answer import format_answer
    from evaluation.evaluate import CaseJob, CaseScorer, anchor_jobs

    cfg, overrides, samples, records = oracle_records
    sample, prepared = next((s, p) for s, p in samples if s.suite == "ctorg")
    true = next(r for r in records if r["id"] == sample.id)
    anchor = EvidenceAnchor(true["key_slice"], tuple(map(tuple, true["boxes"])))
    half = EvidenceAnchor(
        anchor.key_slice, tuple((a, b, (a + c) // 2, d) for a, b, c, d in anchor.boxes)
    )
    texts = [format_answer(anchor, "all of it"), format_answer(half, "the left half"), "oops"]
    (job,) = anchor_jobs("SFT (consensus of 3)", [(sample, prepared)], [texts])
    scorer = CaseScorer(cfg.data.manifest, cfg.data, cfg.reward, "baseline")
    record = scorer.score(job)
    assert isinstance(job, CaseJob) and record["num_samples"] == 3
    out = tmp_path / "eval"
    out.mkdir()
    (out / "cases.jsonl").write_text(json.dumps(record) + "\n")
    base = serve(out, overrides)
    case_id = f"SFT (consensus of 3) | {sample.id}"
    listed = request(base + "/api/cases")[2]["cases"]
    assert [(c["id"], c["agreement"]) for c in listed] == [(case_id, record["agreement"])]
    view = request(f"{base}/api/case?case={urllib.request.quote(case_id)}")[2]
    assert view["sample_id"] == sample.id
    assert [s["answer"] for s in view["sampled"]] == texts
    assert [s["failure"] is None for s in view["sampled"]] == [True, True, False]
    assert view["think"] == "the left half"  # the representative: the draw nearest the majority
    assert view["dsc_shown_mask"] == pytest.approx(record["dsc"])


def test_a_dicom_series_gets_its_corrected_mask_as_nifti_and_dicom_seg(serve, tmp_path):
    import pydicom

    from data.dicom import read_series
    from evaluation.predict import predict
    from tests.data.dicom_series import oblique_phantom

    (tmp_path / "oblique").mkdir()
    nifti, series_folder, labels, _, _ = oblique_phantom(tmp_path / "oblique")
    out = tmp_path / "predict-dicom"
    text = format_answer(EvidenceAnchor(8, ((20, 20, 60, 60),)), "somewhere")
    predict(
        series_folder,
        ["the liver"],
        None,
        out,
        num_slices=SLICES,
        size=SIZE,
        window="abdomen",
        device="cpu",
        progress=False,
        answer=lambda s, q: [text],
    )
    base = serve(out, FRAME)
    (case,) = request(base + "/api/cases")[2]["cases"]
    assert case["dsc"] is None  # no manifest: no ground truth
    body = {"case": case["id"], "key_slice": 9, "boxes": [[30, 30, 60, 66]]}
    status, _, row = request(base + "/api/accept", body)
    assert status == 200, row
    series = read_series(series_folder)
    written = nib.load(out / row["mask"])
    np.testing.assert_allclose(written.affine, series.volume.source_affine)
    assert row["segmentation"] == "corrections/1/segmentation.dcm"
    seg = pydicom.dcmread(out / row["segmentation"])
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.uid


# ---- the command line --------------------------------------------------------------------------


def test_the_command_refuses_what_it_cannot_review_in_one_line(folder, tmp_path, capsys):
    path, overrides = folder
    assert main([str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--port", "0"]) == 2
    assert "neither a predict output" in capsys.readouterr().err
    # evidence.json records predict's frame, which replaces the config's
    other = load_run_config(None, [overrides[0], "data.num_slices=64", "data.slice_size=256"])
    assert Review(path, other, "cpu", progress=False).frame == (SLICES, SIZE)
    files = sorted(path.rglob("evidence.json"))
    records = [json.loads(f.read_text()) for f in files]
    assert all((r["num_slices"], r["slice_size"]) == (SLICES, SIZE) for r in records)
    # two frames in one folder: both named
    files[-1].write_text(json.dumps({**records[-1], "num_slices": 32}))
    assert main([str(path), "--port", "0", *overrides]) == 2
    err = capsys.readouterr().err
    assert "two slice frames, 16 x 96 px" in err and "32 x 96 px" in err and str(files[-1]) in err
    # evidence written before it recorded the frame: the config's is used, and one that is not
    # predict's would misplace the key slice
    for f, r in zip(files, records):
        f.write_text(
            json.dumps({k: v for k, v in r.items() if k not in ("num_slices", "slice_size")})
        )
    assert main([str(path), "--port", "0", overrides[0], "data.slice_size=96"]) == 2
    err = capsys.readouterr().err
    assert "key_slice" in err and "data.num_slices" in err
    assert main([str(path), "--print-config", *overrides]) == 0
    assert "num_slices: 16" in capsys.readouterr().out


def test_a_port_in_use_is_named(folder, serve, capsys):
    path, overrides = folder
    port = serve(path, overrides).rsplit(":", 1)[1]
    assert main([str(path), "--port", port, *overrides]) == 2
    assert f"--port {port}: cannot listen" in capsys.readouterr().err


# ---- the page in a real browser ----------------------------------------------------------------


class DevTools:
    """A page of headless Chromium driven over the DevTools protocol (a WebSocket)."""

    def __init__(self, socket):
        self.socket = socket  # a websockets.sync client connection to the page's target
        self.next_id = 0
        self.exceptions: list[str] = []

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.socket.recv(timeout=max(deadline - time.monotonic(), 0.1)))
            if message.get("method") == "Runtime.exceptionThrown":
                self.exceptions.append(json.dumps(message["params"]["exceptionDetails"])[:500])
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {expression}")

    def centre(self, selector: str) -> tuple[float, float]:
        return tuple(
            self.evaluate(
                f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
                " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
            )
        )

    def mouse(self, kind: str, x: float, y: float, pressed: bool) -> None:
        self.call(
            "Input.dispatchMouseEvent",
            type=kind,
            x=x,
            y=y,
            button="left",
            buttons=1 if pressed else 0,
            clickCount=1,
        )

    def click(self, selector: str) -> None:
        x, y = self.centre(selector)
        self.mouse("mouseMoved", x, y, False)
        self.mouse("mousePressed", x, y, True)
        self.mouse("mouseReleased", x, y, False)

    def drag(self, start, end, steps: int = 6) -> None:
        self.mouse("mouseMoved", *start, False)
        self.mouse("mousePressed", *start, True)
        for i in range(1, steps + 1):
            t = i / steps
            point = (start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1]))
            self.mouse("mouseMoved", *point, True)
        self.mouse("mouseReleased", *end, False)

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(
            base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        )


def chromium() -> str:
    """Debian's chromium; CI installs it (.ci/run) and sets MEDVOL_REQUIRE_BROWSER=1, so the
    browser test cannot skip there."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("MEDVOL_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium page, over the DevTools protocol; closed after the test."""
    from websockets.sync.client import connect

    executable = chromium()
    profile = tmp_path / "chromium-profile"
    log = (tmp_path / "chromium.log").open("wb")
    process = subprocess.Popen(
        [
            executable,
            "--headless",
            "--no-sandbox",  # root in a container
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "--window-size=1500,1100",
            "about:blank",
        ],
        stdout=log,
        stderr=log,
    )
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert process.poll() is None, (tmp_path / "chromium.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "chromium wrote no DevToolsActivePort"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
            pages = [t for t in json.loads(r.read()) if t["type"] == "page"]
        with connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as socket:
            page = DevTools(socket)
            page.call("Page.enable")
            page.call("Runtime.enable")
            page.call(
                "Emulation.setDeviceMetricsOverride",
                width=1500,
                height=1100,
                deviceScaleFactor=1,
                mobile=False,
            )
            yield page
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture
def review_command(folder, tmp_path):
    """``python -m evaluation.review`` on the predict folder copy, on a free port: its URL."""
    path, overrides = folder
    errors = tmp_path / "review.stderr"
    with errors.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "evaluation.review", str(path), "--port", "0", *overrides],
            stdout=subprocess.PIPE,
            stderr=sink,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
    try:
        line = process.stdout.readline()
        assert "http://127.0.0.1:" in line, errors.read_text()[-3000:]
        yield line.split(" at ")[1].split()[0]
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_a_reviewer_sorts_opens_the_worst_case_draws_propagates_and_accepts(
    browser, review_command, folder, phantom_manifest, tmp_path
):
    path, _ = folder
    shots = tmp_path / "screenshots"
    browser.call("Page.navigate", url=review_command)
    browser.wait_for("document.querySelectorAll('#cases tbody tr').length === 4")
    browser.click("#cases th[data-sort='id']")
    browser.click("#cases th[data-sort='dsc']")  # a fresh column sorts worst first
    shown = browser.evaluate(
        "[...document.querySelectorAll('#cases tbody tr')].map(r => [r.dataset.case,"
        " r.querySelector('td.dsc').textContent])"
    )
    assert [float(d) for _, d in shown] == sorted(float(d) for _, d in shown)
    worst = shown[0][0]
    assert worst == MALFORMED  # the answer that did not parse: an empty mask, DSC 0
    browser.screenshot(shots / "1-list.png")

    browser.click(f"#cases tbody tr[data-case='{worst}']")
    browser.wait_for(f"state.view && state.view.id === {json.dumps(worst)}")
    browser.wait_for("document.querySelectorAll('#slices figure img').length === 16")
    assert "did not parse" in browser.evaluate("document.querySelector('#failure').textContent")

    anchor = true_anchor(phantom_manifest, "ctorg_0003/liver")
    x1, y1, x2, y2 = anchor.boxes[0]
    browser.click(f"#slices figure[data-k='{anchor.key_slice}']")  # the key slice
    assert browser.evaluate("state.keySlice") == anchor.key_slice
    left, top, width = browser.evaluate(
        "(() => { const e = document.querySelector('#editor'); e.scrollIntoView({block: 'center'});"
        " const r = e.getBoundingClientRect(); return [r.left, r.top, r.width]; })()"
    )

    def at(x, y):  # a slice-frame point on the screen
        return left + x * width / SIZE, top + y * width / SIZE

    # draw the box 6 px to the right, then drag it into place
    browser.drag(at(x1 + 6.2, y1 + 0.2), at(x2 + 6 - 0.2, y2 - 0.2))
    assert browser.evaluate("state.boxes") == [[x1 + 6, y1, x2 + 6, y2]]
    browser.drag(at((x1 + x2) / 2 + 6, (y1 + y2) / 2), at((x1 + x2) / 2, (y1 + y2) / 2))
    assert browser.evaluate("state.boxes") == [[x1, y1, x2, y2]]
    assert browser.evaluate("document.querySelector('#accept').disabled")

    browser.click("#propagate")
    browser.wait_for("document.querySelector('#proposal-dsc') !== null")
    proposal_dsc = float(browser.evaluate("document.querySelector('#proposal-dsc').textContent"))
    assert proposal_dsc > 0.5
    browser.wait_for(
        "[...document.querySelectorAll('#slices img')].every(i => i.complete && i.naturalWidth)"
    )
    browser.screenshot(shots / "2-propagated.png")

    browser.click("#accept")
    browser.wait_for("document.querySelector('#status').textContent.startsWith('accepted')")
    browser.screenshot(shots / "3-accepted.png")
    assert browser.exceptions == []

    (row,) = [json.loads(x) for x in (path / "corrections.jsonl").read_text().splitlines()]
    assert row["case"] == MALFORMED
    assert (row["key_slice"], row["bbox_2d_list"]) == (anchor.key_slice, [[x1, y1, x2, y2]])
    assert row["original_answer"] == "I cannot tell." and row["original_anchor"] is None
    assert row["dsc"] == pytest.approx(proposal_dsc, abs=1e-3)
    image = nib.load(json.loads((path / MALFORMED / "evidence.json").read_text())["image"])
    written = nib.load(path / row["mask"])
    assert written.shape == image.shape
    np.testing.assert_allclose(written.affine, image.affine)
    assert np.asarray(written.dataobj).any()
    assert all((shots / f).stat().st_size > 10_000 for f in ("1-list.png", "3-accepted.png"))
