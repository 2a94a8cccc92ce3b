"""Constant memory, shown (issue 15 §3): one long generation per model, each in its own process,
sampling resident memory and time per token as the context grows. The student runs from its
fixed-size state (its format=hf folder through transformers, and its format=onnx step through
onnxruntime); its teacher beside it keeps transformers' KV cache.

    python benchmarks/constant_memory.py --out docs/results/constant_memory        # trains the quickstart first
    python benchmarks/constant_memory.py --ckpt outputs/<run>/checkpoints/last.ckpt --tokens 4096 --out DIR

The student generates --tokens new tokens greedily after the prompt; the teacher is then fed the
same tokens one per forward (its KV cache), computing its logits as generation would, so both
do a generation's work per token. Every --every tokens a row: tokens so far, resident memory
(RSS, /proc/self/statm), ms per token over the last --every, bytes of the state or KV cache.
Writes constant_memory.json (rows, summary, device, date, commit) and constant_memory.png
(distill.report_render.plot_constant_memory); distill-eval report.constant_memory=<the JSON> puts
both into the conversion report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.provenance import git_commit  # noqa: E402
from distill.generate import HFStep, OnnxStep, prompt_ids, rss_bytes  # noqa: E402
from distill.report import tensor_bytes  # noqa: E402
from distill.report_render import plot_constant_memory  # noqa: E402
from distill.restore import load_teacher  # noqa: E402

MODELS = ("student", "student_onnx", "teacher")


class TeacherStep:
    """The teacher (HF causal LM) with its KV cache: ids [1, T] -> logits [1, V] after the last,
    continuing the cache of the tokens given before."""

    def __init__(self, hf_folder: Path) -> None:
        recorded = json.loads((hf_folder / "config.json").read_text())["distill"]["teacher"]
        self.model, _ = load_teacher(recorded, None, "float32")
        self.model.eval()
        self.cache = None

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.cache
        return out.logits[:, -1].float()

    def state_bytes(self) -> int:
        return tensor_bytes(self.cache)


def open_step(model: str, hf_folder: Path, onnx_folder: Path) -> Any:
    if model == "student":
        return HFStep(hf_folder)
    if model == "student_onnx":
        return OnnxStep(onnx_folder / "model.onnx")
    return TeacherStep(hf_folder)


def measure(step: Callable, prompt: torch.Tensor, tokens: int, every: int, forced: list[int] | None = None
            ) -> tuple[list[dict[str, float]], list[int]]:
    """Greedy generation of `tokens` new tokens after prompt [1, T] (or the `forced` ones, fed in
    order): the rows every `every` tokens and the tokens."""
    logits = step(prompt)
    out, rows = [], []
    started = time.perf_counter()
    for i in range(tokens):
        token = logits.argmax(-1) if forced is None else torch.tensor([forced[i]])
        out.append(int(token))
        logits = step(token[:, None])
        if (i + 1) % every == 0:
            ms = 1e3 * (time.perf_counter() - started) / every
            rows.append({"tokens": i + 1, "rss_bytes": rss_bytes(), "ms_per_token": ms,
                         "state_bytes": step.state_bytes()})
            started = time.perf_counter()
    return rows, out


def worker(args: argparse.Namespace) -> None:
    """One model in this process: its rows (and the student's tokens) into --result."""
    hf, onnx = Path(args.hf), Path(args.onnx)
    step = open_step(args.worker, hf, onnx)
    tokenizer = AutoTokenizer.from_pretrained(hf, trust_remote_code=True)  # the teacher's, in every export
    forced = json.loads(Path(args.forced).read_text())["tokens"] if args.forced else None
    rows, tokens = measure(step, prompt_ids(tokenizer, args.prompt), args.tokens, args.every, forced)
    Path(args.result).write_text(json.dumps({"rows": rows, "tokens": tokens}))


def summary(rows: list[dict[str, float]]) -> dict[str, float]:
    """First row vs last row, and ms/token at the start (first tenth of the rows) vs the end (last tenth)."""
    tenth = max(1, len(rows) // 10)
    ms = [r["ms_per_token"] for r in rows]
    first, last = rows[0], rows[-1]
    return {"tokens_first": first["tokens"], "tokens_last": last["tokens"],
            "rss_mib_first": first["rss_bytes"] / 2**20, "rss_mib_last": last["rss_bytes"] / 2**20,
            "state_mib_first": first["state_bytes"] / 2**20, "state_mib_last": last["state_bytes"] / 2**20,
            "ms_per_token_start": statistics.median(ms[:tenth]), "ms_per_token_end": statistics.median(ms[-tenth:])}


def python(*args: str, timeout: int = 3600) -> None:
    subprocess.run([sys.executable, *args], cwd=REPO, check=True, timeout=timeout,
                   env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})


def quickstart_checkpoint(work: Path) -> Path:
    python("-m", "distill.train", "experiment=quickstart", f"hydra.run.dir={work / 'quickstart'}")
    return work / "quickstart" / "checkpoints" / "last.ckpt"


def run(args: argparse.Namespace) -> dict[str, Any]:
    measured_at = git_commit()  # before the run: the code that measures, not what the tree holds when it ends
    work = Path(tempfile.mkdtemp(prefix="constant_memory."))
    ckpt = Path(args.ckpt) if args.ckpt else quickstart_checkpoint(work)
    hf, onnx = work / "hf", work / "onnx"
    for fmt, out in (("hf", hf), ("onnx", onnx)):
        python("-m", "distill.export", f"ckpt={ckpt}", f"out={out}", f"format={fmt}", f"hydra.run.dir={work / 'h'}")
    base = [str(Path(__file__).resolve()), "--hf", str(hf), "--onnx", str(onnx), "--tokens", str(args.tokens),
            "--every", str(args.every), "--prompt", args.prompt]
    result = {"models": {}}
    for model in MODELS:
        forced = ["--forced", str(work / "student.json")] if model == "teacher" else []
        started = time.time()
        python(*base, "--worker", model, "--result", str(work / f"{model}.json"), *forced)
        measured = json.loads((work / f"{model}.json").read_text())
        result["models"][model] = {"rows": measured["rows"], "summary": summary(measured["rows"]),
                                   "wall_seconds": time.time() - started}
        print(f"{model}: {json.dumps(result['models'][model]['summary'])}", flush=True)
    result |= {"ckpt": str(ckpt), "tokens": args.tokens, "every": args.every, "prompt": args.prompt,
               "device": args.device or f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
               "threads": torch.get_num_threads(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "commit": measured_at, "command": shlex.join(["python", "benchmarks/constant_memory.py", *sys.argv[1:]])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "constant_memory.json").write_text(json.dumps(result, indent=1))
    plot_constant_memory(result, out / "constant_memory.png")
    print(f"wrote {out / 'constant_memory.json'} and {out / 'constant_memory.png'}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", help="a distill-train checkpoint; default: train experiment=quickstart first")
    p.add_argument("--tokens", type=int, default=32768, help="new tokens per model")
    p.add_argument("--every", type=int, default=256, help="tokens between samples")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--out", default="docs/results/constant_memory")
    p.add_argument("--device", help="how to name the machine in the JSON (default: from platform)")
    for internal in ("--worker", "--hf", "--onnx", "--result", "--forced"):  # one model's process
        p.add_argument(internal, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
