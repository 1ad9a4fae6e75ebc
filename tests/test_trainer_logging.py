"""The trainer's log when a model reports a value on some micro-batches only.

E.g. the grounding loss exists only for batches with regions. Each logged value must be the
mean over the micro-batches that reported it, in one process and across processes that do not
all report it in a window (they must agree on the keys, or the reduction would hang or mix them).
"""

import subprocess
import sys

import pytest

from finetune_fixtures import REPO, metrics, subprocess_env
from logged_keys_run import LOG_EVERY, STEPS, sevens_mean, step_batches, train
from test_multiprocess import free_port


def expected_sevens_log(num_processes: int) -> tuple[dict[int, float], set[str]]:
    """{logged step: mean of loss_sevens over the micro-batches that reported it}, and which
    situations the windows went through: "none" (no micro-batch reported it), "some" (some
    micro-batches did, others not), "one process" (one process reported it, the other not)."""
    streams = [step_batches(num_processes, rank).steps(0) for rank in range(num_processes)]
    expected, seen = {}, set()
    window: list[tuple[int, float | None]] = []  # (process, what its micro-batch reported)
    for step in range(1, STEPS + 1):
        for rank, stream in enumerate(streams):
            window += [(rank, sevens_mean(batch["x"])) for batch in next(stream)]
        if step % LOG_EVERY == 0:
            reported = [v for _, v in window if v is not None]
            if reported:
                expected[step] = sum(reported) / len(reported)
            if not reported:
                seen.add("none")
            elif len(reported) < len(window):
                seen.add("some")
            if num_processes > 1 and len({rank for rank, v in window if v is not None}) == 1:
                seen.add("one process")
            window = []
    return expected, seen


def logged_sevens(output_dir) -> dict[int, float]:
    return {m["step"]: m["train/loss_sevens"] for m in metrics(output_dir) if "train/loss_sevens" in m}


def test_a_value_reported_by_some_micro_batches_is_averaged_over_those(tmp_path):
    train(tmp_path / "run")
    expected, seen = expected_sevens_log(1)
    assert seen == {"none", "some"}, "the data must give windows where no / only some micro-batches report"
    every = {m["step"] for m in metrics(tmp_path / "run") if "train/loss" in m}
    assert every == set(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert logged_sevens(tmp_path / "run") == pytest.approx(expected, rel=1e-6)


def test_two_processes_agree_on_keys_only_one_of_them_reported(tmp_path):
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(REPO / "tests" / "logged_keys_run.py"), str(tmp_path / "run"),
    ]  # fmt: skip
    env = subprocess_env()
    env["PYTHONPATH"] = f"{REPO}:{REPO / 'tests'}"
    done = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    expected, seen = expected_sevens_log(2)
    assert "one process" in seen, "the data must give a window where only one process reports loss_sevens"
    assert logged_sevens(tmp_path / "run") == pytest.approx(expected, rel=1e-6)
