"""Worker of tests/lafs/test_train_distributed.py: run lafs.train stages as N gloo processes, as torchrun would.

:func:`run_processes` starts ``world`` CPU processes with torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT); each runs the same list of jobs through
``lafs.train.runner.run_command`` one after the other, so the process start-up is paid once.
A job is ``(command, out_dir, overrides, resume, patches)``; ``patches`` name functions of
:data:`PATCHES` applied before the job (and undone after it), in the processes or in the
caller (``run_jobs`` with ``world=1`` runs in the calling process).
"""

from __future__ import annotations

import faulthandler
import os
import socket
import time
from contextlib import ExitStack, contextmanager

import torch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def deterministic_views():
    """Pretraining views that depend on each image alone (the builder's random draws depend on the
    process's whole batch): global views = the image and its mirror with every landmark in order,
    local views = the image with its first ``local_tokens`` landmarks."""
    from lafs.ssl.views import MultiViewBuilder, ViewGroup

    def forward(self, images, generator=None):
        tokens = []
        for view in (images, images.flip(3)):
            landmarks = self.landmark_cnn(view.contiguous(memory_format=torch.channels_last))
            tokens.append(self._gather(view, landmarks, None, 0.0, None, view.shape[0]))
        rows, count = images.shape[0], tokens[0].shape[1]
        groups = [ViewGroup(torch.cat(tokens), torch.arange(count).expand(2 * rows, count))]
        if self.local_views:
            keep = self.local_tokens
            local = tokens[0][:, :keep].repeat(self.local_views, 1, 1)
            groups.append(ViewGroup(local, torch.arange(keep).expand(self.local_views * rows, keep)))
        return groups

    return _patched(MultiViewBuilder, "forward", forward)


def interleaved_mixup_partner(world: int):
    """One process with batch N*b mixes each image with the partner it has under N processes.

    The DistributedSampler gives process r the images at positions r, r + N, r + 2N, ... of the
    global batch; each process mixes its batch with its reversal."""
    from lafs.train.finetune import FinetuneStage

    def partner(self, batch):
        local = batch // world
        position = torch.arange(batch)
        return (local - 1 - position // world) * world + position % world

    return _patched(FinetuneStage, "mixup_partner", partner)


def dump_replicas(out):
    """After the stage, every process writes what it holds of the model to ``out/replica-rank<r>.pt``
    (a checkpoint holds the main process's only): replicas must stay identical."""
    from lafs.train import stage_run

    real = stage_run.run_stage

    def run_stage(stage, *, resume=False):
        summary = real(stage, resume=resume)
        if hasattr(stage, "trainer"):
            held = {
                "student": stage.trainer.student.state_dict(),
                "teacher": stage.trainer.teacher.state_dict(),
                "center": stage.trainer.loss.center,
            }
        else:
            held = {"model": stage.model.state_dict()}
        torch.save(held, f"{out}/replica-rank{stage.dist.rank}.pt")
        return summary

    return _patched(stage_run, "run_stage", run_stage)


def record_streams(out):
    """Right after ``--resume``, every process writes its random streams (global torch RNG, the stage's own)
    to ``out/streams-rank<r>.pt``."""
    from lafs.train import checkpoints

    real = checkpoints.resume

    def resume(stage):
        result = real(stage)
        streams = {"torch": torch.get_rng_state(), "stage": stage.process_state()}
        torch.save(streams, f"{out}/streams-rank{stage.dist.rank}.pt")
        return result

    return _patched(checkpoints, "resume", resume)


def fail_resume_on(rank: int):
    """``--resume`` fails on process ``rank`` alone (as when only its shard file is damaged)."""
    from lafs.train import checkpoints

    real = checkpoints.resume

    def resume(stage):
        if stage.dist.rank == rank:
            raise checkpoints.ResumeError(f"--resume: injected failure on process {rank}")
        return real(stage)

    return _patched(checkpoints, "resume", resume)


def record_errors(out):
    """Every process writes the error its stage ends with to ``out/error-rank<r>.txt`` (then re-raises)."""
    from lafs.train import stage_run

    real = stage_run.run_stage

    def run_stage(stage, *, resume=False):
        try:
            return real(stage, resume=resume)
        except Exception as exc:
            with open(f"{out}/error-rank{stage.dist.rank}.txt", "w") as f:
                f.write(f"{type(exc).__name__}: {exc}")
            raise

    return _patched(stage_run, "run_stage", run_stage)


PATCHES = {
    "fail_resume_on": fail_resume_on,
    "record_errors": record_errors,
    "record_streams": record_streams,
    "deterministic_views": deterministic_views,
    "interleaved_mixup_partner": interleaved_mixup_partner,
    "dump_replicas": dump_replicas,
}


def run_jobs(jobs) -> list:
    from lafs.train.runner import run_command

    summaries = []
    for command, out, overrides, resume, patches in jobs:
        with ExitStack() as stack:
            for name, *args in patches:
                stack.enter_context(PATCHES[name](*args))
            summaries.append(run_command(command, recipe="tiny", overrides=list(overrides), out=out, resume=resume))
    return summaries


def _process(rank, world, port, jobs):
    faulthandler.enable()  # Python stacks on stderr if gloo aborts the process
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
    )
    torch.set_num_threads(1)
    from lafs.train.distributed import shutdown

    finished = False
    try:
        run_jobs(jobs)
        finished = True
    finally:
        shutdown(finished)


def run_processes(world: int, jobs, timeout: float = 300.0) -> None:
    """Run ``jobs`` in ``world`` gloo processes; raise if one fails or all have not finished in ``timeout`` s."""
    import torch.multiprocessing as mp

    context = mp.start_processes(
        _process, args=(world, free_port(), jobs), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"{world} processes did not finish {len(jobs)} job(s) in {timeout:.0f} s (a hang?)")
