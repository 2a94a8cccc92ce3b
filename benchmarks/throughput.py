"""Training throughput of the distillation step with real teacher shapes (issue 12), on one GPU.

For Qwen2.5-0.5B- and 1.5B-shaped teachers (configs only, random weights) and the default RAD-RWKV7
student built from them: the raw step (DistillModule.stage_loss + backward + gradient clipping +
fused AdamW, bf16 autocast, the student prepared as distill-train prepares it) of the align and kl
stages at seq 512 (batch 16) and 2048 (batch 4): tokens/s, MFU, peak memory, and the split of one
step's GPU time into teacher forward, student forward, loss, backward and optimizer. In the same
run, two anchors at the same tokens per step: fla's RWKV7ForCausalLM (flash-linear-attention, a
benchmark-only dependency) at the student's sizes trained with plain CE (its fused linear CE), and
the teacher's own CE training step (Hugging Face, fp32 weights, bf16 autocast, fused AdamW).

MFU = tokens/s x FLOPs per token / the bf16 matmul rate measured in the same run (8192^3), with
FLOPs per token (N = parameter count, embeddings and heads included; attention's T-dependent
FLOPs and the WKV recurrence left out):
    kl step:    2 N_teacher + 6 N_student          align step: 2 N_teacher_body + 6 N_time_mix
    fla / teacher CE training: 6 N
where N_teacher_body leaves out the teacher's head (the align stage never computes logits) and
N_time_mix counts the student's time-mix parameters (what the align stage trains and runs).

Also: each WKV-7 kernel's mean time per call inside the kl step against the same kernel called alone
at the same shape and dtype (one profiler for both), and, with --job, the whole distill-train job
(all three radlads stages, --job-steps each) against the raw step.

    python benchmarks/throughput.py --out throughput.json [--shapes 0.5b,1.5b] [--seqs 512,2048]
        [--steps 20] [--eager-too] [--anchors fla,teacher] [--job DIR --job-steps 100]

Prints a table last and writes every number to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill import parallel  # noqa: E402
from distill.module import DistillModule  # noqa: E402
from distill.stages import Stage  # noqa: E402
from models.student import StudentConfig, build_student, lora_rank  # noqa: E402
from models.teacher import FrozenTeacher  # noqa: E402

# Qwen2.5 model cards' config.json values
QWEN = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, tie_word_embeddings=True),
}
QWEN_COMMON = dict(vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                   hidden_act="silu", use_sliding_window=False)
BATCH = {512: 16, 2048: 4}
STAGES = {
    "align": Stage(name="align", loss="align", tokens=1, seq_len=1, batch_size=1, lr=1e-3, trainable="time_mix"),
    "kl": Stage(name="kl", loss="kl", tokens=1, seq_len=1, batch_size=1, lr=1e-5, hidden_weight=0.1),
}


def qwen_config(shape: str):
    from transformers import Qwen2Config

    return Qwen2Config(**QWEN[shape], **QWEN_COMMON)


def matmul_rate() -> float:
    """Dense bf16 FLOP/s of one 8192^3 product on random data (the MFU denominator)."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    seconds = gpu_seconds(lambda: a @ b, 20)
    return 2 * 8192**3 / seconds


def gpu_seconds(fn, repeats: int) -> float:
    """Mean GPU time of fn over `repeats` calls, by CUDA events (no host sync inside)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def count(params) -> int:
    return sum(p.numel() for p in params)


class PhaseClock:
    """CUDA events at phase boundaries of one step, placed by module hooks and by the caller."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, torch.cuda.Event]] = []
        self.enabled = False  # only the split's steps are marked, not the timed ones

    def mark(self, name: str) -> None:
        if not self.enabled:
            return
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.marks.append((name, event))

    def phases(self) -> dict[str, float]:
        """ms between consecutive marks, named by the later mark (summed when a name repeats)."""
        torch.cuda.synchronize()
        out: dict[str, float] = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            out[name] = out.get(name, 0.0) + a.elapsed_time(b)
        return out


def instrument(module: DistillModule, clock: PhaseClock) -> None:
    """Marks after the teacher's forward and after the student's (forward or time_mix_outputs)."""
    module.teacher.register_forward_hook(lambda *_: clock.mark("teacher_forward"))
    module.student.register_forward_hook(lambda *_: clock.mark("student_forward"))
    time_mix_outputs = module.student.time_mix_outputs

    def timed(*args, **kwargs):
        out = time_mix_outputs(*args, **kwargs)
        clock.mark("student_forward")
        return out

    module.student.time_mix_outputs = timed


def distill_step(module: DistillModule, optimizer, ids, labels, params, clock: PhaseClock) -> None:
    """The raw step: what Lightning's automatic optimization does around stage_loss, without Lightning."""
    clock.mark("start")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = module.stage_loss(ids, labels)["loss"]
    clock.mark("loss")
    loss.backward()
    clock.mark("backward")
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    clock.mark("optimizer")


def measure(step, tokens: int, steps: int, warmup: int) -> dict:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    seconds = gpu_seconds(step, steps)
    return {"step_ms": seconds * 1e3, "tokens_per_second": tokens / seconds,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30}


def bench_distill(shape: str, seq: int, steps: int, compile_: bool, peak: float,
                  compile_teacher: bool = False) -> list[dict]:
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    B = BATCH[seq]
    teacher = FrozenTeacher(Qwen2ForCausalLM(qwen_config(shape)).to(torch.bfloat16).cuda())
    student = build_student(teacher.model, StudentConfig())
    choices = {"compile": compile_, "compile_teacher": compile_ and compile_teacher, "compile_backend": "inductor",
               "activation_checkpointing": False, "tf32": True}
    parallel.prepare_student(student, choices)
    parallel.prepare_teacher(teacher, choices)
    module = DistillModule(teacher, student.cuda(), torch.optim.AdamW)
    clock = PhaseClock()
    instrument(module, clock)
    ids = torch.randint(0, 151936, (B, seq + 1), device="cuda")
    ids, labels = ids[:, :-1], ids[:, 1:]
    rows = []
    for name, stage in STAGES.items():
        module.set_stage(0, stage, total_steps=10**6)
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=(0.9, 0.95), fused=True)
        started = time.perf_counter()
        distill_step(module, optimizer, ids, labels, params, clock)  # compiles, when compiling
        torch.cuda.synchronize()
        row = {"model": f"distill {name}", "shape": shape, "seq": seq, "batch": B, "compile": compile_,
               "compile_teacher": choices["compile_teacher"],
               "first_step_s": time.perf_counter() - started,
               **measure(lambda: distill_step(module, optimizer, ids, labels, params, clock), B * seq, steps, 2)}
        if name == "kl":
            flops = 2 * count(teacher.model.parameters()) + 6 * count(student.parameters())
        else:
            body = count(teacher.model.parameters()) - teacher.model.lm_head.weight.numel() * (
                not teacher.model.config.tie_word_embeddings)
            flops = 2 * body + 6 * count(student.time_mix_parameters())
        row.update(flops_per_token=flops, mfu=row["tokens_per_second"] * flops / peak,
                   params=count(student.parameters()))
        row["host_syncs_per_step"] = host_syncs(lambda: distill_step(module, optimizer, ids, labels, params, clock))
        split = []
        clock.enabled = True
        for _ in range(5):
            clock.marks.clear()
            distill_step(module, optimizer, ids, labels, params, clock)
            split.append(clock.phases())
        clock.enabled = False
        # teacher_forward, student_forward, loss (what stage_loss does after the student), backward, optimizer
        row["split_ms"] = {k: sum(s[k] for s in split) / len(split) for k in split[0]}
        if name == "kl":
            row["wkv_in_step_vs_alone"] = wkv_inside_vs_alone(
                lambda: distill_step(module, optimizer, ids, labels, params, clock), student, B, seq)
        rows.append(row)
        del optimizer
    del module, student, teacher
    torch.cuda.empty_cache()
    return rows


def host_syncs(step) -> dict:
    """Synchronizing CUDA calls one step makes (torch's sync debug mode reports them as warnings), and
    where in Python each was made."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    return {"count": len(syncs), "where": sorted({f"{w.filename}:{w.lineno}" for w in syncs})}


def kernel_means(fn, repeats: int = 3) -> dict[str, float]:
    """Mean device time (ms) per call of every wkv kernel that fn launches."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    out = {}
    for event in prof.key_averages():
        if "wkv" in event.key and event.count:
            out[event.key] = event.device_time_total / event.count / 1e3
    return out


def wkv_inside_vs_alone(step, student, B: int, T: int) -> dict:
    """Each WKV kernel per call: inside the step vs alone at the step's shape, dtype and layout."""
    import kernels

    layer = student.layers[1].time_mix
    H, N = layer.o_proj.in_features // layer.head_size, layer.head_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (B, T, H, N)
    r, k, v = (torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
    w = -0.6 * torch.rand(shape, device="cuda", generator=gen).to(torch.bfloat16)
    kk = torch.nn.functional.normalize(torch.randn(shape, device="cuda", generator=gen), dim=-1)
    a, b = (-kk).to(torch.bfloat16), (kk * torch.rand(shape, device="cuda", generator=gen)).to(torch.bfloat16)
    leaves = [x.requires_grad_() for x in (r, w, k, v, a, b)]
    do = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def alone():
        o, _ = kernels.wkv7(*leaves, output_final_state=True)
        torch.autograd.grad(o, leaves, do)

    inside, isolated = kernel_means(step), kernel_means(alone)
    return {name: {"inside_ms": inside[name], "alone_ms": isolated.get(name),
                   "ratio": inside[name] / isolated[name] if name in isolated else None} for name in inside}


def bench_ce_training(name: str, model: torch.nn.Module, shape: str, seq: int, steps: int, peak: float) -> dict:
    """An anchor: `model` trained with its own CE (labels=ids) as our step trains the student (fp32
    weights, bf16 autocast, clipping, fused AdamW). MFU by 6 N."""
    B = BATCH[seq]
    model = model.cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, 151936, (B, seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    row = {"model": name, "shape": shape, "seq": seq, "batch": B, "params": count(model.parameters()),
           **measure(step, B * seq, steps, 3)}
    row.update(flops_per_token=6 * row["params"], mfu=row["tokens_per_second"] * 6 * row["params"] / peak)
    del model, optimizer
    torch.cuda.empty_cache()
    return row


def teacher_anchor(shape: str):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(qwen_config(shape))


def fla_anchor(shape: str):
    """fla's RWKV7ForCausalLM at the student's sizes (its LoRA ranks by the student's rule), fused linear CE."""
    from fla.models import RWKV7Config, RWKV7ForCausalLM

    torch.manual_seed(0)
    q = QWEN[shape]
    C = q["hidden_size"]
    return RWKV7ForCausalLM(RWKV7Config(
        hidden_size=C, num_hidden_layers=q["num_hidden_layers"], head_dim=64, intermediate_size=q["intermediate_size"],
        vocab_size=QWEN_COMMON["vocab_size"], decay_low_rank_dim=lora_rank(2.5, C), a_low_rank_dim=lora_rank(2.5, C),
        v_low_rank_dim=lora_rank(1.7, C), gate_low_rank_dim=lora_rank(5.0, C), fuse_cross_entropy=False,
        fuse_linear_cross_entropy=True))


def run_job(folder: Path, steps: int, shape: str) -> dict:
    """The whole distill-train job on a saved teacher of this shape (quickstart tokenizer beside it)."""
    from transformers import Qwen2ForCausalLM

    teacher_dir = folder / f"qwen2.5-{shape}-shaped"
    if not (teacher_dir / "config.json").is_file():
        torch.manual_seed(0)
        Qwen2ForCausalLM(qwen_config(shape)).to(torch.bfloat16).save_pretrained(teacher_dir)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(REPO / "models" / "quickstart_teacher" / name, teacher_dir / name)
    run = folder / "job"
    shutil.rmtree(run, ignore_errors=True)
    # the GPU presets' trainer and callbacks (last.ckpt by wall time, written asynchronously), as the
    # experiment presets for real teachers choose them
    command = [sys.executable, "-m", "distill.train", "teacher=hf", f"teacher.path={teacher_dir}", "stages=radlads",
               "trainer=gpu", "callbacks=gpu",
               f"max_steps_per_stage={steps}", f"hydra.run.dir={run}", f"paths.cache_dir={folder / 'cache'}",
               "evaluation.seq_len=512", "data.eval_tokens=65536", "trainer.enable_progress_bar=false",
               "~callbacks.progress_bar", "trainer.log_every_n_steps=20"]
    started = time.perf_counter()
    log = folder / "job.log"  # written as the job runs: a job cut off by a time limit still leaves it
    with open(log, "w") as out:
        result = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        return {"returncode": result.returncode, "log_tail": log.read_text()[-3000:]}
    summary = json.loads((run / "summary.json").read_text())
    return {"wall_seconds": wall, "summary": summary,
            "stage_tokens_per_second": {s["name"]: s["tokens"] / s["seconds"] for s in summary["stages"]}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", default="0.5b,1.5b")
    parser.add_argument("--seqs", default="512,2048")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eager-too", action="store_true", help="also the student without torch.compile")
    parser.add_argument("--compile-teacher-too", action="store_true", help="also with the teacher's layers compiled")
    parser.add_argument("--anchors", default="fla,teacher")
    parser.add_argument("--job", default=None, help="scratch folder: also run the whole distill-train job")
    parser.add_argument("--job-steps", type=int, default=100)
    parser.add_argument("--job-only", action="store_true", help="only the whole job (the raw step measured elsewhere)")
    args = parser.parse_args()

    parallel.configure_runtime(OmegaConf.create({"tf32": True}), "gpu")
    peak = matmul_rate()
    results = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "torch": torch.__version__, "bf16_matmul_tflops": peak / 1e12, "rows": []}
    out = Path(args.out)

    def save():
        out.write_text(json.dumps(results, indent=2))

    for shape in [] if args.job_only else args.shapes.split(","):
        for seq in (int(s) for s in args.seqs.split(",")):
            for compile_ in ([True, False] if args.eager_too else [True]):
                results["rows"] += bench_distill(shape, seq, args.steps, compile_, peak)
                save()
            if args.compile_teacher_too:
                results["rows"] += bench_distill(shape, seq, args.steps, True, peak, compile_teacher=True)
                save()
            anchors = args.anchors.split(",") if args.anchors else []
            if "teacher" in anchors:
                results["rows"].append(bench_ce_training("teacher CE (HF)", teacher_anchor(shape), shape, seq,
                                                         args.steps, peak))
                save()
            if "fla" in anchors:
                results["rows"].append(bench_ce_training("fla RWKV7 CE", fla_anchor(shape), shape, seq, args.steps, peak))
                save()
    if args.job:
        folder = Path(args.job)
        folder.mkdir(parents=True, exist_ok=True)
        results["job"] = run_job(folder, args.job_steps, args.shapes.split(",")[0])
        save()
    print_table(results)


def print_table(results: dict) -> None:
    print(f"\n{results['device']}, {results['date']}, torch {results['torch']}, "
          f"bf16 matmul {results['bf16_matmul_tflops']:.0f} TFLOP/s")
    print(f"{'model':<18} {'shape':>5} {'seq':>5} {'cmp':>4} {'ms/step':>8} {'tok/s':>9} {'MFU':>6} {'peak GB':>8}  split ms")
    for r in results["rows"]:
        split = " ".join(f"{k}={v:.1f}" for k, v in r.get("split_ms", {}).items())
        print(f"{r['model']:<18} {r['shape']:>5} {r['seq']:>5} {str(r.get('compile', '')):>4} {r['step_ms']:8.1f} "
              f"{r['tokens_per_second']:9.0f} {r['mfu']:6.1%} {r['peak_memory_gb']:8.1f}  {split}"
              + (f" syncs={r['host_syncs_per_step']['count']}" if "host_syncs_per_step" in r else ""))
        for where in r.get("host_syncs_per_step", {}).get("where", []):
            print(f"    sync at {where}")
        for name, wkv in r.get("wkv_in_step_vs_alone", {}).items():
            ratio = "n/a" if wkv["ratio"] is None else f"{wkv['ratio']:.2f}x"
            print(f"    {name[:40]:<40} inside {wkv['inside_ms']:.3f} ms, alone "
                  f"{wkv['alone_ms'] or float('nan'):.3f} ms: {ratio}")
    job = results.get("job")
    if job and "summary" in job:
        print(f"job: {job['summary']['tokens_per_second']:.0f} tok/s over its stages "
              f"({ {k: round(v) for k, v in job['stage_tokens_per_second'].items()} }), wall {job['wall_seconds']:.0f} s")
    elif job:
        print(f"job failed (status {job['returncode']}): {job['log_tail'][-800:]}")


if __name__ == "__main__":
    main()
