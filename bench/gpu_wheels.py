"""The wheels ``scripts/gpu_check.sh --wheels DIR`` installs: what a GPU box lacks for the check.

A GPU box often comes with its own CUDA build of torch and no way to reach a package index. Run
this where pip reaches the index, in the environment ``scripts/setup.sh`` built:

    python -m bench.gpu_wheels DIR --python-version 3.12 [--have box-freeze.txt]

then copy DIR to the box and run ``bash scripts/gpu_check.sh --wheels DIR`` there.

- What is carried: everything the Ray-free cores import (the learner, MedSAM2 propagation, the
  transformers engine, the dataset): the requirements of :data:`TOP`, followed through the installed
  packages' metadata with the box's Python in the markers, each at requirements/lock-gpu.txt's
  version (the installed one for the few the lock does not list: sam2). Binary wheels for the
  box's Python and manylinux x86-64; a package PyPI has only as source (DeepSpeed, sam2, iopath,
  antlr4) is built here with ``pip wheel``, and must come out pure Python (``py3-none-any``).
- Never carried: torch's own (torch, torchvision, torchaudio, triton, nvidia-*, cuda-*). The
  box's CUDA build stays; ours would be several GB and a CUDA build of its own.
- ``--have FILE`` (the box's ``pip freeze``): a package the box has at the lock's version is not
  carried; one it has at another version is (the check's figures hinge on transformers, peft,
  DeepSpeed and sam2 being the versions measured here), except the compiled numerics named by
  ``--keep`` (default numpy, scipy, scikit-image, pillow): the box's other compiled packages were
  built against its numpy, and the check's figures do not hinge on their exact versions.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from common.cli import ArgumentParser, UsageError, command, removed_on_failure

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "lock-gpu.txt"

# What the Ray-free cores import at the top: learner (transformers, peft, DeepSpeed, accelerate),
# MedSAM2 (sam2 with hydra-core and iopath; scipy and scikit-image for its post-processing), the
# dataset (nibabel: bench.reward_server scores phantom volumes), and the project's own config and
# progress bars.
TOP = (
    "transformers",
    "peft",
    "deepspeed",
    "accelerate",
    "sam2",
    "hydra-core",
    "iopath",
    "scipy",
    "scikit-image",
    "nibabel",
    "pyyaml",
    "tqdm",
)
TORCH_OWN = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")
KEEP = ("numpy", "scipy", "scikit-image", "pillow")
# manylinux tags pip must be told one by one (it matches glibc 2.N exactly)
PLATFORMS = (
    *(f"manylinux_2_{n}_x86_64" for n in range(17, 40)),
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# sam2's CUDA op (hole filling in its video predictor) is optional; MedSAM2's post-processing
# here uses scipy, and a pure-Python wheel runs on any box.
BUILD_ENV = {"SAM2_BUILD_CUDA": "0", "DS_BUILD_OPS": "0"}


@dataclass(frozen=True)
class Wheel:
    """One package of the carried set, with why it is carried."""

    name: str
    version: str
    why: str


def read_pins(path: Path, python_version: str) -> dict[str, str]:
    """``name==version`` lines of a lock or a ``pip freeze``, canonical names, markers evaluated for
    the box's Python; other lines (comments, ``-e``, ``name @ url``) are skipped."""
    pins: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-") or "==" not in line:
            continue
        try:
            requirement = Requirement(line)
        except InvalidRequirement as e:
            raise UsageError(f"{path}:{number}: {line!r} is not a requirement ({e})") from None
        if requirement.marker is not None and not requirement.marker.evaluate(
            marker_environment(python_version)
        ):
            continue
        pins[canonicalize_name(requirement.name)] = next(iter(requirement.specifier)).version
    return pins


def marker_environment(python_version: str) -> dict[str, str]:
    return {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }


def requirements_of(name: str, python_version: str) -> list[str]:
    """The canonical names an installed package requires on the box's Python (no extras)."""
    try:
        requires = importlib.metadata.distribution(name).requires or []
    except importlib.metadata.PackageNotFoundError:
        raise UsageError(
            f"{name}: not installed in {sys.prefix}; run this in the environment scripts/setup.sh "
            "built (its metadata gives what each package requires)"
        ) from None
    names = []
    for line in requires:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(
            marker_environment(python_version)
        ):
            names.append(canonicalize_name(requirement.name))
    return names


def closure(top: tuple[str, ...], python_version: str) -> list[str]:
    """Every package ``top`` needs on the box's Python, torch's own left out (and not followed)."""
    seen: set[str] = set()
    todo = [canonicalize_name(name) for name in top]
    while todo:
        name = todo.pop()
        if name in seen or TORCH_OWN.match(name):
            continue
        seen.add(name)
        todo.extend(requirements_of(name, python_version))
    return sorted(seen)


def carried_set(
    names: list[str],
    lock: dict[str, str],
    have: dict[str, str] | None,
    keep: tuple[str, ...],
) -> tuple[list[Wheel], list[str]]:
    """The wheels to carry, and a line for each package the box's own version serves."""
    keep = tuple(canonicalize_name(name) for name in keep)
    carried, served = [], []
    for name in names:
        version = lock.get(name) or importlib.metadata.version(name)
        on_box = None if have is None else have.get(name)
        if on_box == version:
            served.append(f"{name} {version} (the box has it)")
        elif on_box is not None and name in keep:
            served.append(f"{name} {on_box} on the box, not the lock's {version} (--keep)")
        elif have is None:
            carried.append(Wheel(name, version, "needed"))
        elif on_box is None:
            carried.append(Wheel(name, version, "the box lacks it"))
        else:
            carried.append(Wheel(name, version, f"the box has {on_box}"))
    return carried, served


def fetch(wheel: Wheel, out: Path, python_version: str) -> tuple[Path, bool]:
    """Download the wheel for the box's Python, or build a pure-Python one from the source (then
    the flag is True)."""
    before = set(out.glob("*.whl"))
    spec = f"{wheel.name}=={wheel.version}"
    pip = [sys.executable, "-m", "pip"]
    download = [
        *pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
        "--implementation", "cp", *[f"--platform={tag}" for tag in PLATFORMS], "-d", str(out),
        spec,
    ]  # fmt: skip
    done = subprocess.run(download, capture_output=True, text=True)
    built = done.returncode != 0
    if built:
        if "No matching distribution" not in done.stderr:
            raise RuntimeError(f"pip download {spec} failed:\n{done.stderr.strip()}")
        build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), spec]
        env = {**os.environ, **BUILD_ENV}
        done = subprocess.run(build, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(
                f"pip wheel {spec} (no binary wheel for Python {python_version}) failed:\n"
                + done.stderr.strip()
            )
    new = sorted(set(out.glob("*.whl")) - before)
    if len(new) != 1:
        raise RuntimeError(f"{spec}: pip left {len(new)} new wheels in {out}, expected 1")
    platform = new[0].name.removesuffix(".whl").rsplit("-", 1)[-1]
    if built and platform != "any":
        new[0].unlink()
        raise UsageError(
            f"{spec}: the index has only its source, which builds a compiled wheel "
            f"({new[0].name}) for this Python {sys.version.split()[0]}, not for {python_version}; "
            "build it with the box's Python"
        )
    return new[0], built


def parse_args(argv: list[str] | None):
    parser = ArgumentParser(
        prog="python -m bench.gpu_wheels",
        description="Download (or build) the wheels scripts/gpu_check.sh --wheels installs on a "
        "GPU box that has its own torch and no package index.",
    )
    parser.add_argument("out", type=Path, help="a new or empty folder for the wheels")
    parser.add_argument(
        "--python-version", default="3.12", help="the box's Python, major.minor (default 3.12)"
    )
    parser.add_argument(
        "--have", type=Path, help="the box's `pip freeze`: what it has at the lock's version stays"
    )
    parser.add_argument(
        "--keep",
        action="append",
        help=f"a package whose box version serves even if it differs from the lock (repeatable; "
        f"default {', '.join(KEEP)})",
    )
    parser.add_argument("--lock", type=Path, default=LOCK, help="the lock (default: the GPU lock)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"3\.1[1-9]", args.python_version):
        raise UsageError(f"--python-version {args.python_version}: give 3.11, 3.12, ...")
    if args.out.exists() and any(args.out.iterdir()):
        raise UsageError(
            f"{args.out}: not empty; give a new folder (a stale wheel of another version would be "
            "installed beside the new one)"
        )
    return args


@command()
def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    lock = read_pins(args.lock, args.python_version)
    have = None if args.have is None else read_pins(args.have, args.python_version)
    names = closure(TOP, args.python_version)
    carried, served = carried_set(names, lock, have, tuple(args.keep or KEEP))
    for line in served:
        print(f"served by the box: {line}")
    with removed_on_failure(args.out):
        args.out.mkdir(parents=True, exist_ok=True)
        total = 0
        for wheel in tqdm(carried, desc="wheels", unit="wheel"):
            path, built = fetch(wheel, args.out, args.python_version)
            size = path.stat().st_size
            total += size
            how = ", built here from its source" if built else ""
            tqdm.write(f"{path.name}  {size / 2**20:.1f} MiB  ({wheel.why}{how})")
    print(
        f"{len(carried)} wheels, {total / 2**20:.1f} MiB, in {args.out} for Python "
        f"{args.python_version}; on the box: bash scripts/gpu_check.sh --wheels {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
