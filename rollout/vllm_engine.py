"""The rollout engine over vLLM: G samples per prompt in one generate call, live weight updates.

LoRA updates use one ``LoRARequest`` per adapter version (the base weights stay put), loaded
from a folder or from tensors in memory (:meth:`WeightReceiver.load_adapter_tensors`). Every
image is encoded at the slice budget (``rollout.prompting.processor_kwargs``). Full-weight
updates reload the worker's weights in place (``reload_weights``) from a folder, or from tensors
arriving over the weight group (:class:`WeightGroup`: learner rank 0 broadcasts to every engine,
NCCL on GPUs, gloo on CPU), then drop the prefix and encoder caches, which would otherwise serve
activations of the old weights. The broadcast is taken by the vLLM worker itself
(:class:`WeightReceiver`, its ``worker_extension_cls``), in the engine process or the
engine-core process alike: only tensor names, shapes and dtypes cross ``collective_rpc``, as
tensors inside its arguments do not survive between processes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from common.config import ModelConfig, RolloutConfig
from rollout.prompting import check_batch, load_processor, processor_kwargs, render
from rollout.records import (
    Completion,
    Group,
    RolloutError,
    RolloutPrompt,
    TensorSpec,
    WeightBroadcast,
    WeightSyncError,
    WeightUpdate,
)

log = logging.getLogger(__name__)


def _dtype(model_cfg: ModelConfig) -> str:
    if model_cfg.dtype != "auto":
        return model_cfg.dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


# LoRA ranks vLLM can be started with (its ``max_lora_rank`` choices).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank_to_serve(adapter_dir: Path, at_least: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that serves the adapter in ``adapter_dir``
    (a GRPO run's final adapter stacks the SFT and GRPO ranks) and is at least ``at_least``."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    try:
        rank = int(json.loads(config_path.read_text())["r"])
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise RolloutError(f"{config_path}: not a peft adapter ({err})") from None
    need = max(rank, at_least)
    for choice in VLLM_LORA_RANKS:
        if choice >= need:
            return choice
    raise RolloutError(f"{adapter_dir}: LoRA rank {rank} is above vLLM's largest, 512")


class VLLMEngine:
    """vLLM ``LLM`` over a Qwen3-VL checkpoint folder."""

    def __init__(
        self, model_path: str | Path, cfg: RolloutConfig, model_cfg: ModelConfig | None = None
    ):
        if cfg.in_process:
            # Must be set before vLLM builds its engine: run the engine core in this process.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self.cfg = cfg
        self.model_path = Path(model_path)
        self.processor = load_processor(self.model_path, cfg.slice_size)
        kwargs = {}
        if cfg.in_process:
            kwargs["distributed_executor_backend"] = "uni"
        chunked = cfg.chunked_prefill
        if chunked is None:
            import torch

            chunked = torch.cuda.is_available()
        if not chunked:
            # A prompt prefilled in pieces rewinds its seeded generator's offset after each
            # piece, which a CPU generator does not have ("CPU Generator does not use offset"),
            # so on CPU every prompt is prefilled in one step.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=cfg.max_model_len)
        if cfg.enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=cfg.max_lora_rank, max_loras=1)
        self.llm = LLM(
            model=str(self.model_path),
            dtype=_dtype(model_cfg or ModelConfig()),
            max_model_len=cfg.max_model_len,
            enable_prefix_caching=cfg.enable_prefix_caching,
            limit_mm_per_prompt={"image": cfg.max_images, "video": 0},
            # Every slice at exactly slice_size^2 pixels, as the learner's processor encodes it.
            mm_processor_kwargs=processor_kwargs(cfg.slice_size),
            seed=cfg.seed,
            enforce_eager=cfg.enforce_eager,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            # Logprobs of the distribution tokens were drawn from (after temperature), which
            # the learner scores them under too; vLLM's default is the raw, untempered one.
            logprobs_mode="processed_logprobs",
            # The worker joins the weight group and takes broadcast weights itself.
            worker_extension_cls="rollout.vllm_engine.WeightReceiver",
            **kwargs,
        )
        self.version = 0
        self._lora = None
        self._banned = vision_token_ids(self.processor.tokenizer)

    def _sampling(self, greedy: bool, group_size: int, seed: int | None):
        from vllm import SamplingParams

        return SamplingParams(
            n=group_size,
            temperature=0.0 if greedy else self.cfg.temperature,
            top_p=1.0 if greedy else self.cfg.top_p,
            max_tokens=self.cfg.max_tokens,
            logprobs=0 if self.cfg.logprobs else None,
            seed=seed,
            logit_bias=dict.fromkeys(self._banned, -100.0),
        )

    def generate(
        self,
        prompts: list[RolloutPrompt],
        greedy: bool = False,
        group_size: int | None = None,
        seed: int | None = None,
    ) -> list[Group]:
        """G completions for each prompt (1 when greedy), grouped by prompt, in prompt order."""
        group_size = 1 if greedy else (group_size or self.cfg.group_size)
        check_batch(prompts, group_size)
        requests = []
        for prompt in prompts:
            text, images = render(self.processor, prompt, self.cfg.max_images)
            requests.append({"prompt": text, "multi_modal_data": {"image": images}})
        from vllm.exceptions import VLLMValidationError

        try:
            outputs = self.llm.generate(
                requests,
                self._sampling(greedy, group_size, seed),
                lora_request=self._lora,
                use_tqdm=False,
            )
        except (ValueError, VLLMValidationError) as err:  # e.g. a prompt over max_model_len
            ids = [p.sample_id for p in prompts]
            raise RolloutError(f"samples {ids}: {err}") from None
        groups = []
        for prompt, out in zip(prompts, outputs):
            completions = tuple(
                Completion(
                    token_ids=tuple(c.token_ids),
                    text=c.text,
                    logprobs=tuple(step[tok].logprob for step, tok in zip(c.logprobs, c.token_ids))
                    if c.logprobs is not None
                    else (),
                    finish_reason=c.finish_reason or "length",
                )
                for c in out.outputs
            )
            groups.append(
                Group(prompt.sample_id, tuple(out.prompt_token_ids), completions, self.version)
            )
        return groups

    def update_weights(self, update: WeightUpdate) -> None:
        """Serve ``update``'s weights from the next request on; a bad update raises and the
        engine keeps its current weights."""
        if update.adapter_tensors is not None:
            self._use_adapter_tensors(update)
        elif update.adapter_dir is not None:
            self._use_adapter(update)
        elif update.weights_dir is not None:
            self._reload(update)
        elif update.broadcast is not None:
            self._receive(update.broadcast)
        else:
            raise RolloutError(
                f"weight version {update.version}: bytes of a folder reach an engine only "
                "through a rollout actor, which writes them to its scratch folder first"
            )
        self.version = update.version
        log.info("rollout engine now at weight version %d", update.version)

    def _check_lora(self, rank: int, where: str) -> None:
        if not self.cfg.enable_lora:
            raise RolloutError("this engine was started without LoRA (rollout.enable_lora)")
        if rank > self.cfg.max_lora_rank:
            raise RolloutError(
                f"{where}: LoRA rank {rank} exceeds the engine's "
                f"max_lora_rank {self.cfg.max_lora_rank}"
            )

    def _use_adapter(self, update: WeightUpdate) -> None:
        from vllm.lora.request import LoRARequest

        config_path = Path(update.adapter_dir) / "adapter_config.json"
        try:
            rank = json.loads(config_path.read_text())["r"]
        except (FileNotFoundError, KeyError, json.JSONDecodeError) as err:
            raise RolloutError(f"{config_path}: not a peft adapter ({err})") from None
        self._check_lora(rank, str(update.adapter_dir))
        request = LoRARequest(
            f"policy-v{update.version}", update.version + 1, str(update.adapter_dir)
        )
        # Loaded now, so a broken adapter fails here and not in the next rollout.
        self._serve(request, lambda: self.llm.llm_engine.add_lora(request), update.adapter_dir)

    def _use_adapter_tensors(self, update: WeightUpdate) -> None:
        """Load an adapter from memory: its weights cross into the worker as one flat byte
        buffer (:func:`pack_tensors`; bytes survive ``collective_rpc`` between processes, tensors
        do not) and the worker builds vLLM's LoRA model from them
        (:meth:`WeightReceiver.load_adapter_tensors`). Requests then name it by its id; its path
        is never read."""
        from vllm.lora.request import LoRARequest

        adapter = update.adapter_tensors
        where = f"weight version {update.version} (adapter in memory)"
        self._check_lora(adapter.rank, where)
        name = f"policy-v{update.version}"
        request = LoRARequest(name, update.version + 1, f"{IN_MEMORY_ADAPTER}{name}")
        specs, payload = pack_tensors(adapter.tensors)
        args = (name, request.lora_int_id, adapter.config, specs, payload)
        self._serve(
            request, lambda: self.llm.collective_rpc("load_adapter_tensors", args=args), where
        )

    def _serve(self, request, load, where) -> None:
        """Load ``request``'s adapter with ``load()`` and serve it from the next rollout on; the
        previous adapter is dropped. If it does not load, the previous one stays."""
        previous = self._lora
        self._lora = request
        try:
            load()
        except Exception as err:  # noqa: BLE001 - vLLM raises various types for bad adapters
            self._lora = previous
            raise RolloutError(f"{where}: adapter does not load ({err})") from None
        if previous is not None and previous.lora_int_id != request.lora_int_id:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)

    def _reload(self, update: WeightUpdate) -> None:
        check_same_architecture(self.model_path, Path(update.weights_dir))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(update.weights_dir)})
        self._reset_caches()

    def _reset_caches(self) -> None:
        # Cached prefixes and image encodings were computed with the old weights.
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()

    def join_weight_group(self, host: str, port: int, rank: int, world: int, timeout_s: float):
        """Join the weight group as ``rank`` (blocks until all ``world`` members have joined)."""
        self.llm.collective_rpc("join_weight_group", args=(host, port, rank, world, timeout_s))

    def _receive(self, broadcast: WeightBroadcast) -> None:
        """Take a broadcast of full weights; one that does not fit the served model is received
        all the same (the sender must not wait on us) and then refused."""
        problem = broadcast_mismatch(self.model_path, broadcast)
        self.llm.collective_rpc("receive_weights", args=(broadcast.as_plain(), problem is None))
        if problem is not None:
            raise RolloutError(f"broadcast weights do not match the served model ({problem})")
        self._reset_caches()


class WeightGroup:
    """The collective group that full weights travel over when nodes share no disk: learner
    rank 0 (rank 0, which hosts the rendezvous store) and every rollout engine (ranks 1..N).
    NCCL between GPUs and gloo on CPU, through the same code. Each collective fails after
    ``timeout_s`` with :class:`WeightSyncError` instead of hanging."""

    def __init__(self, host: str, port: int, rank: int, world: int, timeout_s: float, store=None):
        import datetime

        import torch
        import torch.distributed as dist

        self.rank, self.world, self.timeout_s = rank, world, float(timeout_s)
        timeout = datetime.timedelta(seconds=self.timeout_s)
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else None
        backend = "nccl" if cuda else "gloo"
        try:
            if store is None:
                store = dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
            self.store = store  # rank 0's store serves the others: keep it alive
            store.set(f"backend/{rank}", backend)
            first = store.get("backend/0").decode()
            if first != backend:
                raise WeightSyncError(
                    f"weight group: learner rank 0 uses {first} but rank {rank} has {backend} "
                    "(learner and rollout actors must both be on GPUs, or both on CPUs)"
                )
            group = dist.ProcessGroupNCCL if cuda else dist.ProcessGroupGloo
            self.group = group(store, rank, world, timeout)
        except RuntimeError as err:
            raise WeightSyncError(
                f"weight group: rank {rank} of {world} could not join {host}:{port} within "
                f"{self.timeout_s:g} s (cluster.weight_sync_timeout_s): {err}"
            ) from None

    @staticmethod
    def open(world: int, timeout_s: float) -> tuple[object, str, int]:
        """Rank 0's rendezvous store on a free port of this node: (store, host, port)."""
        import datetime

        import torch.distributed as dist

        from common.runtime import node_ip

        host = node_ip()
        store = dist.TCPStore(
            host,
            0,
            world,
            is_master=True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        return store, host, store.port

    def _broadcast(self, flat, index: int, count: int) -> None:
        import torch
        import torch.distributed as dist

        options = dist.BroadcastOptions()
        options.rootRank, options.rootTensor = 0, 0
        try:
            self.group.broadcast([flat], options).wait()
            if flat.is_cuda:
                torch.cuda.synchronize(flat.device)
        except RuntimeError as err:
            size = flat.numel() * flat.element_size() / 2**20
            raise WeightSyncError(
                f"weight broadcast: bucket {index + 1}/{count} ({size:.1f} MiB) did not complete "
                f"on rank {self.rank} of {self.world} within {self.timeout_s:g} s "
                f"(cluster.weight_sync_timeout_s): {err}"
            ) from None

    def send(self, tensors: Iterable, broadcast: WeightBroadcast) -> None:
        """Rank 0: ``(name, tensor)`` pairs in ``broadcast``'s order, one collective a bucket."""
        import torch

        pairs = iter(tensors)
        for index, bucket in enumerate(broadcast.buckets):
            dtype = getattr(torch, bucket[0].dtype)
            parts = []
            for spec in bucket:
                name, tensor = next(pairs)
                if name != spec.name or tuple(tensor.shape) != spec.shape:
                    raise ValueError(f"{name} {tuple(tensor.shape)} sent where {spec} was planned")
                parts.append(tensor.detach().reshape(-1).to(dtype))
            flat = torch.cat(parts)
            if self.device is not None:
                flat = flat.to(self.device)
            self._broadcast(flat, index, len(broadcast.buckets))

    def receive(self, broadcast: WeightBroadcast) -> Iterator:
        """Ranks 1..N: ``(name, tensor)`` pairs as each bucket arrives."""
        import torch

        for index, bucket in enumerate(broadcast.buckets):
            dtype = getattr(torch, bucket[0].dtype)
            flat = torch.empty(sum(s.numel for s in bucket), dtype=dtype, device=self.device)
            self._broadcast(flat, index, len(broadcast.buckets))
            offset = 0
            for spec in bucket:
                yield spec.name, flat[offset : offset + spec.numel].view(spec.shape)
                offset += spec.numel


def plan_buckets(tensors: Iterable, bucket_bytes: int) -> WeightBroadcast:
    """The broadcast of ``(name, tensor)`` pairs, in their order: consecutive tensors of one
    dtype share a bucket of at most ``bucket_bytes`` (a larger tensor gets a bucket alone)."""
    buckets: list[list[TensorSpec]] = []
    size = 0
    for name, tensor in tensors:
        spec = TensorSpec(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
        nbytes = tensor.numel() * tensor.element_size()
        if not buckets or buckets[-1][0].dtype != spec.dtype or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(spec)
        size += nbytes
    return WeightBroadcast(tuple(tuple(b) for b in buckets))


# The path of a LoRARequest whose adapter was loaded from memory: never a folder, never read.
IN_MEMORY_ADAPTER = "in-memory://"


class WeightReceiver:
    """What vLLM mixes into its workers (``worker_extension_cls``): the worker joins the weight
    group and reloads its weights in place from the tensors as they arrive, and loads LoRA
    adapters from memory."""

    def load_adapter_tensors(
        self, name: str, lora_id: int, config: dict, specs: list, payload
    ) -> int:
        """Add the LoRA adapter of ``config`` and its weights (``specs`` and ``payload``, from
        :func:`pack_tensors`) to this worker's LoRA manager as ``lora_id``, as loading it from a
        folder would.

        vLLM (0.32) loads adapters only from a path; here its worker manager's add path runs
        unchanged, with the one step that reads the folder replaced for this call by building
        vLLM's LoRA model from the tensors (``LoRAModel.from_lora_tensors``, which the folder
        loader also ends in). tests/rollout/test_adapter_push.py fails if vLLM changes under it.
        """
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper
        from vllm.lora.request import LoRARequest
        from vllm.lora.utils import parse_fine_tuned_lora_name

        manager = self.model_runner.lora_manager
        adapters = manager._adapter_manager
        model = adapters.model
        helper = PEFTHelper.from_dict(
            {**config, "vllm_max_position_embeddings": manager.max_position_embeddings}
        )
        helper.validate_legal(manager.lora_config)
        tensors = unpack_tensors(specs, payload)
        expected = set()
        for module in adapters.supported_lora_modules:
            expected.update(adapters.packed_modules_mapping.get(module, [module]))
        expected.update(helper.modules_to_save or ())

        mapper = getattr(model, "hf_to_vllm_mapper", None)
        mapper = mapper.get_rename_mapper() if mapper is not None else None
        unknown = sorted(
            {
                module
                for module, _ in (parse_fine_tuned_lora_name(k, mapper) for k in tensors)
                if module.rsplit(".", 1)[-1] not in expected
            }
        )
        if unknown:
            raise ValueError(f"adapter {name}: modules the served model has no LoRA for: {unknown}")

        def from_tensors(request: LoRARequest) -> LoRAModel:
            return LoRAModel.from_lora_tensors(
                lora_model_id=request.lora_int_id,
                tensors=tensors,
                peft_helper=helper,
                device="cpu",
                dtype=manager.lora_config.lora_dtype,
                model_vocab_size=manager.vocab_size,
                weights_mapper=mapper,
                skip_prefixes=getattr(model, "lora_skip_prefixes", None),
            )

        manager._load_adapter = from_tensors  # this call only: shadows the folder loader
        try:
            request = LoRARequest(name, lora_id, f"{IN_MEMORY_ADAPTER}{name}", load_inplace=True)
            manager.add_adapter(request)
        finally:
            del manager._load_adapter
        return lora_id

    def join_weight_group(self, host: str, port: int, rank: int, world: int, timeout_s: float):
        self._medvol_weight_group = WeightGroup(host, port, rank, world, timeout_s)
        return True

    def receive_weights(self, plain: list, load: bool = True) -> int:
        group = getattr(self, "_medvol_weight_group", None)
        if group is None:
            raise WeightSyncError("weight broadcast: this engine has not joined a weight group")
        pairs = group.receive(WeightBroadcast.from_plain(plain))
        if load:
            self.reload_weights(weights_iterator=pairs)
        for _ in pairs:  # what the reload did not take still has to be received
            pass
        return sum(len(b) for b in plain)


def pack_tensors(tensors: dict) -> tuple[list, memoryview]:
    """``(specs, payload)``: each tensor's ``[name, shape, dtype]`` and all their bytes in one
    buffer, in order: what crosses ``collective_rpc`` as plain lists and one binary field."""
    import torch

    specs = [[n, list(t.shape), str(t.dtype).removeprefix("torch.")] for n, t in tensors.items()]
    parts = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors.values()]
    flat = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    return specs, memoryview(flat.numpy())


def unpack_tensors(specs: list, payload) -> dict:
    """The tensors of :func:`pack_tensors`, as views of ``payload`` (copied only where a tensor
    does not start at a multiple of its element size)."""
    import math
    import warnings

    import torch

    dtypes = [getattr(torch, dtype) for _, _, dtype in specs]
    sizes = [dtype.itemsize * math.prod(shape) for (_, shape, _), dtype in zip(specs, dtypes)]
    if sum(sizes) != len(payload):
        raise ValueError(f"adapter payload: {len(payload)} bytes where the specs need {sum(sizes)}")
    if not sizes:
        return {}
    with warnings.catch_warnings():  # a bytes payload is read-only; nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(payload, dtype=torch.uint8)
    tensors, offset = {}, 0
    for (name, shape, _), dtype, size in zip(specs, dtypes, sizes):
        chunk = flat[offset : offset + size]
        if offset % dtype.itemsize:
            chunk = chunk.clone()
        tensors[name] = chunk.view(dtype).reshape(shape)
        offset += size
    return tensors


def vision_token_ids(tokenizer) -> list[int]:
    """Image/video placeholder tokens: a completion containing one could not be fed back to the
    model (it would ask for image features that do not exist), so they are never sampled."""
    names = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    return [i for i in (tokenizer.convert_tokens_to_ids(n) for n in names) if i is not None]


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a checkpoint folder, from its safetensors headers."""
    from safetensors import safe_open

    out = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise RolloutError(f"{folder}: no .safetensors weights")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                out[key] = tuple(f.get_slice(key).get_shape())
    return out


def _shape_mismatch(old: dict, fresh: dict) -> str | None:
    wrong = [k for k in fresh if k in old and old[k] != fresh[k]]
    unknown = [k for k in fresh if k not in old]
    if not (wrong or unknown):
        return None
    return "; ".join(
        [f"{k}: {fresh[k]} vs {old[k]}" for k in wrong[:3]] + [f"unknown {k}" for k in unknown[:3]]
    )


def check_same_architecture(current: Path, new: Path) -> None:
    """Raise unless ``new`` holds weights of the same shapes as ``current`` (by config and by
    the safetensors headers), so a bad push is refused before anything is loaded."""
    detail = _shape_mismatch(checkpoint_shapes(current), checkpoint_shapes(new))
    if detail is not None:
        raise RolloutError(f"{new}: weights do not match the served model ({detail})")


def broadcast_mismatch(current: Path, broadcast: WeightBroadcast) -> str | None:
    """Why a broadcast's tensors do not fit the checkpoint in ``current``; None when they do."""
    fresh = {s.name: s.shape for bucket in broadcast.buckets for s in bucket}
    return _shape_mismatch(checkpoint_shapes(current), fresh)
