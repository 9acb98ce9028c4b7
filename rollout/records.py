"""Typed records of rollout: prompts in, groups of completions with logprobs out, weights in."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RolloutPrompt:
    """One prompt: the sample it asks about and its chat messages (``data.prompts``)."""

    sample_id: str
    messages: list[dict]


@dataclass(frozen=True)
class Completion:
    """One sampled answer: its tokens, text, each token's logprob under the sampling policy."""

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...]  # empty when logprobs were not asked for
    finish_reason: str  # "stop" (end of turn) or "length" (max_tokens reached)


@dataclass(frozen=True)
class Group:
    """The G completions of one prompt, and the prompt tokens as the engine tokenised them."""

    sample_id: str
    prompt_token_ids: tuple[int, ...]
    completions: tuple[Completion, ...]
    version: int  # weight version that produced the completions


@dataclass(frozen=True, eq=False)
class FolderBytes:
    """A folder's files as bytes, by path relative to the folder: how adapters, checkpoints and
    the final adapter travel between nodes that share no disk (through Ray's object store)."""

    files: dict[str, bytes]

    @classmethod
    def read(cls, folder: Path) -> FolderBytes:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder")
        return cls(
            {
                str(path.relative_to(folder)): path.read_bytes()
                for path in sorted(folder.rglob("*"))
                if path.is_file()
            }
        )

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.files.values())

    def write(self, folder: Path) -> Path:
        """The files under ``folder``, written to a temporary sibling and renamed (a reader never
        sees half of them); whatever was in ``folder`` before is replaced."""
        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, content in self.files.items():
            path = tmp / name
            if tmp.resolve() not in path.resolve().parents:
                raise ValueError(f"{name!r}: a file name that leaves its folder")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        return folder

    @classmethod
    def union(cls, parts: list[FolderBytes]) -> FolderBytes:
        """One folder of several processes' files (e.g. each rank's checkpoint shards); a name
        that two parts hold with different contents is an error."""
        files: dict[str, bytes] = {}
        for part in parts:
            for name, content in part.files.items():
                if name in files and files[name] != content:
                    raise ValueError(f"{name}: two parts hold different contents")
                files[name] = content
        return cls(files)


@dataclass(frozen=True, eq=False)
class AdapterTensors:
    """A LoRA adapter in memory: its peft config (the fields of adapter_config.json) and its
    weights by peft's saved names (``...q_proj.lora_A.weight``). How the learner pushes each
    policy version: through Ray's object store straight into the engines, no folder written on
    either side."""

    config: dict
    tensors: dict  # name -> torch.Tensor (on the CPU)

    def __reduce__(self):
        # Pickled (into Ray's object store) as flat numpy byte arrays, which Ray hands to the
        # receiver without copying: pickled as torch tensors, a rank-128 adapter of Qwen3-VL-4B
        # (528 MB) takes ~30x longer. The receiver's tensors are read-only views of the store.
        plain = {
            name: (str(t.dtype).removeprefix("torch."), tuple(t.shape), _byte_array(t))
            for name, t in self.tensors.items()
        }
        return (_adapter_from_arrays, (self.config, plain))

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @classmethod
    def read(cls, folder: Path) -> AdapterTensors:
        """A peft adapter folder's config and weights."""
        import json

        from safetensors.torch import load_file

        folder = Path(folder)
        return cls(
            json.loads((folder / "adapter_config.json").read_text()),
            load_file(str(folder / "adapter_model.safetensors")),
        )

    def write(self, folder: Path) -> Path:
        """A peft adapter folder of these weights (for engines or tools that load folders)."""
        import json

        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.tensors.items()}
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps(self.config, indent=2))
        return folder


def _byte_array(tensor):
    import torch

    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def _adapter_from_arrays(config: dict, plain: dict) -> AdapterTensors:
    import warnings

    import torch

    tensors = {}
    with warnings.catch_warnings():  # the store's arrays are read-only, and so are the tensors
        warnings.simplefilter("ignore", UserWarning)
        for name, (dtype, shape, array) in plain.items():
            tensors[name] = torch.from_numpy(array).view(getattr(torch, dtype)).reshape(shape)
    return AdapterTensors(config, tensors)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a broadcast: its checkpoint name, shape and dtype (``torch.float32`` ->
    ``"float32"``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class WeightBroadcast:
    """Full weights that learner rank 0 sends over the weight group (``rollout.vllm_engine.
    WeightGroup``): the tensors in the order sent, packed in buckets (each bucket one flat buffer
    of one dtype, so a push is a few large collectives, not one per tensor)."""

    buckets: tuple[tuple[TensorSpec, ...], ...]

    def as_plain(self) -> list:
        """Lists of str/int only: what survives vLLM's ``collective_rpc`` across processes."""
        return [[[s.name, list(s.shape), s.dtype] for s in bucket] for bucket in self.buckets]

    @classmethod
    def from_plain(cls, plain: list) -> WeightBroadcast:
        return cls(tuple(tuple(TensorSpec(n, tuple(shape), d) for n, shape, d in b) for b in plain))


@dataclass(frozen=True)
class WeightUpdate:
    """New policy weights for the engines, exactly one of: a LoRA adapter in memory (its tensors
    and config, loaded into the engine without a folder), a LoRA adapter or a full checkpoint,
    each as a folder on this node or as the folder's bytes (sent through Ray's object store; the
    receiving actor writes them to its node-local scratch folder), or full weights arriving over
    the weight group (learner rank 0 broadcasting to every engine)."""

    version: int
    adapter_dir: Path | None = None  # peft adapter (adapter_config.json + weights)
    weights_dir: Path | None = None  # merged HF weights (safetensors) of the same architecture
    adapter: FolderBytes | None = None  # an adapter folder's bytes
    weights: FolderBytes | None = None  # a merged checkpoint folder's bytes
    broadcast: WeightBroadcast | None = None  # merged weights over the weight group
    adapter_tensors: AdapterTensors | None = None  # a LoRA adapter in memory

    def __post_init__(self) -> None:
        kinds = ("adapter_dir", "weights_dir", "adapter", "weights", "broadcast", "adapter_tensors")
        given = [name for name in kinds if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "a weight update needs exactly one of adapter_dir, weights_dir, adapter, "
                f"weights, broadcast or adapter_tensors, got {given or 'none'}"
            )


class RolloutError(ValueError):
    """A request the engine cannot serve (it keeps serving others); names the sample."""


class WeightSyncError(RuntimeError):
    """A weight push that did not complete (timed out, or a peer of the weight group failed);
    names the version and the setting that bounds it. The step fails instead of hanging."""
