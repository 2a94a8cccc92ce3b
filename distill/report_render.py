"""distill-eval's report as files: PNG plots (matplotlib, no display) and report.md, from eval.json's numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PLOTS = {"alignment": "alignment_errors.png", "gap": "nll_gap_by_position.png", "context": "long_context.png"}
CONSTANT_MEMORY_PLOT = "constant_memory.png"
LABELS = {"student": "student (transformers)", "student_onnx": "student (ONNX Runtime)", "teacher": "teacher (KV cache)"}


def plot_alignment(errors: list[float], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(range(len(errors)), errors)
    ax.set(xlabel="layer", ylabel="||y_teacher - y_student|| / sqrt(C)", title="time mix vs teacher attention")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gap(gap: list[float], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(range(len(gap)), gap, lw=0.8, label="per position")
    window = max(1, len(gap) // 16)
    smooth = [sum(gap[max(0, i - window + 1):i + 1]) / len(gap[max(0, i - window + 1):i + 1]) for i in range(len(gap))]
    ax.plot(range(len(gap)), smooth, lw=2, label=f"mean of the last {window}")
    ax.axhline(0, color="gray", lw=0.5)
    ax.set(xlabel="position in the window", ylabel="NLL student - teacher (nats)", title="where the student loses")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_context(long_context: dict[str, Any], path: Path) -> None:
    rows = long_context["rows"]
    contexts = [r["context"] for r in rows]
    fig, (time_ax, bytes_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, style in (("teacher", "o-"), ("student", "s-")):
        time_ax.plot(contexts, [r[name]["seconds_per_token"] * 1e3 for r in rows], style, label=name)
        bytes_ax.plot(contexts, [r[name]["state_bytes"] / 2**20 for r in rows], style, label=name)
    time_ax.set(xscale="log", xlabel="context (tokens)", ylabel="ms per new token", title=long_context["device"])
    bytes_ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="MiB read per new token",
                 title="KV cache (teacher) vs state (student)")
    for ax in (time_ax, bytes_ax):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_constant_memory(result: dict[str, Any], path: Path) -> None:
    """benchmarks/constant_memory.py's rows: resident memory and ms per token against tokens generated."""
    fig, (rss_ax, time_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, model in result["models"].items():
        rows = model["rows"]
        tokens = [r["tokens"] for r in rows]
        rss_ax.plot(tokens, [r["rss_bytes"] / 2**20 for r in rows], label=LABELS.get(name, name))
        time_ax.plot(tokens, [r["ms_per_token"] for r in rows], label=LABELS.get(name, name))
    rss_ax.set(xlabel="tokens generated", ylabel="resident memory (MiB)", title=f"RSS, {result['device']}")
    time_ax.set(xlabel="tokens generated", ylabel="ms per token", yscale="log",
                title=f"time per token (mean of every {result['every']})")
    for ax in (rss_ax, time_ax):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(result: dict[str, Any], out: Path) -> list[str]:
    plot_alignment(result["alignment_errors"], out / PLOTS["alignment"])
    plot_gap(result["nll_gap_by_position"], out / PLOTS["gap"])
    plot_context(result["long_context"], out / PLOTS["context"])
    if "constant_memory" in result:
        plot_constant_memory(result["constant_memory"], out / CONSTANT_MEMORY_PLOT)
        return [*PLOTS.values(), CONSTANT_MEMORY_PLOT]
    return list(PLOTS.values())


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ")


def markdown(result: dict[str, Any]) -> str:
    """report.md: the numbers of eval.json with the plots beside them."""
    r = result
    lines = [
        "# Conversion report", "",
        f"Student `{r['ckpt']}` against its teacher on `{r['text']}` ({r['eval_tokens']:,} held-out tokens).", "",
        "| | teacher | student |", "| --- | --- | --- |",
        f"| NLL (nats/token) | {r['teacher_nll']:.4f} | {r['student_nll']:.4f} |",
        f"| perplexity | {r['teacher_ppl']:.3f} | {r['student_ppl']:.3f} ({r['student_ppl'] / r['teacher_ppl']:.3f} x) |",
        f"| KL(teacher ‖ student) | | {r['kl']:.4f} nats/token |",
        f"| top-1 agreement | | {r['top1_agreement']:.3f} |", "",
        "## Per-layer alignment error", "",
        "Each time mix fed the teacher's attention input, against that attention's output (mean L2/√C):", "",
        "| layer | " + " | ".join(str(i) for i in range(len(r["alignment_errors"]))) + " |",
        "| --- " * (len(r["alignment_errors"]) + 1) + "|",
        "| error | " + " | ".join(f"{e:.4f}" for e in r["alignment_errors"]) + " |", "",
        f"![alignment]({PLOTS['alignment']})", "",
        "## Where in the window the student loses", "",
        f"NLL gap student − teacher at each position, averaged over the windows: ![gap]({PLOTS['gap']})", "",
        "## Cost of a new token as the context grows", "",
        f"Measured on {r['long_context']['device']}, {r['long_context']['decode_steps']} decode steps per point "
        "(`long_context` in eval.json).", "",
        "| context | teacher ms/token | student ms/token | teacher KV cache MiB | student state MiB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in r["long_context"]["rows"]:
        t, s = row["teacher"], row["student"]
        lines.append(f"| {row['context']:,} | {t['seconds_per_token'] * 1e3:.2f} | {s['seconds_per_token'] * 1e3:.2f} | "
                     f"{t['state_bytes'] / 2**20:.3f} | {s['state_bytes'] / 2**20:.3f} |")
    lines += ["", f"![long context]({PLOTS['context']})", ""]
    if "constant_memory" in r:
        lines += constant_memory_section(r["constant_memory"])
    lines += ["## Samples", ""]
    for sample in r["samples"]:
        lines += [f"Prompt: `{_cell(sample['prompt'])}`", "", "| | teacher | student |", "| --- | --- | --- |"]
        for mode in ("greedy", "sampled"):
            lines.append(f"| {mode} | {_cell(sample[f'teacher_{mode}'])} | {_cell(sample[f'student_{mode}'])} |")
        lines.append("")
    return "\n".join(lines)


def constant_memory_section(cm: dict[str, Any]) -> list[str]:
    """report.md's lines for a benchmarks/constant_memory.py JSON: its summary per model and its plot."""
    lines = ["## Memory and time per token over a long generation", "",
             f"{cm['tokens']:,} new tokens per model, each in its own process (`{cm['command']}`; {cm['device']}, "
             f"{cm['date']}, commit {cm['commit']}):", "",
             "| model | RSS MiB at first → last sample | state / KV cache MiB | ms/token start → end |",
             "| --- | --- | --- | --- |"]
    for name, model in cm["models"].items():
        s = model["summary"]
        lines.append(f"| {LABELS.get(name, name)} | {s['rss_mib_first']:.1f} → {s['rss_mib_last']:.1f} "
                     f"({s['tokens_first']:,} → {s['tokens_last']:,} tokens) | {s['state_mib_first']:.3f} → "
                     f"{s['state_mib_last']:.3f} | {s['ms_per_token_start']:.2f} → {s['ms_per_token_end']:.2f} |")
    return lines + ["", f"![constant memory]({CONSTANT_MEMORY_PLOT})", ""]
