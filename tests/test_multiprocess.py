"""`accelerate launch` with 2 real CPU processes (gloo) against one process, same global batch.

Two processes x 1 micro-batch of 4 and one process x 2 accumulated micro-batches of 4 see the
same 8 samples per step, grouped into the same micro-batches (batching.StepBatches), so they
compute the same update: DDP averages the two micro-batches' gradients, (g0 + g1) / 2, where one
process accumulates g0 / 2 + g1 / 2; with two terms both are exact in floating point, so the
runs agree bit for bit on one CPU kernel set. Dropout is off (qformer_dropout: 0): each process draws its own dropout masks, one process draws one stream.
"""

import socket
import subprocess
import sys

import pytest
import torch

from finetune.config import load_config
from finetune.train import run
from finetune_fixtures import one_thread  # noqa: F401 (a fixture)
from finetune_fixtures import REPO, final_weights, subprocess_env, train_losses, write_config, write_word_dataset

STEPS = 12
# Measured here: 0.0 for both (bit-identical weights and losses after 12 AdamW steps, float32,
# one thread per process). The bounds allow for other kernels' summation orders (more than two
# processes, threads): 1e-6 is ~1e-4 of how far the weights move in these steps (~1e-2).
WEIGHT_TOLERANCE = 1e-6
LOSS_TOLERANCE = 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.usefixtures("one_thread")
def test_two_processes_match_one_process_with_accumulation(tiny_checkpoints, tmp_path):
    data = write_word_dataset(tmp_path / "data", own_instruction=False)
    config = write_config(
        tmp_path / "run.yaml", model=str(tiny_checkpoints("instructblip-opt")), train_data=[{"path": str(data), "task": "short_vqa"}],
        max_steps=STEPS, per_device_batch_size=4, lr=2e-3, warmup_steps=3, qformer_dropout=0.0, log_every=1,
        save_every=0, progress_bar=False, tensorboard=False, export=False,
    )  # fmt: skip
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "finetune.train", str(config), f"--output_dir={tmp_path / 'two'}",
    ]  # fmt: skip
    two = subprocess.Popen(launch, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run(load_config(config, [f"--output_dir={tmp_path / 'one'}", "--gradient_accumulation_steps=2"]))
    output = two.communicate(timeout=300)[0]
    assert two.returncode == 0, output[-4000:]
    assert "global batch 8 = 4 per process x 2 process(es) x 1 accumulation step(s)" in output

    one, two_ = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert one.keys() == two_.keys()
    weight_diff = max((one[k] - two_[k]).abs().max().item() for k in one)
    # Checkpoint names carry the training wrappers' prefix (`model.`, from LossOnly here).
    start = {f"model.{k}": w for k, w in final_weights_at_start(tiny_checkpoints).items()}
    assert one.keys() <= start.keys()
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    losses_one, losses_two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert list(losses_one) == list(losses_two) == list(range(1, STEPS + 1))
    loss_diff = max(abs(losses_one[s] - losses_two[s]) for s in losses_one)
    print(f"1 process x 2 accumulation vs 2 processes: max |weight diff| {weight_diff:.2e} (weights moved up to {moved:.2e}), "
          f"max |loss diff| {loss_diff:.2e}")  # fmt: skip
    assert weight_diff < WEIGHT_TOLERANCE < moved
    assert loss_diff < LOSS_TOLERANCE


def final_weights_at_start(tiny_checkpoints) -> dict[str, torch.Tensor]:
    from instructblip_core import load_pretrained

    return dict(load_pretrained(tiny_checkpoints("instructblip-opt")).model.state_dict())
