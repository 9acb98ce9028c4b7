"""The frame an adapter was trained in (slices, size, window, base model), kept beside it as
``medvol.json``.

An adapter answers in the frame it learned: a key slice among ``num_slices``, boxes in pixels of a
``slice_size`` square, on slices windowed as in training. Served with another frame it still
answers, only wrongly, so every adapter folder the project writes carries its frame, and
``evaluation.predict`` and ``evaluation.evaluate`` take their settings from it or refuse ones that
contradict it. The base model is named by its folder and by a digest of its config.json and its
weight files' names and sizes (reading multi-GB weights to hash them would cost minutes).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from common.config import DataConfig, resolve_window

FILE_NAME = "medvol.json"
FORMAT_VERSION = 1
BOX_CONVENTION = (
    "pixel edges [x1, y1, x2, y2] in the slice_size x slice_size frame, x2 = last column + 1"
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class TrainingFrameError(ValueError):
    """A medvol.json that cannot be read; names the file and the field."""


def base_model_digest(folder: Path) -> str:
    """sha256 of a checkpoint folder's config.json and its weight files' names and sizes."""
    folder = Path(folder)
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name.endswith(WEIGHT_SUFFIXES):
            digest.update(f"\n{path.name} {path.stat().st_size}".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class TrainingFrame:
    """What an adapter was trained on, as written to ``medvol.json`` beside its weights."""

    num_slices: int  # slices sampled per volume (key_slice is 1..num_slices)
    slice_size: int  # slices resized to slice_size x slice_size
    window: tuple[float, float]  # data.window, resolved to (low, high)
    suite_windows: dict[str, tuple[float, float]]  # data.suite_windows, each resolved
    m3d_intensity: str  # data.m3d_intensity: how M3D-Seg arrays were read ("unit" or "hu")
    base_model: str  # the base checkpoint folder, as the run gave it
    base_model_sha256: str  # base_model_digest of that folder
    box_convention: str = BOX_CONVENTION
    box_coords: str = "pixels"  # data.box_coords: the frame of the boxes in its answers
    format: int = FORMAT_VERSION

    @classmethod
    def of_run(cls, data: DataConfig, base_model: Path) -> TrainingFrame:
        """The frame of a run's data settings on ``base_model``."""
        return cls(
            num_slices=data.num_slices,
            slice_size=data.slice_size,
            window=resolve_window(data.window, "data.window"),
            suite_windows={suite: data.window_for(suite) for suite in sorted(data.suite_windows)},
            m3d_intensity=data.m3d_intensity,
            base_model=str(base_model),
            base_model_sha256=base_model_digest(base_model),
            box_coords=data.box_coords,
        )

    def write(self, folder: Path) -> Path:
        """``folder/medvol.json`` (the folder must exist)."""
        data = asdict(self)
        data["window"] = list(self.window)
        data["suite_windows"] = {k: list(v) for k, v in self.suite_windows.items()}
        path = Path(folder) / FILE_NAME
        path.write_text(json.dumps(data, indent=1) + "\n")
        return path

    @classmethod
    def read(cls, folder: Path) -> TrainingFrame:
        """The frame in ``folder/medvol.json``; :class:`TrainingFrameError` naming the file and
        the field when it is malformed, FileNotFoundError when there is none."""
        path = Path(folder) / FILE_NAME
        text = path.read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise TrainingFrameError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise TrainingFrameError(f"{path}: expected a JSON object")

        def get(name: str, kind: type | tuple[type, ...]):
            if name not in data:
                raise TrainingFrameError(f"{path}: field {name!r} is missing")
            value = data[name]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise TrainingFrameError(f"{path}: field {name!r} has an invalid value {value!r}")
            return value

        version = get("format", int)
        if version != FORMAT_VERSION:
            raise TrainingFrameError(
                f"{path}: field 'format' is {version}; this version reads format {FORMAT_VERSION}"
            )
        for name in ("num_slices", "slice_size"):
            if get(name, int) < 1:
                raise TrainingFrameError(f"{path}: field {name!r} must be >= 1, got {data[name]}")
        windows = get("suite_windows", dict)
        coords = data.get("box_coords", "pixels")  # absent: written before the setting existed
        if coords not in ("pixels", "relative1000"):
            raise TrainingFrameError(
                f"{path}: field 'box_coords' is {coords!r}; expected pixels or relative1000"
            )
        return cls(
            num_slices=data["num_slices"],
            slice_size=data["slice_size"],
            window=_window(path, "window", get("window", list)),
            suite_windows={
                str(k): _window(path, f"suite_windows.{k}", v) for k, v in windows.items()
            },
            m3d_intensity=get("m3d_intensity", str),
            base_model=get("base_model", str),
            base_model_sha256=get("base_model_sha256", str),
            box_convention=get("box_convention", str),
            box_coords=coords,
        )

    @classmethod
    def read_if_any(cls, folder: Path) -> TrainingFrame | None:
        """:meth:`read`, or None for a folder without medvol.json (an adapter from before it)."""
        if not (Path(folder) / FILE_NAME).is_file():
            return None
        return cls.read(folder)

    def conflicts(self, data: DataConfig) -> list[str]:
        """Where a run's data settings differ from this frame, one phrase per field naming both
        values (empty when they agree)."""
        pairs = {
            "num_slices": (self.num_slices, data.num_slices),
            "slice_size": (self.slice_size, data.slice_size),
            "window": (list(self.window), list(resolve_window(data.window, "data.window"))),
            "suite_windows": (
                {k: list(v) for k, v in self.suite_windows.items()},
                {k: list(data.window_for(k)) for k in sorted(data.suite_windows)},
            ),
            "m3d_intensity": (self.m3d_intensity, data.m3d_intensity),
            "box_coords": (self.box_coords, data.box_coords),
        }
        return [
            f"trained with {name} {ours} ({FILE_NAME}), the config has data.{name} {given}"
            for name, (ours, given) in pairs.items()
            if ours != given
        ]


def _window(path: Path, name: str, value: object) -> tuple[float, float]:
    ok = (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        and value[0] < value[1]
    )
    if not ok:
        raise TrainingFrameError(f"{path}: field {name!r} is not [low, high]: {value!r}")
    return float(value[0]), float(value[1])
