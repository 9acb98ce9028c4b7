import hashlib
import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest

from common.config import DataConfig
from data.dataset import VolumeDataset
from data.phantoms import write_phantoms
from data.queries import (
    QUERIES,
    QueriesFileError,
    load_phrasings,
    phrasings,
    sample_query,
    target_of,
    training_query,
    use_queries_file,
)

# Digests of every target's phrasings per split and of 160 seeded draws, taken from the table
# as it was written in Python before it moved to data/phrasings.yaml.
TABLE_DIGEST = "713a7624e9c923a93dbe8fe051dbbf798b1a596079ef0db0ba757ca6b4eaf49c"
DRAWS_DIGEST = "1441496b41585a529628f5355dc39a0a27bf60c848234058ebd05549bfec0db7"

OWN = """
aliases:
  gb stone: gallstone
targets:
  gallstone:
    - Segment the gallstone.
    - Where is the gallstone?
    - Find the calculus in the gallbladder.
    - Outline the stone in the gallbladder.
    - Mark the dense focus in the gallbladder lumen.
  liver:
    - Segment the liver, version two.
    - Where is the liver now?
    - Outline the liver again.
    - Find the liver once more.
"""


@pytest.fixture(autouse=True)
def shipped_phrasings():
    use_queries_file(None)
    yield
    use_queries_file(None)


def test_the_shipped_file_gives_every_phrasing_and_seeded_draw_as_before():
    table = {t: {s: phrasings(t, s) for s in ("train", "test")} for t in QUERIES}
    assert len(table) == 16
    assert hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest() == TABLE_DIGEST
    rng = np.random.default_rng(0)
    drawn = [sample_query(t, s, rng) for _ in range(5) for t in QUERIES for s in ("train", "test")]
    assert hashlib.sha256(json.dumps(drawn).encode()).hexdigest() == DRAWS_DIGEST
    for target in QUERIES:
        assert phrasings(target, "val") == phrasings(target, "test")


def test_a_users_file_adds_and_replaces_targets(tmp_path):
    own = tmp_path / "queries.yaml"
    own.write_text(OWN)
    use_queries_file(own)
    assert target_of("GB_stone") == "gallstone"
    assert phrasings("gallstone", "train") == ["Segment the gallstone.", "Where is the gallstone?"]
    assert phrasings("liver", "test")[-1] == "Find the liver once more."
    assert phrasings("spleen", "train") == QUERIES["spleen"][:-3]  # the others stay


def test_a_label_with_no_phrasings_is_asked_outright_and_warned_once(caplog):
    with caplog.at_level(logging.WARNING, logger="data.queries"):
        for split in ("train", "val", "test"):
            assert phrasings("splenic_vein", split) == ["Segment the splenic vein."]
        assert sample_query("splenic_vein", "train", np.random.default_rng(0)) == (
            "Segment the splenic vein."
        )
    warned = [r for r in caplog.records if "splenic_vein" in r.getMessage()]
    assert len(warned) == 1


@pytest.mark.parametrize(
    "text, named",
    [
        ("targets:\n  gallstone: [one, two]\n", "targets.gallstone"),
        ("aliases:\n  stone: nothing\n", "aliases.stone"),
        ("labels: {}\n", "'targets' and 'aliases'"),
        ("targets: [\n", "not YAML"),
    ],
)
def test_a_malformed_file_fails_when_the_dataset_is_built(tmp_path, text, named):
    own = tmp_path / "queries.yaml"
    own.write_text(text)
    load_phrasings.cache_clear()
    with pytest.raises(QueriesFileError, match=named) as err:
        VolumeDataset(tmp_path / "manifest.jsonl", DataConfig(queries_file=own))
    assert str(own) in str(err.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(QueriesFileError, match="missing.yaml"):
        missing = DataConfig(queries_file=tmp_path / "missing.yaml")
        VolumeDataset(tmp_path / "manifest.jsonl", missing)


def test_training_draws_reach_the_configs_file_through_the_dataset(tmp_path):
    manifest = write_phantoms(tmp_path / "data", n=1, seed=0, shape=(40, 96, 96), progress=False)
    own = tmp_path / "queries.yaml"
    own.write_text(OWN)
    dataset = VolumeDataset(manifest, DataConfig(queries_file=own), check_labels=False)
    liver = next(s for s in dataset.samples if s.label == "liver")
    rng = np.random.default_rng(0)
    drawn = {training_query(liver, True, rng) for _ in range(50)}
    assert drawn == {"Segment the liver, version two."}  # its one training phrasing
    VolumeDataset(manifest, DataConfig(), check_labels=False)  # the shipped ones again
    assert training_query(liver, True, rng) in QUERIES["liver"]


def test_an_unknown_label_keeps_its_manifest_query_in_training():
    stone = SimpleNamespace(label="gallbladder stone", query="find the stone")
    assert training_query(stone, True, np.random.default_rng(0)) == "find the stone"
