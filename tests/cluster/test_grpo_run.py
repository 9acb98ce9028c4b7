"""The GRPO run as users meet it: dry run, `ray job submit` on a local head, kill and resume,
and the reward worker count changed while the run goes on."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.placement import plan
from common.config import ConfigError, load_run_config

REPO = Path(__file__).resolve().parents[2]
METRICS = [
    "reward/format",
    "reward/axial",
    "reward/spatial",
    "reward/consistency",
    "reward/total",
    "reward/group_std",
    "reward/format_failure_rate",
    "reward/timeouts",
    "advantage/mean",
    "advantage/zero_std_share",
    "learner/loss",
    "learner/kl",
    "learner/clip_fraction",
    "learner/ratio_mean",
    "learner/logprob_gap_mean",
    "learner/logprob_gap_max",
    "data/skipped_samples",
    "learner/entropy",
    "learner/grad_norm",
    "learner/skipped_steps",
    "rollout/response_length",
    "rollout/staleness",
    "time/generate_s",
    "time/reward_s",
    "time/learn_s",
    "time/weight_sync_s",
    "throughput/completions_per_s",
    "reward/workers",
]


def test_dry_run_validates_and_prints_the_placement():
    out = subprocess.run(
        [sys.executable, "-m", "cluster.grpo", "--config", "configs/paper.yaml", "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "bundle 0  learner" in out.stdout and "'GPU': 5.0" in out.stdout
    with pytest.raises(ConfigError, match="grpo.lr: expected a number"):
        load_run_config("configs/tiny.yaml", ["grpo.lr=fast"])
    # 2e-6 without a dot is a string to YAML 1.1; a number field takes it as the number
    assert load_run_config("configs/tiny.yaml", ["grpo.lr=2e-6"]).grpo.lr == 2e-6
    with pytest.raises(ConfigError, match="grpo.lr: expected a number, got 'nan'"):
        load_run_config("configs/tiny.yaml", ["grpo.lr=nan"])
    with pytest.raises(ConfigError, match="unknown field in rollout: colour"):
        load_run_config("configs/tiny.yaml", ["rollout.colour=red"])
    with pytest.raises(ValueError, match="reward.num_workers must be >= 1"):
        plan(load_run_config("configs/tiny.yaml", ["reward.num_workers=0"]))


def test_dry_run_places_the_paper_plan_on_a_described_cluster_or_refuses_it():
    from cluster.placement import assign, parse_cluster

    placement = plan(load_run_config("configs/paper.yaml"))  # 1 learner + 2 rollout + 2 reward

    def where(cluster):
        return {a.role: (a.node, a.gpus) for a in assign(placement, parse_cluster(cluster))}

    one = where("8")
    assert one["learner"] == (0, (0,)) and one["rollout actor 1"] == (0, (2,))
    assert one["reward worker 1"] == (0, (4,))
    two = where("4,4")  # the placement group packs onto node 0, a reward worker spills over
    assert two["reward worker 0"] == (0, (3,)) and two["reward worker 1"] == (1, (0,))
    with pytest.raises(ValueError, match=r"reward worker 1 needs .*'GPU': 1.0.*node 1: 0 GPUs"):
        assign(placement, parse_cluster("2,2"))
    with pytest.raises(ValueError, match=r"--cluster: node 1 'x' is not GPUS or GPUS:CPUS"):
        parse_cluster("4,x")
    tight = plan(load_run_config("configs/paper.yaml", ["cluster.placement_strategy=STRICT_PACK"]))
    with pytest.raises(ValueError, match=r"placement group \(STRICT_PACK\) needs .* on one node"):
        assign(tight, parse_cluster("2,2,2"))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.grpo",
            "--config",
            "configs/paper.yaml",
            "--dry-run",
            "--cluster",
            "4,4",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "reward worker 1    node 1  GPU 0" in out.stdout, out.stderr


def test_old_checkpoints_and_adapters_are_pruned_by_number(tmp_path):
    from common.runtime import prune

    for n in (1, 2, 9, 10, 11):
        (tmp_path / f"step-{n}").mkdir()
    (tmp_path / "step-x").mkdir()  # not a numbered folder: left alone
    (tmp_path / "latest").write_text("step-11")
    deleted = prune(tmp_path, "step-", keep=2)
    assert sorted(p.name for p in deleted) == ["step-1", "step-2", "step-9"]  # 9 < 10 < 11
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-10", "step-11", "step-x"]
    with pytest.raises(ConfigError, match="keep_checkpoints: must be >= 1"):
        load_run_config("configs/tiny.yaml", ["keep_checkpoints=0"])


def test_a_first_interrupt_asks_to_stop_and_a_second_interrupts():
    from cluster.trainer import stop_requests

    # Python's own handler before the block, whatever an earlier test left installed
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with stop_requests() as stop:
            assert not stop.is_set()
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler runs in the main thread at the next bytecode
            assert stop.is_set()  # asked, not raised
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        if outer is not None:  # None: a handler installed outside Python, left as it was
            signal.signal(signal.SIGINT, outer)


def test_bad_input_is_one_line_and_exit_status_2(tmp_path, capsys):
    from cluster.grpo import main
    from common.cli import run_cli

    cases = [
        (["--config", str(tmp_path / "none.yaml")], f"--config: {tmp_path}/none.yaml: "),
        (["--config", "configs/tiny.yaml", "grpo.lr=fast"], "grpo.lr: expected a number"),
        (["--config", "configs/tiny.yaml", "grpo.loss_agg=sum"], "grpo.loss_agg must be one of"),
        (
            ["--config", "configs/tiny.yaml", f"data.manifest={tmp_path}/m.jsonl"],
            f"data.manifest: {tmp_path}/m.jsonl: no such file",
        ),
    ]
    for argv, message in cases:
        assert run_cli(main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "grpo").exists()


@pytest.fixture(scope="module")
def run_args(phantom_manifest, tmp_path_factory):
    from rollout.tiny_model import build_tiny_qwen3vl

    model = build_tiny_qwen3vl(tmp_path_factory.mktemp("tiny"), "test")
    return [
        f"data.manifest={phantom_manifest}",
        "data.num_slices=8",
        "data.slice_size=64",
        f"model.path={model}",
        "rollout.max_tokens=16",
        "cluster.rollout_cpus=0.5",
        "cluster.learner_cpus=0.5",
    ]


def metric_steps(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return runs, {
        m: sorted({h.step for h in client.get_metric_history(runs[0].info.run_id, m)})
        for m in METRICS
    }


@pytest.mark.slow
def test_ray_job_submit_runs_and_mlflow_holds_every_metric_for_every_step(run_args, tmp_path):
    """From an SFT adapter: the engines serve base + SFT under the GRPO adapter, the KL of the
    first step is ~0 (the reference is the SFT policy), the final adapter stacks both."""
    from common.services import RayHead
    from tests.conftest import SFT_LIKE_TARGETS, random_adapter

    model = next(a.split("=", 1)[1] for a in run_args if a.startswith("model.path="))
    sft = random_adapter(Path(model), tmp_path / "sft-adapter", SFT_LIKE_TARGETS, 4, 0.05, 2)

    head = RayHead.start(num_cpus=4, temp_dir=Path("/tmp") / f"medvol-test-{os.getpid()}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        job = head.submit_grpo(
            REPO,
            [
                "--config",
                "configs/tiny.yaml",
                *run_args,
                f"output_dir={tmp_path}",
                f"tracking.tracking_uri={uri}",
                f"sft_adapter={sft}",
                "grpo.max_steps=2",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout
    finally:
        head.stop()
    runs, steps = metric_steps(uri, "medvol-r1-tiny")
    assert len(runs) == 1
    assert all(steps[m] == [1, 2] for m in METRICS), steps
    from mlflow.tracking import MlflowClient

    first = {
        m: MlflowClient(uri).get_metric_history(runs[0].info.run_id, m)[0].value
        for m in ("learner/kl", "learner/ratio_mean", "learner/clip_fraction")
    }
    assert first["learner/kl"] < 0.01, first  # pi_ref = SFT policy = pi at step 1
    assert first["learner/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert first["learner/clip_fraction"] == 0.0
    final = json.loads((tmp_path / "grpo" / "adapter" / "adapter_config.json").read_text())
    assert final["r"] == 4 + 16  # SFT rank + configs/tiny.yaml's GRPO rank, stacked
    # The final adapter and the checkpoints know the frame they were trained in.
    from learner.training_frame import TrainingFrame

    frame = TrainingFrame.read(tmp_path / "grpo" / "adapter")
    assert (frame.num_slices, frame.slice_size, frame.base_model) == (8, 64, model)
    assert TrainingFrame.read(tmp_path / "grpo" / "checkpoints" / "step-2") == frame
    # The run's recorded config loads back as a config (what evaluate --config takes).
    from common.config import load_run_config

    recorded = load_run_config(tmp_path / "grpo" / "config.json")
    assert (recorded.output_dir, recorded.sft_adapter) == (tmp_path, sft)
    assert recorded.grpo.max_steps == 2 and recorded.rollout.seed == recorded.seed


@pytest.mark.slow
def test_killed_driver_resumes_in_the_same_run_and_workers_scale_mid_run(run_args, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    scale = tmp_path / "reward_workers"
    args = [
        sys.executable,
        "-m",
        "cluster.grpo",
        "--config",
        "configs/tiny.yaml",
        *run_args,
        f"output_dir={tmp_path}",
        f"tracking.tracking_uri={uri}",
        "grpo.max_steps=6",
        "grpo.batch_size=2",
        "grpo.checkpoint_every=2",
        f"cluster.scale_file={scale}",
        "grpo.from_base=true",
    ]
    first = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "grpo" / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not latest.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
    assert latest.read_text().strip() == "step-2"
    first.send_signal(signal.SIGINT)  # Ctrl-C mid-run: it stops after the step under way
    assert first.wait(timeout=120) == 130  # "error: interrupted", not a finished run
    stopped = int(latest.read_text().strip().removeprefix("step-"))
    assert 2 <= stopped < 6  # the interrupted step's checkpoint
    scale.write_text("2")  # change the reward worker count for the rest of the run
    second = subprocess.run(
        [*args, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert second.returncode == 0, second.stderr[-3000:]
    runs, steps = metric_steps(uri, "medvol-r1-tiny")
    assert len(runs) == 1  # the same MLflow run continued
    assert steps["reward/total"] == [1, 2, 3, 4, 5, 6]
    from mlflow.tracking import MlflowClient

    workers = {
        h.step: h.value
        for h in MlflowClient(uri).get_metric_history(runs[0].info.run_id, "reward/workers")
    }
    # The resumed driver runs the steps after the interrupted one with the new worker count.
    assert workers[6] == 2 and workers[1] == 1
    assert all(workers[s] == 1 for s in range(1, stopped + 1))


@pytest.mark.slow
def test_overlap_and_dynamic_sampling_run_and_are_logged(run_args, tmp_path):
    """One-step off-policy overlap: step 1 learns on fresh samples, later steps on samples of
    the previous weights (staleness 1). Dynamic sampling logs the share of groups it dropped
    and how many prompts it drew; the learner still gets whole batches. The SFT term
    (grpo.sft_coef) gets its cold-start targets from the driver and logs their loss."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.grpo",
            "--config",
            "configs/tiny.yaml",
            *run_args,
            f"output_dir={tmp_path}",
            f"tracking.tracking_uri={uri}",
            "grpo.max_steps=3",
            "grpo.batch_size=2",
            "grpo.overlap=true",
            "grpo.tis_cap=2.0",
            "grpo.dynamic_sampling=true",
            "grpo.dynamic_sampling_rounds=1",
            "grpo.sft_coef=0.5",
            "grpo.from_base=true",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("medvol-r1-tiny").experiment_id])[0]

    def history(name):
        return {h.step: h.value for h in client.get_metric_history(run.info.run_id, name)}

    assert history("rollout/staleness") == {1: 0.0, 2: 1.0, 3: 1.0}
    shares = history("data/dropped_group_share")
    drawn = history("data/prompts_drawn")
    assert sorted(shares) == [1, 2, 3] and all(0.0 <= v <= 1.0 for v in shares.values())
    # two prompts a round, at most one extra round
    assert all(v in (2.0, 3.0, 4.0) for v in drawn.values()), drawn
    assert history("reward/timeouts") == {1: 0.0, 2: 0.0, 3: 0.0}
    sft_loss = history("learner/sft_loss")  # a random model on ~60-token targets: ~ln(vocab)
    assert sorted(sft_loss) == [1, 2, 3] and all(1.0 < v < 20.0 for v in sft_loss.values())
    assert (tmp_path / "grpo" / "adapter" / "adapter_config.json").exists()
    # Pushed adapters travel as bytes into the actors' own scratch folders (pruned there to
    # keep_adapters, tests/rollout/test_weight_sync.py): none is written under output_dir.
    assert not (tmp_path / "grpo" / "weights").exists()


@pytest.mark.slow
def test_a_closed_run_frees_its_placement_group_for_the_next_run(run_args, tmp_path):
    """Two runs one after the other in one Ray instance (a notebook, ``bench.overlap``): closing
    the first removes its placement group, so the second is placed instead of waiting for CPUs
    the first still holds."""
    import ray
    from ray.util import placement_group_table

    from cluster.trainer import GRPOTrainer

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        for i in range(2):
            cfg = load_run_config(
                "configs/tiny.yaml",
                [
                    *run_args,
                    f"output_dir={tmp_path / str(i)}",
                    f"tracking.tracking_uri={uri}",
                    "grpo.from_base=true",
                ],
            )
            trainer = GRPOTrainer(cfg)
            assert trainer.step()["reward/workers"] == 1
            group = trainer.placement_group.id.hex()
            trainer.close()
            assert placement_group_table()[group]["state"] == "REMOVED"
    finally:
        ray.shutdown()
