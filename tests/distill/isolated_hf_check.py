"""Run by tests/distill/test_export.py as `python -I -S isolated_hf_check.py SITE_DIRS JOB_JSON`:
loads exported folders with transformers alone, in a process where the project's packages are not
importable, and writes what they compute to JSON. Imports nothing of the project, on purpose."""

import json
import os
import sys

sys.path += sys.argv[1].split(os.pathsep)  # site-packages only: -S skipped .pth files, so no editable install either

import importlib.util  # noqa: E402

for name in ("models", "kernels", "distill"):
    assert importlib.util.find_spec(name) is None, f"{name} is importable in the isolated process"

import pickle  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline  # noqa: E402


def refuse_unpickling(*args, **kwargs):
    raise AssertionError("the folder was unpickled: an export must load from safetensors alone")


torch.load = pickle.load = pickle.loads = refuse_unpickling  # weights (torchao's quantized ones too) load without them


def state_bytes(state) -> list[int]:
    """Bytes held by each layer's time-mix state."""
    return [sum(t.numel() * t.element_size() for t in layer.values()) for layer in state.time_mix]


def linear_weights(model) -> dict[str, str]:
    """Each nn.Linear's weight class: Parameter, or a quantized tensor subclass (torchao's)."""
    return {name: type(m.weight).__name__ for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def check(folder: str, ids: list[list[int]], prompt: str, new_tokens: int, device: str = "cpu") -> dict:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval().to(device)
    model.generation_config.eos_token_id = None  # exactly new_tokens tokens, as the project's loop without eos
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    ids = torch.tensor(ids, device=device)
    seen = []  # state bytes after each forward generate() makes
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
        state = model(ids, use_cache=True).recurrent_state  # (a fine-tuned folder may save use_cache=false)
        hook = model.register_forward_hook(lambda m, args, out: seen.append(state_bytes(out.recurrent_state)))
        generated = model.generate(ids[:1, :5], max_new_tokens=new_tokens, do_sample=False)
    hook.remove()
    # the pipeline would move the model to an accelerator when there is one: keep it where the check put it
    text = pipeline("text-generation", model=model, tokenizer=tokenizer, device=model.device)(
        prompt, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    direct = model.generate(prompt_ids, max_new_tokens=8, do_sample=False)
    triton = sorted(name for name in sys.modules if name.endswith("_triton") and "transformers_modules" in name)
    return {"module": type(model).__module__, "logits": logits.tolist(), "triton_modules": triton, "generated": generated[0].tolist(),
            "state_bytes": seen, "pipeline": text, "linear_weights": linear_weights(model),
            "state_dtypes": sorted({str(t.dtype) for layer in state.time_mix for t in layer.values()}),
            "direct": tokenizer.decode(direct[0, prompt_ids.shape[1]:], skip_special_tokens=True)}


job = json.loads(open(sys.argv[2]).read())
results = {folder: check(folder, **job["args"]) for folder in job["folders"]}
open(job["out"], "w").write(json.dumps(results))
