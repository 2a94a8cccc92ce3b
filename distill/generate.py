"""`distill-generate MODEL prompt=...`: stream text from an exported student's fixed-size state.

    distill-generate exports/my-rwkv prompt="Once upon a time" max_new_tokens=200   # format=hf folder
    distill-generate exports/my-rwkv-onnx prompt="def " temperature=0.8 seed=1      # format=onnx folder
    distill-generate exports/my-rwkv-onnx onnx=int8 prompt="def "                   # its int8 graph
    distill-generate exports/my-rwkv-onnx/model.int8.onnx prompt="def "             # or the file

MODEL is a distill-export folder: format=hf (transformers with the folder's own code; the prompt in
one parallel forward, then one token per forward from the recurrent state) or format=onnx
(onnxruntime; every token through the one-token step, the state in and out), or an .onnx file of
such a folder. The prompt and then each new token are printed as they come (stdout); the speed and
the peak resident memory go to stderr at the end. Arguments are key=value like the other CLIs':
prompt, max_new_tokens, temperature (0: greedy), seed, onnx (fp32 | int8), stop_at_eos.
Not a Hydra app: it has one positional argument and nothing to compose.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file
from torch import Tensor

from distill.cli import run_cli
from distill.report import tensor_bytes
from distill.restore import is_export

ONNX_VARIANTS = ("fp32", "int8")
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


@dataclass
class GenerateConfig:
    model: str
    prompt: str = ""
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    onnx: str = "fp32"  # which graph of a format=onnx folder
    stop_at_eos: bool = True


def typed(key: str, value: str, kind: type) -> Any:
    """value (command-line text) as the field's type; ValueError naming key and what is valid."""
    if kind is bool:
        if value.lower() not in TRUE + FALSE:
            raise ValueError(f"{key}={value!r} is not a boolean; valid: true | false")
        return value.lower() in TRUE
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{key}={value!r} is not a valid {kind.__name__}") from None


def parse(argv: list[str]) -> GenerateConfig:
    """[MODEL, key=value, ...] -> GenerateConfig; ValueError for a missing MODEL, an unknown key or a bad value."""
    fields = {f.name: f.type for f in dataclasses.fields(GenerateConfig) if f.name != "model"}
    kinds = {"str": str, "int": int, "float": float, "bool": bool}
    usage = f"usage: distill-generate MODEL [key=value ...]; keys: {', '.join(fields)}"
    if not argv or "=" in argv[0]:
        raise ValueError(f"MODEL (an exported folder or .onnx file) must come first; {usage}")
    values = {}
    for arg in argv[1:]:
        key, eq, value = arg.partition("=")
        if not eq or key not in fields:
            raise ValueError(f"unknown argument {arg!r}; {usage}")
        values[key] = typed(key, value, kinds[fields[key]])
    cfg = GenerateConfig(model=argv[0], **values)
    if cfg.max_new_tokens < 0 or cfg.temperature < 0:
        raise ValueError(f"max_new_tokens={cfg.max_new_tokens} and temperature={cfg.temperature} must be >= 0")
    if cfg.onnx not in ONNX_VARIANTS:
        raise ValueError(f"onnx={cfg.onnx!r} is not one of {ONNX_VARIANTS}")
    return cfg


class HFStep:
    """A format=hf folder through transformers: ids [B, T] -> logits [B, V] after the last of them,
    continuing the recurrent state of the tokens given before (a fresh one at first)."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        self.state = None

    @torch.no_grad()
    def __call__(self, ids: Tensor) -> Tensor:
        out = self.model(input_ids=ids, recurrent_state=self.state, use_cache=True, logits_to_keep=1)
        self.state = out.recurrent_state
        return out.logits[:, -1].float()

    def state_bytes(self) -> int:
        return tensor_bytes(self.state)


class OnnxStep:
    """A format=onnx graph through onnxruntime, one token per run with the state in and out:
    ids [B, T] -> logits [B, V] after the last of them. A sequence starts at position 0 from the
    export's initial state (zeros, or a state-tuned student's learned WKV states), broadcast over B."""

    def __init__(self, graph: Path, batch: int = 1) -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.spec = json.loads((graph.parent / "onnx.json").read_text())
        self.session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        self.tokenizer = AutoTokenizer.from_pretrained(graph.parent)
        self.with_position = any(i["name"] == "position" for i in self.spec["inputs"])
        fresh = load_file(graph.parent / self.spec["files"]["initial_state"])
        self.state = {s["input"]: np.repeat(fresh[s["input"]], batch, axis=0) for s in self.spec["state"]}
        self.position = 0
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, ids: Tensor) -> Tensor:
        for t in range(ids.shape[1]):
            feed = {"input_ids": ids[:, t:t + 1].numpy().astype(np.int64), **self.state}
            if self.with_position:
                feed["position"] = np.array(self.position, dtype=np.int64)
            out = dict(zip(self.outputs, self.session.run(None, feed)))
            self.state = {s["input"]: out[s["output"]] for s in self.spec["state"]}
            self.position += 1
        return torch.from_numpy(out["logits"])

    def state_bytes(self) -> int:
        return sum(a.nbytes for a in self.state.values())


def open_model(cfg: GenerateConfig) -> HFStep | OnnxStep:
    """The stepper for MODEL: a format=hf folder, a format=onnx folder (cfg.onnx picks its graph) or an .onnx file."""
    path = Path(cfg.model)
    if not path.exists():
        raise FileNotFoundError(f"MODEL={cfg.model!r}: no such file or directory")
    if path.is_dir() and (path / "onnx.json").is_file():
        return OnnxStep(path / json.loads((path / "onnx.json").read_text())["files"][cfg.onnx])
    if path.is_file() and path.suffix == ".onnx" and (path.parent / "onnx.json").is_file():
        return OnnxStep(path)
    if is_export(path):
        return HFStep(path)
    raise ValueError(f"MODEL={cfg.model!r} is neither a distill-export folder (format=hf: config.json of model_type "
                     "rwkv_distill; format=onnx: onnx.json) nor an .onnx file of a format=onnx folder")


def prompt_ids(tokenizer, prompt: str) -> Tensor:
    """[1, T]: BOS (when the tokenizer has one) then the prompt, as distill-eval's samples start."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return torch.tensor([bos + tokenizer.encode(prompt, add_special_tokens=False)])


def pick(logits: Tensor, temperature: float, generator: torch.Generator) -> Tensor:
    """logits [B, V] -> next tokens [B]: the argmax (temperature 0) or a sample of softmax(logits / temperature)."""
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)[:, 0]


def rss_bytes() -> int:
    """This process's resident memory now (Linux: the resident pages of /proc/self/statm)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux VmHWM). Not getrusage's ru_maxrss: after fork +
    exec that keeps the parent's peak (e.g. a benchmark process that holds a teacher)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB


def generate(cfg: GenerateConfig) -> dict[str, Any]:
    """Stream cfg.prompt and its continuation to stdout; returns the new token ids, the new text and the speed."""
    from transformers import TextStreamer

    step = open_model(cfg)
    tokenizer = step.tokenizer
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    ids = prompt_ids(tokenizer, cfg.prompt)
    print(cfg.prompt, end="", flush=True)
    generator = torch.Generator().manual_seed(cfg.seed)
    started = time.perf_counter()
    logits = step(ids)
    prefilled = time.perf_counter()
    new = []
    while len(new) < cfg.max_new_tokens:
        token = pick(logits, cfg.temperature, generator)  # [1]
        new.append(int(token))
        streamer.put(token)
        if (cfg.stop_at_eos and new[-1] == tokenizer.eos_token_id) or len(new) == cfg.max_new_tokens:
            break
        logits = step(token[:, None])
    streamer.end()
    seconds = time.perf_counter() - prefilled
    result = {"tokens": new, "text": tokenizer.decode(new, skip_special_tokens=True),
              "prompt_tokens": ids.shape[1], "prefill_seconds": prefilled - started,
              "tokens_per_second": len(new) / seconds if seconds > 0 else float("inf"),
              "state_bytes": step.state_bytes(), "peak_rss_bytes": peak_rss_bytes()}
    print(f"{len(new)} new tokens at {result['tokens_per_second']:.1f} tokens/s (prompt: {ids.shape[1]} tokens in "
          f"{result['prefill_seconds']:.2f} s); state {result['state_bytes'] / 2**10:.1f} KiB; "
          f"peak resident memory {result['peak_rss_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda args: generate(parse(args)), sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
