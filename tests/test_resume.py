"""Checkpoints: atomic, verified, pruned; and exact resume after SIGKILL (real subprocesses)."""

import io
import random
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState

from finetune.config import load_config
from finetune.train import prepare, run
from finetune_fixtures import one_thread  # noqa: F401 (a fixture)
from finetune_fixtures import REPO, final_weights, metrics, run_train, subprocess_env, train_command, write_config, write_word_dataset
from instructblip_core import checkpointing as ckpt

# ---- the checkpoints folder ---------------------------------------------------------------------


def save_fake(folder: ckpt.CheckpointFolder, step: int) -> None:
    folder.begin(step)
    folder.write(step, "trainable.safetensors", b"x" * step)
    folder.commit(step)


def test_keep_last_k_and_temporary_folders_are_never_checkpoints(tmp_path):
    folder = ckpt.CheckpointFolder(tmp_path / "checkpoints")
    for step in (2, 4, 6, 8):
        save_fake(folder, step)
        folder.prune(keep_last=2)
    assert folder.steps() == [6, 8]
    folder.begin(10)  # a save that never finished (the process died here)
    folder.write(10, "trainable.safetensors", b"half")
    assert folder.steps() == [6, 8] and folder.latest().name == "step-00000008"
    save_fake(folder, 12)  # the next save clears the leftover
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert folder.steps() == [6, 8, 12]


def test_a_corrupt_checkpoint_is_an_error_naming_the_file(tmp_path):
    folder = ckpt.CheckpointFolder(tmp_path)
    save_fake(folder, 3)
    ckpt.verify(folder.final(3))
    (folder.final(3) / "trainable.safetensors").write_bytes(b"xx")  # truncated by a disk problem
    with pytest.raises(ckpt.ResumeError, match=r"step-00000003/trainable.safetensors does not match .*manifest.json \(corrupt\)"):
        ckpt.verify(folder.final(3))
    (folder.final(3) / "manifest.json").unlink()
    with pytest.raises(ckpt.ResumeError, match="has no manifest.json; it is not a complete checkpoint"):
        ckpt.verify(folder.final(3))


def test_rng_state_round_trip():
    saved = torch.load(io.BytesIO(ckpt.object_to_bytes(ckpt.capture_rng_state())), weights_only=True)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.restore_rng_state(saved)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == got[:2] and torch.equal(expected[2], got[2])


# ---- resume after SIGKILL -----------------------------------------------------------------------

MAX_STEPS = 36


def resume_config(tmp_path, checkpoint, data, name):
    # Dropout stays on (the checkpoint's 0.1) and images are randomly cropped, so an exact
    # match needs the RNG states and the data position restored, not just the weights.
    return write_config(
        tmp_path / f"{name}.yaml", model=str(checkpoint), output_dir=str(tmp_path / name),
        train_data=[{"path": str(data), "task": "short_vqa"}], max_steps=MAX_STEPS, per_device_batch_size=4,
        gradient_accumulation_steps=2, lr=2e-3, warmup_steps=4, save_every=3, keep_last=2, log_every=1,
        augment=True, progress_bar=False, tensorboard=True, export=False,
    )  # fmt: skip


def start(config):
    return subprocess.Popen(train_command(config), cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_mid_run(proc, checkpoints) -> str:
    """SIGKILL once one checkpoint is complete, preferably while the next is being written (a
    `.tmp-*` folder present): the worst moment for a checkpoint to be half-written."""
    folder = ckpt.CheckpointFolder(checkpoints)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training ended before it could be killed:\n{proc.stdout.read()[-3000:]}")
        steps = folder.steps()
        saving = checkpoints.is_dir() and any(p.name.startswith(".tmp-") for p in checkpoints.iterdir())
        if steps and (saving or steps[-1] >= 4 * 3):  # caught a save in progress, or gave up waiting for one
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return "during a save" if saving else "between saves"
        time.sleep(0.001)
    proc.kill()
    pytest.fail("no checkpoint appeared in time")


def check_every_checkpoint_loads(checkpoints) -> list[int]:
    folder = ckpt.CheckpointFolder(checkpoints)
    for step in folder.steps():
        path = folder.final(step)
        ckpt.verify(path)
        assert ckpt.read_tensors(path) and ckpt.read_object(path, ckpt.OPTIMIZER)["state"]
        assert ckpt.read_object(path, ckpt.TRAINER_STATE)["step"] == step
        ckpt.read_object(path, ckpt.rng_file(0))
    return folder.steps()


@pytest.mark.usefixtures("one_thread")
def test_sigkilled_run_resumes_to_identical_weights(tiny_checkpoints, tmp_path):
    checkpoint = tiny_checkpoints("instructblip-opt")
    data = write_word_dataset(tmp_path / "data", own_instruction=False)
    config = resume_config(tmp_path, checkpoint, data, "killed")
    checkpoints = tmp_path / "killed" / "checkpoints"
    proc = start(config)
    # The uninterrupted reference runs here while the subprocess starts up; one thread, as there.
    run(load_config(resume_config(tmp_path, checkpoint, data, "uninterrupted"), ["--tensorboard=false"]))
    moment = kill_mid_run(proc, checkpoints)
    complete = check_every_checkpoint_loads(checkpoints)
    assert complete and complete[-1] < MAX_STEPS
    print(f"killed {moment}; complete checkpoints then: {complete}")

    finished = run_train(config)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"resumed from {checkpoints}/step-{complete[-1]:08d} at step {complete[-1]}" in finished.stdout

    ours, theirs = final_weights(tmp_path / "killed"), final_weights(tmp_path / "uninterrupted")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), f"{name} differs after resume"
    optimizer = [torch.load(p / "checkpoints" / f"step-{MAX_STEPS:08d}" / ckpt.OPTIMIZER, weights_only=True) for p in (tmp_path / "killed", tmp_path / "uninterrupted")]
    for a, b in zip(optimizer[0]["state"].values(), optimizer[1]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    # The metrics log has each step once, with the same losses as the uninterrupted run.
    losses = [[(m["step"], m["train/loss"]) for m in metrics(tmp_path / run) if "train/loss" in m] for run in ("killed", "uninterrupted")]
    assert losses[0] == losses[1] and [s for s, _ in losses[0]] == list(range(1, MAX_STEPS + 1))
    assert not list(checkpoints.glob(".tmp-*")) and len(ckpt.CheckpointFolder(checkpoints).steps()) == 2  # keep_last


@pytest.mark.usefixtures("one_thread")
def test_resuming_with_another_batch_layout_is_refused(tiny_checkpoints, tmp_path):
    data = write_word_dataset(tmp_path / "data")
    config = resume_config(tmp_path, tiny_checkpoints("instructblip-opt"), data, "run")
    prepare(load_config(config, ["--max_steps=3", "--tensorboard=false"])).trainer.train()
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ckpt.ResumeError, match=r"step-00000003: cannot resume exactly: the checkpoint used global_batch_size=8, this run 4"):
        prepare(load_config(config, ["--max_steps=6", "--gradient_accumulation_steps=1"])).trainer.train()
