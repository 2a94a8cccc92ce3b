"""A job killed at any moment comes back exactly: kill -9 at several moments of both stages,
SIGTERM, a full disk, NaN weights, a corrupted checkpoint (distill/checkpointing.py,
distill/preemption.py). The interrupted jobs are real `python -m distill.train` processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from distill.checkpointing import LAST, OLD, PARTIAL, find_last, replace_atomically
from distill.checkpoints import CheckpointError, read_checkpoint
from distill.preemption import resume_path
from distill.train import train
from tests.distill.helpers import compose_train, job_overrides, run_job

STEPS, EVERY = 8, 3  # steps per stage, checkpoint interval (job_overrides)


def interrupt(stage: str, step: int, moment: str, sig: str = "SIGKILL", note: Path | None = None) -> list[str]:
    return ["+callbacks.interrupt._target_=tests.distill.interrupts.Interrupt", f"+callbacks.interrupt.stage={stage}",
            f"+callbacks.interrupt.step={step}", f"+callbacks.interrupt.moment={moment}",
            f"+callbacks.interrupt.signal={sig}", f"+callbacks.interrupt.note={note or 'null'}"]


def record(path: Path) -> dict:
    ckpt = read_checkpoint(path, weights=False)
    return {"stage": ckpt["distill"]["stage_name"], "step": ckpt["global_step"],
            "finished": [s["name"] for s in ckpt["distill"]["finished_stages"]]}


# (stage, global step, moment, signal): the job is interrupted there, then resumed with ckpt_path=last,
# and the resumed job is interrupted at the next moment. Progress at each moment is (stage, step);
# a stage's start counts as the end of the stage before.
CHAIN = [
    ("align", 4, "step", "SIGKILL"),   # mid-step, between backward and optimizer step
    ("align", 6, "write", "SIGKILL"),  # while last.ckpt of step 6 is being written
    ("kl", 0, "start", "SIGKILL"),     # right after the align stage's end record
    ("kl", 4, "step", "SIGTERM"),      # polite: saves at the end of that step
    ("kl", 7, "step", "SIGKILL"),      # in the last interval of the last stage
]


@pytest.fixture(scope="module")
def chain(stdlib_teacher, corpus, tmp_path_factory):
    """The CHAIN of interruptions of one run dir, then its last resume; and an uninterrupted run."""
    root = tmp_path_factory.mktemp("chain")
    overrides = job_overrides(stdlib_teacher, corpus, root / "cache")
    reference = train(compose_train(overrides, root / "reference", root / "cache"))
    run, checkpoints, seen = root / "run", root / "run" / "checkpoints", []
    for i, (stage, step, moment, sig) in enumerate(CHAIN):
        note = root / f"note{i}.json"
        result = run_job(run, overrides + interrupt(stage, step, moment, sig, note) + (["ckpt_path=last"] if i else []))
        exited = time.time()
        assert note.is_file(), f"interruption {i} never happened:\n{result.stderr[-3000:]}"
        seen.append({"returncode": result.returncode, "stderr": result.stderr, "exited": exited,
                     "note": json.loads(note.read_text()), "last": record(find_last(checkpoints)),
                     "partials": sorted(p.name for p in checkpoints.glob(f"*{PARTIAL}*"))})
    final = run_job(run, overrides + ["ckpt_path=last"])
    assert final.returncode == 0, final.stderr[-3000:]
    return {"reference": reference, "seen": seen, "run": run,
            "resumed": json.loads((run / "summary.json").read_text())}


def test_every_interruption_loses_at_most_one_checkpoint_interval(chain):
    for (stage, step, moment, sig), seen in zip(CHAIN, chain["seen"]):
        last = seen["last"]
        if moment == "start":  # the previous stage has ended: its record is the checkpoint
            assert last["stage"] != stage and last["stage"] in last["finished"], (stage, last)
            continue
        assert last["stage"] == stage and last["stage"] not in last["finished"], (stage, last)
        assert step - EVERY <= last["step"] <= step + 1, (stage, step, moment, last)
        if sig == "SIGKILL":
            assert seen["returncode"] == -signal.SIGKILL


def test_sigterm_saves_at_the_end_of_its_step_and_exits_promptly(chain):
    (seen,) = [s for (*_, sig), s in zip(CHAIN, chain["seen"]) if sig == "SIGTERM"]
    assert seen["returncode"] == 128 + signal.SIGTERM, seen["stderr"][-2000:]
    assert seen["last"]["step"] == seen["note"]["step"] + 1  # the step it arrived in, and no further
    assert seen["exited"] - seen["note"]["time"] < 15.0  # ~2 s on an idle 2-core machine
    assert "Traceback" not in seen["stderr"]


def test_a_kill_mid_write_leaves_the_previous_checkpoint_and_a_partial_that_is_cleaned_up(chain):
    i = [moment for _, _, moment, _ in CHAIN].index("write")
    during, after = chain["seen"][i], chain["seen"][i + 1]
    assert len(during["partials"]) == 1 and during["partials"][0].startswith(f"{LAST}{PARTIAL}-")
    assert during["last"]["step"] == CHAIN[i][1] - EVERY  # the checkpoint before the one being written
    assert after["partials"] == []  # the next writer removed it
    assert not list((chain["run"] / "checkpoints").glob(f"*{PARTIAL}*"))


def test_resumed_after_every_interruption_ends_like_an_uninterrupted_run(chain):
    reference, resumed = chain["reference"], chain["resumed"]
    for a, b in zip(reference["stages"], resumed["stages"], strict=True):
        assert (a["name"], a["steps"], a["tokens"]) == (b["name"], b["steps"], b["tokens"])
        assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-5)
    assert resumed["kl"] == pytest.approx(reference["kl"], rel=1e-5)
    assert resumed["student_ppl"] == pytest.approx(reference["student_ppl"], rel=1e-6)


def test_stage_end_records_hold_weights_only_and_last_ckpt_is_the_final_one(chain):
    checkpoints = chain["run"] / "checkpoints"
    ends = [checkpoints / "stage0-align.ckpt", checkpoints / "stage1-kl.ckpt"]
    for end in ends:
        ckpt = torch.load(end, weights_only=False)
        assert "optimizer_states" not in ckpt and "lr_schedulers" not in ckpt and ckpt["state_dict"]
        assert ckpt["global_step"] == STEPS
    assert os.path.samefile(checkpoints / LAST, ends[-1])  # a hard link, not a second copy
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted([LAST, *(e.name for e in ends)])


def test_gpu_preset_checkpointing_async_and_by_time_resumes_exactly_on_cpu(chain, stdlib_teacher, corpus,
                                                                           tmp_path):
    """trainer=gpu and callbacks=gpu (asynchronous writes, a time interval: here 0 s, every step) on the
    CPU: SIGTERM in the kl stage waits for the write of its step, and the resumed run ends like the
    uninterrupted one."""
    overrides = job_overrides(stdlib_teacher, corpus, tmp_path / "cache") + [
        "trainer=gpu", "callbacks=gpu", "trainer.accelerator=cpu",
        "callbacks.model_checkpoint.train_time_interval.minutes=0"]
    overrides.remove(f"callbacks.model_checkpoint.every_n_train_steps={EVERY}")
    with pytest.raises(SystemExit) as stopped:
        train(compose_train(overrides + interrupt("kl", 4, "step", "SIGTERM"), tmp_path / "run", tmp_path / "cache"))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert record(tmp_path / "run" / "checkpoints" / LAST) == {"stage": "kl", "step": 5, "finished": ["align"]}
    resumed = train(compose_train(overrides + ["ckpt_path=last"], tmp_path / "run", tmp_path / "cache"))
    for a, b in zip(chain["reference"]["stages"], resumed["stages"], strict=True):
        assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-5)


@pytest.mark.slow
def test_sigterm_to_rank_zero_of_two_ddp_processes_stops_both_at_one_step_and_resumes_exactly(
        stdlib_teacher, corpus, tmp_path):
    """trainer.devices=2 strategy=ddp (gloo): only rank 0 gets SIGTERM, both ranks agree at the step
    boundary, the checkpoint of that step is written, the job exits (no rank left waiting), and the
    resumed two-process run ends like an uninterrupted one."""
    overrides = job_overrides(stdlib_teacher, corpus, tmp_path / "cache", steps=4, every=2) + [
        "trainer.devices=2", "strategy=ddp"]
    full = run_job(tmp_path / "full", overrides)
    assert full.returncode == 0, full.stderr[-3000:]
    run = tmp_path / "run"
    stopped = run_job(run, overrides + interrupt("kl", 1, "step", "SIGTERM") + ["+callbacks.interrupt.rank=0"])
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert record(run / "checkpoints" / LAST) == {"stage": "kl", "step": 2, "finished": ["align"]}
    resumed = run_job(run, overrides + ["ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "full", run))
    for x, y in zip(a["stages"], b["stages"], strict=True):
        assert (x["name"], x["steps"], x["tokens"]) == (y["name"], y["steps"], y["tokens"])
        assert y["final_loss"] == pytest.approx(x["final_loss"], rel=1e-5)


# ----- single failures ------------------------------------------------------------------------

def test_disk_full_while_saving_is_one_clear_error_and_the_previous_checkpoint_loads(stdlib_teacher, corpus,
                                                                                     tmp_path):
    """checkpoints/ on a tmpfs with room for one full checkpoint, not for its replacement beside it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a disk that fills up) needs root")
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(checkpoints)], check=True)
    try:
        with pytest.raises(CheckpointError) as info:
            overrides = job_overrides(stdlib_teacher, corpus, tmp_path / "cache")
            train(compose_train(overrides, tmp_path / "run", tmp_path / "cache"))
        message = str(info.value)
        assert "No space left on device" in message and "the previous last.ckpt is left as it was" in message
        assert "\n" not in message
        assert record(checkpoints / LAST) == {"stage": "align", "step": EVERY, "finished": []}
        assert read_checkpoint(checkpoints / LAST)["state_dict"]  # the weights load too
        assert sorted(p.name for p in checkpoints.iterdir()) == [LAST]
    finally:
        subprocess.run(["umount", str(checkpoints)], check=True)


def test_nan_weights_never_replace_the_last_good_checkpoint(stdlib_teacher, corpus, tmp_path):
    """A weight turns NaN in the kl stage's third step: that step's checkpoint is refused with the
    NaN/inf error, and last.ckpt stays the one of the step before."""
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)]
    overrides = job_overrides(stdlib_teacher, corpus, tmp_path / "cache") + [
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "+callbacks.poison._target_=tests.distill.interrupts.PoisonWeights",
        "+callbacks.poison.stage=kl", "+callbacks.poison.step=3"]
    with pytest.raises(FloatingPointError, match=r"stage 'kl': the student's weights hold NaN/inf after step 3"):
        train(compose_train(overrides, tmp_path / "run", tmp_path / "cache"))
    last = tmp_path / "run" / "checkpoints" / LAST
    assert record(last) == {"stage": "kl", "step": 2, "finished": ["align"]}
    assert all(torch.isfinite(w).all() for w in read_checkpoint(last)["state_dict"].values())
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)] == handlers


def test_corrupted_last_checkpoint_on_resume_is_one_line(stdlib_teacher, corpus, tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "distill": {}}, checkpoints / LAST)
    data = (checkpoints / LAST).read_bytes()
    (checkpoints / LAST).write_bytes(data[: len(data) // 2])
    result = run_job(tmp_path / "run", job_overrides(stdlib_teacher, corpus, tmp_path / "cache") + ["ckpt_path=last"])
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "truncated or corrupted" in errors[0] and str(checkpoints / LAST) in errors[0]
    assert "Traceback" not in result.stderr + result.stdout


# ----- the rules, without training ------------------------------------------------------------

def _fake_checkpoint(path: Path, step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "distill": {"stage_name": "align"}, "global_step": step}, path)


def test_resume_path_rules(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert resume_path(None, run) is None and resume_path("auto", run) is None
    with pytest.raises(FileNotFoundError, match="ckpt_path=last: no checkpoint at .*last.ckpt"):
        resume_path("last", run)
    with pytest.raises(FileNotFoundError, match="'/no/such.ckpt'"):
        resume_path("/no/such.ckpt", run)
    given = tmp_path / "elsewhere.ckpt"
    _fake_checkpoint(given, 1)
    _fake_checkpoint(run / "checkpoints" / LAST, 5)
    assert resume_path(None, run) is None  # a fresh start unless asked
    assert resume_path("auto", run) == resume_path("last", run) == run / "checkpoints" / LAST
    assert resume_path(str(given), run) == given
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeued job continues from its own run dir
    assert resume_path(None, run) == resume_path(str(given), run) == run / "checkpoints" / LAST


def test_directory_checkpoints_are_swapped_so_one_whole_copy_always_exists(tmp_path):
    """DeepSpeed-style directories: a swap cut between its two renames leaves last.ckpt.old,
    which is what find_last resumes from; a finished swap leaves only the new directory."""
    last, new = tmp_path / LAST, tmp_path / f"{LAST}{PARTIAL}"
    for directory, step in ((last, 1), (new, 2)):
        _fake_checkpoint(directory / "checkpoint" / "model.pt", step)
    os.rename(last, tmp_path / (LAST + OLD))  # the swap's first rename, then a kill
    assert find_last(tmp_path) == tmp_path / (LAST + OLD)
    replace_atomically(new, last)  # the resumed run's next save: .old stays until the new one is in
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST] and find_last(tmp_path) == last
    assert torch.load(last / "checkpoint" / "model.pt")["global_step"] == 2
    file = tmp_path / f"record{PARTIAL}-1"  # a stage-end record (a file) replaces a directory too
    _fake_checkpoint(file, 3)
    replace_atomically(file, last)
    assert last.is_file() and torch.load(last)["global_step"] == 3


@pytest.mark.parametrize("start", ["last", "old"])  # a plain swap; the first swap after resuming from .old
def test_a_swap_killed_between_any_two_renames_leaves_a_whole_checkpoint(tmp_path, monkeypatch, start):
    import distill.checkpointing as checkpointing

    real_rename = os.rename
    for cut in (0, 1, 2):  # renames done before the kill (a swap makes at most two)
        root = tmp_path / str(cut)
        _fake_checkpoint(root / (LAST if start == "last" else LAST + OLD) / "checkpoint" / "model.pt", 1)
        _fake_checkpoint(root / f"{LAST}{PARTIAL}" / "checkpoint" / "model.pt", 2)
        done = []

        def rename(src, dst, done=done, cut=cut):
            if len(done) == cut:
                raise KeyboardInterrupt("killed")
            real_rename(src, dst)
            done.append(dst)

        monkeypatch.setattr(checkpointing.os, "rename", rename)
        try:
            replace_atomically(root / f"{LAST}{PARTIAL}", root / LAST)
        except KeyboardInterrupt:
            pass
        monkeypatch.undo()
        found = find_last(root)
        assert found is not None, (start, cut, sorted(p.name for p in root.iterdir()))
        assert torch.load(found / "checkpoint" / "model.pt")["global_step"] == (2 if found.name == LAST and done else 1)


# ----- DeepSpeed: directories written by every rank -------------------------------------------

class _Ranks:
    """The two members of a Lightning strategy that a collective save uses, over torch.distributed."""

    @property
    def is_global_zero(self) -> bool:
        return torch.distributed.get_rank() == 0

    def barrier(self, name: str | None = None) -> None:
        torch.distributed.barrier()


def _save_zero_twice(rank: int, world_size: int, port: int, out: str) -> None:
    """Two ZeRO-2 steps, each saved collectively as last.ckpt (the swap LastCheckpoint makes), then
    the stage-end record consolidated from a collective save; rank 0 keeps the weights to compare."""
    import deepspeed

    from distill.checkpointing import write_atomically, write_weights_record, written_by_all_ranks
    from tests.distill.test_checkpoints import tiny_module

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    module = tiny_module()
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(), config=config)
    last, ranks = Path(out) / LAST, _Ranks()
    for step in (1, 2):
        engine.backward(engine.module.student(torch.randint(0, 96, (1, 12))).last_hidden.square().mean())
        engine.step()
        with written_by_all_ranks(last, ranks) as partial:
            engine.save_checkpoint(str(partial), client_state={"distill": {"stage_name": "kl"}, "global_step": step},
                                   tag="checkpoint")
        if rank == 0:
            replace_atomically(partial, last)
        torch.distributed.barrier()
    if rank == 0:
        write_weights_record(read_checkpoint(last), Path(out) / "stage0-kl.ckpt")
        state = {k: v.detach().clone().float() for k, v in engine.module.state_dict().items()}
        write_atomically(Path(out) / "reference.pt", lambda file: torch.save(state, file))


@pytest.mark.slow
def test_zero_checkpoints_swap_as_whole_directories_and_consolidate_into_a_weights_record(tmp_path):
    import torch.multiprocessing as mp

    from tests.distill.test_checkpoints import _free_port

    mp.spawn(_save_zero_twice, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST, "reference.pt", "stage0-kl.ckpt"]
    reference = torch.load(tmp_path / "reference.pt")
    for source in (tmp_path / LAST, tmp_path / "stage0-kl.ckpt"):  # a ZeRO directory, then a plain file
        checkpoint = read_checkpoint(source)
        assert checkpoint["global_step"] == 2 and checkpoint["distill"] == {"stage_name": "kl"}
        assert set(checkpoint["state_dict"]) == set(reference)
        for key, value in reference.items():
            torch.testing.assert_close(checkpoint["state_dict"][key], value, rtol=0, atol=0, msg=key)
    assert (tmp_path / LAST).is_dir() and (tmp_path / "stage0-kl.ckpt").is_file()
    assert "optimizer_states" not in torch.load(tmp_path / "stage0-kl.ckpt", weights_only=False)


@pytest.mark.gpu
def test_deepspeed_job_killed_mid_stage_resumes_from_its_directory_checkpoint(stdlib_teacher, corpus, tmp_path):
    """strategy=deepspeed_zero2 on one GPU: last.ckpt is a directory swapped in whole, the stage-end
    records are consolidated weights files, and a kill -9 then ckpt_path=last ends like an
    uninterrupted run (bf16 mixed precision: losses within 1e-3)."""
    overrides = job_overrides(stdlib_teacher, corpus, tmp_path / "cache") + [
        "strategy=deepspeed_zero2", "trainer.accelerator=gpu"]
    full = run_job(tmp_path / "full", overrides)
    assert full.returncode == 0, full.stderr[-3000:]
    run, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    killed = run_job(run, overrides + interrupt("kl", 4, "step"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (checkpoints / LAST).is_dir() and record(checkpoints / LAST) == {"stage": "kl", "step": 3,
                                                                             "finished": ["align"]}
    resumed = run_job(run, overrides + ["ckpt_path=last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted([LAST, "stage0-align.ckpt", "stage1-kl.ckpt"])
    assert (checkpoints / LAST).samefile(checkpoints / "stage1-kl.ckpt")
    assert "optimizer_states" not in torch.load(checkpoints / "stage1-kl.ckpt", weights_only=False)
    a, b = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "full", run))
    for x, y in zip(a["stages"], b["stages"], strict=True):
        assert (x["name"], x["steps"]) == (y["name"], y["steps"])
        assert y["final_loss"] == pytest.approx(x["final_loss"], rel=1e-3)
