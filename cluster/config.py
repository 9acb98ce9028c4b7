"""Typed run configuration: dataclasses loaded from a YAML file plus ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from data.config import DataConfig
from evaluation.metrics import NSD_TOLERANCE_MM
from learner.config import GRPOConfig, SFTConfig
from reward_server.config import RewardConfig
from rollout.config import ModelConfig, RolloutConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the typed config; names the field."""


def _coerce(value: Any, hint: Any, field: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, field)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{field}: {value!r} fits none of {hint}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{field}: expected a mapping for {hint.__name__}, got {value!r}")
        return _build(hint, value, field)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{field}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{field}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{field}: expected {len(args)} items, got {value!r}")
            return tuple(
                _coerce(v, a, f"{field}[{i}]") for i, (v, a) in enumerate(zip(args, value))
            )
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{field}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{field}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, field): _coerce(v, vt, f"{field}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{field}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{field}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 2e-6 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(number):
                    return number
        raise ConfigError(f"{field}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{field}: expected a string, got {value!r}")
    if hint is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise ConfigError(f"{field}: expected a path, got {value!r}")
    return value


def _build(cls: type[T], values: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(f"unknown field{where}: {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in values.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: typing.Iterable[str] = (),
    sections: typing.Iterable[str] | None = None,
) -> T:
    """Build ``cls`` (a dataclass, possibly nested) from a YAML file and ``key=value`` overrides.

    Overrides use dotted keys (``grpo.lr=2e-6``); values are parsed as YAML scalars, so
    ``true``, ``3``, ``[1, 2]`` and ``null`` mean what they look like. Unknown keys and values of
    the wrong type raise :class:`ConfigError` naming the field. ``sections`` keeps only those
    top-level sections of the file (a tool that needs part of a run config reads the same file).
    """
    tree: dict = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        tree = loaded or {}
        if sections is not None:
            keep = set(sections)
            tree = {k: v for k, v in tree.items() if k in keep}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_path(tree, key.strip(), value)
    try:
        return _build(cls, tree)
    except ConfigError as err:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{err}") from None


def to_dict(config: Any) -> dict:
    """The resolved config as plain data (paths as strings), for logging with a run."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


# The run config: one section per part, each part's own typed config.


@dataclass
class GRPORunConfig(GRPOConfig):
    """The GRPO section of a run: the learner's settings plus how many ranks learn."""

    # DeepSpeed ranks of the learner, one Ray actor each (one GPU each on a cluster), data-
    # parallel over the batch's groups: each takes grpo.batch_size / num_learners prompts, so
    # batch_size must divide by it (the paper's "batch 1 per GPU": batch_size = num_learners)
    num_learners: int = 1
    # true: GRPO starts from the base model with no SFT adapter (the paper starts from SFT)
    from_base: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_learners < 1:
            raise ConfigError(f"grpo.num_learners: must be >= 1, got {self.num_learners}")
        if self.batch_size % self.num_learners:
            raise ConfigError(
                f"grpo.batch_size ({self.batch_size}) must divide by grpo.num_learners "
                f"({self.num_learners}): each learner rank takes an equal share of the prompts"
            )


@dataclass
class ClusterConfig:
    address: str | None = None  # Ray address to join; None = the job's cluster or a local one
    learner_gpus: float = 0.0  # GPUs of each learner rank (1 per rank on a GPU cluster)
    learner_cpus: float = 1.0  # CPUs of each learner rank
    rollout_cpus: float = 1.0  # CPUs per rollout actor
    reward_cpus: float = 0.5  # CPUs per reward worker
    placement_strategy: str = "PACK"  # placement group strategy: PACK | SPREAD | STRICT_PACK
    scale_file: str | None = None  # a file whose integer content sets the reward worker count
    # Actors' output (vLLM, DeepSpeed) to the driver, so `ray job logs` shows it; None: on when
    # joining a cluster (cluster.address or RAY_ADDRESS), off for a local instance
    log_to_driver: bool | None = None
    # Extra Ray resources of each learner rank's / rollout actor's bundle, to pin roles to nodes
    # that advertise them (`ray start --resources '{"learner_node": 1}'`); {}: any node
    learner_resources: dict[str, float] = field(default_factory=dict)
    rollout_resources: dict[str, float] = field(default_factory=dict)
    # Node-local folder for the actors' temporary files (adapters they are pushed, checkpoint
    # shards on their way to the driver, the merged policy base); a node's own $MEDVOL_SCRATCH
    # wins; None: the system's temporary folder. Never shared between nodes.
    scratch_dir: str | None = None
    # A weight push (object store or weight group) that takes longer fails the step with an
    # error naming this field instead of hanging
    weight_sync_timeout_s: float = 600.0
    # How grpo.export=merged weights travel: "collective" (learner rank 0 broadcasts to every
    # engine over NCCL on GPUs, gloo on CPU) or "object_store" (bytes of a checkpoint folder)
    merged_sync: str = "collective"
    weight_bucket_mb: float = 512.0  # tensors per collective of a full-weight broadcast, in MiB

    def __post_init__(self) -> None:
        if self.merged_sync not in ("collective", "object_store"):
            raise ConfigError(
                f"cluster.merged_sync must be 'collective' or 'object_store', "
                f"got {self.merged_sync!r}"
            )
        if not self.weight_sync_timeout_s > 0:
            raise ConfigError(
                f"cluster.weight_sync_timeout_s: must be > 0, got {self.weight_sync_timeout_s}"
            )
        if not self.weight_bucket_mb > 0:
            raise ConfigError(f"cluster.weight_bucket_mb: must be > 0, got {self.weight_bucket_mb}")


@dataclass
class TrackingConfig:
    tracking_uri: str = "sqlite:///mlflow.db"  # MLflow store or server (http://127.0.0.1:5000)
    experiment: str = "medvol-r1"  # MLflow experiment name
    run_name: str | None = None  # MLflow run name (default: the run's folder name)
    evidence_every: int = 5  # steps between evidence pictures logged as artifacts


@dataclass
class EvaluationConfig:
    # Surface-Dice (NSD) tolerance in mm of every suite without its own entry (2 mm: the usual
    # choice for abdominal organs on CT); on a scan of unknown voxel size (an M3D-Seg array with
    # no manifest spacing) the same number counts voxels
    nsd_tolerance_mm: float = NSD_TOLERANCE_MM
    # Per-suite tolerance (suite name -> mm), e.g. {"kits23": 1.0} for small lesions
    suite_nsd_tolerance_mm: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        tolerances = {"evaluation.nsd_tolerance_mm": self.nsd_tolerance_mm}
        for suite, value in self.suite_nsd_tolerance_mm.items():
            tolerances[f"evaluation.suite_nsd_tolerance_mm.{suite}"] = value
        for name, value in tolerances.items():
            if not value >= 0:
                raise ConfigError(f"{name}: NSD tolerance must be >= 0 mm, got {value}")

    def nsd_tolerance_for(self, suite: str) -> float:
        """The NSD tolerance (mm) of every case of ``suite``: its own entry, else the default."""
        return float(self.suite_nsd_tolerance_mm.get(suite, self.nsd_tolerance_mm))


@dataclass
class RunConfig:
    output_dir: Path = Path("runs/default")  # adapters, checkpoints, evaluation tables
    seed: int = 0  # seeds data order, key-slice sampling and rollout sampling
    steps: int | None = None  # GRPO steps to run (None: grpo.epochs over the training prompts)
    checkpoint_every: int = 5  # GRPO steps between checkpoints
    keep_checkpoints: int = 3  # the newest N GRPO checkpoints are kept, older ones deleted
    keep_adapters: int = (
        2  # the newest N adapters pushed to rollout are kept (each step writes one)
    )
    # SFT adapter merged into the base for GRPO: the run starts from the SFT policy and its KL
    # term pulls toward it. None: <output_dir>/sft/adapter, where learner.sft writes it (so one
    # output_dir holds the whole recipe); stays None under grpo.from_base
    sft_adapter: Path | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPORunConfig = field(default_factory=GRPORunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self) -> None:
        for name in ("keep_checkpoints", "keep_adapters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        # SFT anchors and the spatial reward must drop the same small components, else a
        # correct SFT anchor could score nothing.
        if self.data.min_box_area != self.reward.min_box_area:
            raise ConfigError(
                f"data.min_box_area ({self.data.min_box_area}) and reward.min_box_area "
                f"({self.reward.min_box_area}) must be equal"
            )
        if self.grpo.from_base and self.sft_adapter is not None:
            raise ConfigError(
                f"sft_adapter ({self.sft_adapter}) and grpo.from_base: true: GRPO starts from "
                "the SFT policy or from the base model, give one"
            )
        if self.sft_adapter is None and not self.grpo.from_base:
            self.sft_adapter = Path(self.output_dir) / "sft" / "adapter"


def load_run_config(path: str | Path | None, overrides: typing.Iterable[str] = ()) -> RunConfig:
    """The run config of a YAML file plus ``key=value`` overrides."""
    return load_config(RunConfig, path, overrides)
