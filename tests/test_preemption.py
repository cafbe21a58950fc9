"""Preemption and crashes on a pod's road: webdataset shards and the workdir in a bucket (the
Cloud Storage emulator), SIGKILL mid-run on one process and SIGTERM to one of two, and the resumed
run equal bit for bit to an uninterrupted one."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from sdjax import paths
from sdjax.cli.train import PREEMPTED_EXIT
from sdjax.stable_diffusion import StableDiffusion
from sdjax.training import preemption
from tests.helpers import ROOT, free_port, logs_tail, saved_state, subprocess_env, write_webdataset


def _shards(gcs, tmp_path, bucket: str, count: int) -> str:
    """``count`` shards (the first with bad samples, the last truncated) uploaded to a new bucket."""
    root = gcs.bucket(bucket)
    for p in write_webdataset(tmp_path / "wds", count, 8):
        paths.upload(str(p), f"{root}/laion/{p.name}")
    return root


def _cmd(root: str, run: str, steps: int, shards: int, *extra: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "train", "latent.py"), "--config", "tiny",
            "--workdir", f"{root}/{run}", "--export", f"{root}/{run}/export", "--config.data.name=webdataset",
            f"--config.data.files={root}/laion/{{00000..{shards - 1:05d}}}.tar", "--config.data.shuffle_buffer=8",
            f"--config.train.steps={steps}", "--config.train.checkpoint_every=4", "--config.train.sample_every=0",
            "--config.train.log_every=1", "--config.train.fast_compile=True", "--config.train.caption_dropout=0.5",
            *extra]


def _env(gcs, tmp_path, devices: int, **extra: str) -> dict[str, str]:
    return subprocess_env(devices, PYTHONPATH=str(ROOT), SDJAX_CACHE=str(tmp_path / "cache"), **gcs.env, **extra)


def _wait_for(log_path, pattern: str, procs, timeout: float = 600) -> re.Match:
    deadline = time.time() + timeout
    while True:
        text = log_path.read_text() if log_path.exists() else ""
        if m := re.search(pattern, text):
            return m
        assert all(p.poll() is None for p in procs) and time.time() < deadline, f"no {pattern!r}:\n{text[-3000:]}"
        time.sleep(0.05)


def _assert_same_run(root: str, got: str, want: str, steps: int) -> None:
    a, b = (saved_state(f"{root}/{run}/checkpoints/{steps}") for run in (got, want))
    assert a.keys() == b.keys()
    for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    exported = [StableDiffusion.from_pretrained(f"{root}/{run}/export").params for run in (got, want)]
    for (k, x), y in zip(jax.tree_util.tree_flatten_with_path(exported[0])[0], jax.tree.leaves(exported[1])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(k))


@pytest.mark.slow
def test_one_process_killed_in_a_bucket_resumes_bitwise(gcs, tmp_path, monkeypatch):
    """SIGKILL (a crash) to one process training from shards in a bucket, in three aspect-ratio
    buckets, with its workdir there: the same command resumes from the last checkpoint, and the end
    equals an uninterrupted run's state and export bit for bit. (SIGTERM, a preemption: the
    two-process test below.)"""
    monkeypatch.setenv("SDJAX_CACHE", str(tmp_path / "cache"))
    root, steps = _shards(gcs, tmp_path, "one", 3), 10
    env = _env(gcs, tmp_path, 2)
    logs = {name: tmp_path / f"{name}.log" for name in ("straight", "killed", "finished")}

    def start(run: str, log: str) -> subprocess.Popen:
        # Three aspect-ratio buckets for the shards' 32x32, 32x48 and 48x32 images; the log names each compile.
        cmd = _cmd(root, run, steps, 3, "--config.train.batch_size=4", "--config.data.buckets=32x32,24x40,40x24")
        with open(logs[log], "w") as f:
            return subprocess.Popen(cmd, env=dict(env, JAX_LOG_COMPILES="1"), stdout=f, stderr=subprocess.STDOUT)

    runs = [start("straight", "straight")]
    try:
        # The victim starts once the straight run has compiled its steps, so it finds them in the
        # persistent compilation cache (as every later start does) instead of compiling them again.
        _wait_for(logs["straight"], r"compiled the step for 3 buckets", runs)
        runs.append(start("victim", "killed"))
        deadline = time.time() + 600
        while not paths.exists(f"{root}/victim/checkpoints/4/commit_success.txt"):
            assert runs[1].poll() is None and time.time() < deadline, logs["killed"].read_text()[-3000:]
            time.sleep(0.1)
        runs[1].send_signal(signal.SIGKILL)
        runs[1].wait(timeout=60)
        assert not paths.exists(f"{root}/victim/checkpoints/{steps}"), "the run ended before it was killed"
        finished = start("victim", "finished")
        assert finished.wait(timeout=600) == 0, logs["finished"].read_text()[-3000:]
        resumed_at = int(re.search(r"resumed from step (\d+)", logs["finished"].read_text()).group(1))
        assert 4 <= resumed_at < steps
        assert runs[0].wait(timeout=600) == 0, logs["straight"].read_text()[-3000:]
    finally:
        for p in runs:
            p.kill()
    straight = logs["straight"].read_text()
    assert "skipped 00002.tar:?: truncated or corrupt shard" in straight
    # One compiled step per bucket: the batches of all three shapes went through it.
    compiles = re.findall(r"Compiling jit\(step_on_mesh\).*?float32\[4,(\d+),(\d+),3\]", straight)
    assert sorted(compiles) == [("24", "40"), ("32", "32"), ("40", "24")], compiles
    _assert_same_run(root, "victim", "straight", steps)


@pytest.mark.slow
def test_two_processes_sigterm_to_one_both_save_one_step_and_resume_bitwise(gcs, tmp_path, monkeypatch):
    """The README's pod command on two processes (each reading its own shards from the bucket):
    SIGTERM to process 1 only; both save the same step and exit; the same command resumes there, and
    the result equals an uninterrupted two-process run's state and export bit for bit."""
    monkeypatch.setenv("SDJAX_CACHE", str(tmp_path / "cache"))
    root, steps = _shards(gcs, tmp_path, "pod", 4), 8

    def pod(run: str, name: str, sigterm_to: int | None = None) -> tuple[list[int], list[str]]:
        port, logs = free_port(), [tmp_path / f"{name}{i}.log" for i in range(2)]
        files = [open(log, "w") for log in logs]
        procs = [subprocess.Popen(_cmd(root, run, steps, 4, "--config.train.batch_size=8", "--config.mesh.shape=(4,1)"),
                                  stdout=files[i], stderr=subprocess.STDOUT,
                                  env=_env(gcs, tmp_path, 2, SDJAX_COORDINATOR=f"localhost:{port}",
                                           SDJAX_NUM_PROCESSES="2", SDJAX_PROCESS_ID=str(i))) for i in range(2)]
        try:
            if sigterm_to is not None:
                _wait_for(logs[0], r"step 1/", procs)
                procs[sigterm_to].send_signal(signal.SIGTERM)
            codes = [p.wait(timeout=600) for p in procs]
        finally:
            for p, f in zip(procs, files):
                p.kill()
                f.close()
        return codes, [log.read_text() for log in logs]

    codes, logs = pod("victim", "preempted", sigterm_to=1)
    assert codes == [PREEMPTED_EXIT] * 2, logs_tail(logs)
    saved = {int(re.search(r"preempted at step (\d+): saved", log).group(1)) for log in logs}
    assert len(saved) == 1 and 1 <= min(saved) < steps, saved
    codes, logs = pod("victim", "resumed")
    assert codes == [0, 0] and f"resumed from step {saved.pop()}" in logs[0], logs_tail(logs)
    codes, logs = pod("straight", "straight")
    assert codes == [0, 0], logs_tail(logs)
    _assert_same_run(root, "victim", "straight", steps)


def test_sigterm_is_caught_at_the_next_step_and_the_old_handler_restored():
    before = signal.getsignal(signal.SIGTERM)
    with preemption.Watch() as watch:
        assert not watch.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert watch.reached(2)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_watch_in_another_thread_installs_nothing():
    seen = []

    def run():
        with preemption.Watch() as watch:
            seen.append(watch.reached(1))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == [False]
