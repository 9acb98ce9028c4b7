"""Atomic ``step-N/`` checkpoints of a GRPO run, which a killed run resumes from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from cluster.learner_group import LearnerGroup
from common.runtime import prune


class Checkpoints:
    """Atomic run checkpoints: ``step-N/`` folders written as ``.step-N.partial`` then renamed,
    and a ``latest`` file replaced atomically once the folder is complete."""

    def __init__(self, root: Path, keep: int = 3):
        self.root = root
        self.keep = keep
        root.mkdir(parents=True, exist_ok=True)

    def latest(self) -> Path | None:
        marker = self.root / "latest"
        if not marker.exists():
            return None
        folder = self.root / marker.read_text().strip()
        return folder if (folder / "state.json").exists() else None

    def save(self, step: int, learners: LearnerGroup, state: dict, frame=None) -> Path:
        """``frame`` (learner.training_frame), if given, goes in as the step's medvol.json."""
        name = f"step-{step}"
        tmp = self.root / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        learners.save_checkpoint(tmp / "learner", "ckpt", state)
        (tmp / "state.json").write_text(json.dumps(state))
        if frame is not None:
            frame.write(tmp)
        final = self.root / name
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        marker = self.root / ".latest.partial"
        marker.write_text(name)
        marker.replace(self.root / "latest")
        prune(self.root, "step-", self.keep)
        return final


def rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state
