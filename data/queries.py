"""Clinical queries per target: explicit names, knowledge-based implicit and volume-grounded ones.

The phrasings live in YAML: the shipped ``data/phrasings.yaml`` (16 targets, at least ten
phrasings each) and, optionally, a user's file named by ``data.queries_file`` that adds targets
or replaces a target's list (same layout: ``targets: {name: [phrasing, ...]}``,
``aliases: {label: target}``). The last ``TEST_PHRASINGS`` of each list are held out for the
validation and test splits, so a test query is never seen in training (as the paper paraphrased
the KiTS23 test queries into implicit ones).

The phrasings in use in a process are the shipped ones plus the file put in use by
:func:`use_queries_file`; :class:`data.dataset.VolumeDataset` puts its config's
``data.queries_file`` in use, so SFT, GRPO and evaluation draw from it. A label with no
phrasings is asked ``"Segment the <label>."`` on every split, with one warning naming it.

Label names as datasets publish them ("kidney tumor", "kidneys" in M3D-Seg's ``dataset_info``)
reach their target through the aliases; :func:`target_of` is the one place that mapping is made.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

log = logging.getLogger(__name__)

SHIPPED_FILE = Path(__file__).with_name("phrasings.yaml")
TEST_PHRASINGS = 3
HELD_OUT_SPLITS = ("test", "val")  # asked with the held-out phrasings


class QueriesFileError(ValueError):
    """A phrasings file that cannot be used; the message names the file, section and entry."""


@dataclass(frozen=True)
class Phrasings:
    """Targets and their phrasings, and published label names -> target."""

    targets: dict[str, tuple[str, ...]]
    aliases: dict[str, str]


def normalise(label: str) -> str:
    """A label or target name compared as lower case words (underscores are spaces)."""
    return " ".join(label.replace("_", " ").split()).lower()


def _read_file(path: Path) -> Phrasings:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise QueriesFileError(f"{path}: phrasings file unreadable ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise QueriesFileError(f"{path}: not YAML ({err})") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict) or set(raw) - {"targets", "aliases"}:
        raise QueriesFileError(f"{path}: expected the sections 'targets' and 'aliases' only")
    targets: dict[str, tuple[str, ...]] = {}
    for name, items in (raw.get("targets") or {}).items():
        if (
            not isinstance(items, list)
            or not all(isinstance(x, str) and x.strip() for x in items)
            or len(items) <= TEST_PHRASINGS
        ):
            raise QueriesFileError(
                f"{path}: targets.{name} must be a list of at least {TEST_PHRASINGS + 1} "
                f"non-empty phrasings (the last {TEST_PHRASINGS} are held out), got {items!r}"
            )
        targets[normalise(str(name))] = tuple(items)
    aliases = {}
    for name, target in (raw.get("aliases") or {}).items():
        if not isinstance(target, str) or not target.strip():
            raise QueriesFileError(f"{path}: aliases.{name} must name a target, got {target!r}")
        aliases[normalise(str(name))] = normalise(target)
    return Phrasings(targets, aliases)


@functools.lru_cache(maxsize=8)
def load_phrasings(queries_file: Path | None = None) -> Phrasings:
    """The shipped phrasings, with ``queries_file``'s targets added or replacing a shipped
    target's list and its aliases added. Raises :class:`QueriesFileError` naming the file for a
    malformed entry or an alias whose target has no phrasings."""
    shipped = _read_file(SHIPPED_FILE)
    if queries_file is None:
        return shipped
    path = Path(queries_file)
    own = _read_file(path)
    targets = {**shipped.targets, **own.targets}
    # a target the user names outright is no longer an alias of another
    aliases = {k: v for k, v in shipped.aliases.items() if k not in own.targets}
    aliases.update(own.aliases)
    for name, target in own.aliases.items():
        if target not in targets:
            raise QueriesFileError(
                f"{path}: aliases.{name} points at {target!r}, which has no phrasings"
            )
    return Phrasings(targets, aliases)


_active: Phrasings = load_phrasings()
_warned: set[str] = set()

# The shipped tables, as read from the shipped file.
QUERIES: dict[str, list[str]] = {k: list(v) for k, v in _active.targets.items()}
ALIASES: dict[str, str] = dict(_active.aliases)


def use_queries_file(queries_file: str | Path | None) -> Phrasings:
    """Put the shipped phrasings plus ``queries_file``'s (``data.queries_file``; None: the
    shipped ones only) in use for this process; returns them."""
    global _active
    path = None if queries_file is None else Path(queries_file).resolve()
    _active = load_phrasings(path)
    return _active


def target_of(label: str) -> str | None:
    """The target a label name stands for (case and spacing ignored, aliases followed), or
    None when it has no phrasings."""
    name = normalise(label)
    name = _active.aliases.get(name, name)
    return name if name in _active.targets else None


def explicit_query(label: str) -> str:
    """The query of a label with no phrasings: its name, asked outright."""
    return f"Segment the {' '.join(label.replace('_', ' ').split())}."


def phrasings(target: str, split: str) -> list[str]:
    """The phrasings of ``target`` (a target or an alias of one) for a split: all but the last
    few for train, those for val and test. A label with no phrasings gets its
    :func:`explicit_query` on every split, and one warning naming it per process."""
    if split != "train" and split not in HELD_OUT_SPLITS:
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    key = target_of(target)
    if key is None:
        if target not in _warned:
            _warned.add(target)
            log.warning(
                "label %r has no query phrasings; asked as %r (add it to a data.queries_file)",
                target,
                explicit_query(target),
            )
        return [explicit_query(target)]
    items = list(_active.targets[key])
    return items[:-TEST_PHRASINGS] if split == "train" else items[-TEST_PHRASINGS:]


def sample_query(target: str, split: str, rng: np.random.Generator) -> str:
    """One phrasing of ``target`` drawn from its split's phrasings."""
    options = phrasings(target, split)
    return options[int(rng.integers(len(options)))]


def training_query(sample, resample: bool, rng: np.random.Generator) -> str:
    """The query one training use of ``sample`` asks: the manifest's, or with ``resample``
    (``data.resample_queries``) a training phrasing of its target drawn with ``rng``, as
    M3D-Seg's loaders draw a question per access. A label with no phrasings keeps its own."""
    if resample and target_of(sample.label) is not None:
        return sample_query(sample.label, "train", rng)
    return sample.query
