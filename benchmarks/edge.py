"""Quantized students (issue 15): held-out NLL, size on disk, generation tokens/s and peak resident
memory of the fp32, int8 and int4 exports of one checkpoint (distill-export quantize=...).

    python benchmarks/edge.py --ckpt outputs/<run>/checkpoints/last.ckpt --text stdlib --out /tmp/edge-quickstart
    python benchmarks/edge.py --ckpt ... --text ../shared/assets/text/tinystories_valid_head45.txt --seq-len 512 \
        --prompt "Once upon a time" --out /tmp/edge-stories
    python benchmarks/edge.py --ckpt ... --text FILE --device cuda --out $OUT   # + bnb8 / bnb4 (bitsandbytes)

Each variant is a real `distill-export` folder (fp32; quantize=int8; quantize=int4: torchao weight-only);
on CUDA also the fp32 folder loaded through transformers' BitsAndBytesConfig (bnb8: LLM.int8(), bnb4:
NF4), when bitsandbytes is installed. NLL: distill.evaluation.compare_on_batches over the same held-out
windows for every variant (--text stdlib: the quickstart's held-out stdlib split; else a text file,
stories split at <|endoftext|>). Generation: one fresh process per variant (`edge.py generate ...`)
loads the folder with transformers, greedy-decodes --new-tokens from --prompt and reports tokens/s
(the fastest of --repeats timed generate() calls after a short warm-up), its peak resident memory (VmHWM), and the
resident memory the loaded model adds to the libraries' and the generation adds to that, so no
variant's memory is counted in another's. Writes edge.json into --out and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.provenance import git_commit  # noqa: E402
from distill.generate import peak_rss_bytes, rss_bytes  # noqa: E402

QUANTIZE = {"fp32": None, "int8": "int8", "int4": "int4"}  # variant -> distill-export quantize=
BNB = {"bnb8": 8, "bnb4": 4}  # CUDA only: the fp32 folder, quantized by bitsandbytes as it loads


def load(folder: Path, variant: str, device: str):
    """The folder's model (transformers + trust_remote_code), in eval mode on device."""
    from transformers import AutoModelForCausalLM

    if variant in BNB:
        from distill.quantize import bnb_config

        return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32,
                                                    device_map=device, quantization_config=bnb_config(BNB[variant])).eval()
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval().to(device)


def export_variants(ckpt: str, out: Path) -> dict[str, Path]:
    """variant -> its distill-export folder under out (kept: a second run reuses them)."""
    from hydra import compose, initialize_config_dir

    from distill.cli import CONF_DIR, register_resolvers
    from distill.export import export

    register_resolvers()
    folders = {}
    for variant, quantize in QUANTIZE.items():
        folders[variant] = out / variant
        if not (folders[variant] / "config.json").is_file():
            with initialize_config_dir(CONF_DIR, version_base="1.3"):
                cfg = compose("export", overrides=[f"ckpt={ckpt}", f"out={folders[variant]}", "overwrite=true",
                                                   f"quantize={quantize or 'null'}"])
            export(cfg)
    return folders


def heldout_batches(text: str, tokenizer, seq_len: int, batch_size: int, eval_tokens: int | None, cache: Path):
    from distill.data import DistillDataModule
    from distill.data.sources import LocalFilesSource, StdlibSource

    source = StdlibSource() if text == "stdlib" else LocalFilesSource(paths=[text], document_separator="<|endoftext|>")
    data = DistillDataModule(source, heldout_source=None if text == "stdlib" else source, tokenizer=tokenizer,
                             seq_len=seq_len, batch_size=batch_size, cache_dir=cache, eval_tokens=eval_tokens)
    return data.heldout_batches()


def nll(folders: dict[str, Path], variants: list[str], args: argparse.Namespace) -> dict[str, dict]:
    """compare_on_batches of every variant's student against the teacher, on the same windows."""
    from distill.evaluation import compare_on_batches
    from distill.restore import from_export
    from models.teacher import FrozenTeacher

    teacher, tokenizer, _, _ = from_export(folders["fp32"])
    teacher = FrozenTeacher(teacher).to(args.device)
    batches = heldout_batches(args.text, tokenizer, args.seq_len, args.batch_size, args.eval_tokens, args.out / "cache")
    results = {}
    for variant in variants:
        student = load(folders["fp32" if variant in BNB else variant], variant, args.device).student
        results[variant] = compare_on_batches(teacher, student, batches)
        print(f"{variant}: student NLL {results[variant]['student_nll']:.4f} over {results[variant]['eval_tokens']} tokens")
        del student
    return results


def rss_mib() -> float:
    return rss_bytes() / 2**20


def generate(folder: Path, variant: str, device: str, prompt: str, new_tokens: int, repeats: int) -> dict:
    """Run in a fresh process: load, warm up, time a greedy generate(), read the peak RSS and the RSS
    before the model was loaded (the libraries alone: torch, transformers, torchao, bitsandbytes)."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    for library in ("torchao.quantization", "bitsandbytes"):
        if importlib.util.find_spec(library.split(".")[0]):
            importlib.import_module(library)
    before = rss_mib()
    model = load(folder, variant, device)
    model.generation_config.eos_token_id = None  # exactly new_tokens tokens
    ids = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)(prompt, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, do_sample=False)
        if device == "cuda":
            torch.cuda.synchronize()
        loaded = rss_mib()  # the model in memory, warmed up
        times = []
        for _ in range(repeats):  # the fastest of a few: the CPU may be shared with other jobs
            started = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return {"tokens_per_second": new_tokens / min(times), "seconds": times, "new_tokens": new_tokens,
            "peak_rss_mib": peak_rss_bytes() / 2**20, "rss_before_load_mib": before,
            "rss_after_load_mib": loaded, "rss_after_generate_mib": rss_mib(),
            "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}


def generate_in_child(folder: Path, variant: str, args: argparse.Namespace) -> dict:
    result = subprocess.run([sys.executable, __file__, "generate", str(folder), variant, "--device", args.device,
                             "--prompt", args.prompt, "--new-tokens", str(args.new_tokens),
                             "--repeats", str(args.repeats)],
                            capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"generation of {variant} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def disk_bytes(folder: Path) -> dict[str, int]:
    return {"weights_bytes": (folder / "model.safetensors").stat().st_size,
            "folder_bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file())}


def table(rows: dict[str, dict]) -> str:
    base = rows["fp32"]["student_nll"]
    lines = ["| variant | held-out NLL | vs fp32 | weights on disk | tokens/s | peak RSS | RSS: load, then generation |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for variant, r in rows.items():
        size = f"{r['weights_bytes'] / 2**20:.2f} MiB" if "weights_bytes" in r else "(the fp32 folder)"
        lines.append(f"| {variant} | {r['student_nll']:.4f} | {100 * (r['student_nll'] / base - 1):+.2f}% | {size} | "
                     f"{r['tokens_per_second']:.1f} | {r['peak_rss_mib']:.0f} MiB | "
                     f"+{r['rss_after_load_mib'] - r['rss_before_load_mib']:.1f} MiB, "
                     f"{r['rss_after_generate_mib'] - r['rss_after_load_mib']:+.1f} MiB |")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["generate"]:
        parser = argparse.ArgumentParser()
        parser.add_argument("cmd"), parser.add_argument("folder", type=Path), parser.add_argument("variant")
        parser.add_argument("--device", default="cpu"), parser.add_argument("--prompt", default="def ")
        parser.add_argument("--new-tokens", type=int, default=256), parser.add_argument("--repeats", type=int, default=3)
        a = parser.parse_args()
        print(json.dumps(generate(a.folder, a.variant, a.device, a.prompt, a.new_tokens, a.repeats)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a distill-train checkpoint")
    parser.add_argument("--out", type=Path, required=True, help="the exported folders and edge.json go here")
    parser.add_argument("--text", default="stdlib", help="held-out text: 'stdlib' (the quickstart's split) or a file")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens (default: all)")
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per variant (tokens/s: the fastest)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    folders = export_variants(args.ckpt, args.out)
    variants = list(QUANTIZE)
    if args.device == "cuda":
        try:
            import bitsandbytes  # noqa: F401
            variants += list(BNB)
        except ImportError:
            print("bitsandbytes is not installed: no bnb8/bnb4 rows")
    rows = nll(folders, variants, args)
    for variant in variants:
        folder = folders["fp32" if variant in BNB else variant]
        rows[variant] |= generate_in_child(folder, variant, args)
        if variant not in BNB:
            rows[variant] |= disk_bytes(folder)
    record = {"ckpt": str(Path(args.ckpt).resolve()), "text": args.text, "seq_len": args.seq_len,
              "device": args.device, "cpu": platform.processor() or platform.machine(),
              "torch_threads": torch.get_num_threads(), "commit": git_commit(),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "prompt": args.prompt, "new_tokens": args.new_tokens, "variants": rows}
    (args.out / "edge.json").write_text(json.dumps(record, indent=2))
    print(table(rows))
    print(f"wrote {args.out / 'edge.json'}")


if __name__ == "__main__":
    main()
