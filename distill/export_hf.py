"""distill-export format=hf: a Hugging Face folder that runs with torch + transformers alone.

The folder's code is our own: models/hf_model.py and models/hf_config.py become
modeling_rwkv_distill.py and configuration_rwkv_distill.py, beside the models/ files they import and
the whole kernels/ package (its dispatch loads the Triton modules by name, when triton and CUDA are
there), every `models.` / `kernels` import made relative. transformers copies a remote-code module's
siblings into its module cache only when a `from .name import` line names them
(transformers.dynamic_module_utils.get_relative_imports), so the modeling file gets a block naming them all.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

from models.hf_config import RWKVDistillConfig
from models.hf_model import RWKVDistillForCausalLM
from models.hf_tokenizer import llama2c_to_hf
from models.student import StudentLM

REPO = Path(__file__).resolve().parents[1]
# our module -> its file name in the folder (the rest keep their own, without the package)
RENAMED = {"models.hf_model": "modeling_rwkv_distill", "models.hf_config": "configuration_rwkv_distill",
           "kernels": "kernels"}
AUTO_MAP = {"AutoConfig": "configuration_rwkv_distill.RWKVDistillConfig",
            "AutoModelForCausalLM": "modeling_rwkv_distill.RWKVDistillForCausalLM"}
_FROM = re.compile(r"^(\s*)from (models|kernels)((?:\.\w+)?) import ", re.M)
_IMPORT_KERNELS = re.compile(r"^(\s*)import kernels\s*$", re.M)


def exported_name(module: str) -> str:
    """models.student -> student; kernels (the package) -> kernels; hf_model -> modeling_rwkv_distill."""
    return RENAMED.get(module, module.split(".")[-1])


def project_imports(source: str) -> set[str]:
    """The models.* / kernels* modules a source file imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        found |= {n for n in names if n and n.split(".")[0] in ("models", "kernels")}
    return found


def source_modules() -> dict[str, Path]:
    """Every module the folder needs -> its source file: what hf_model imports, transitively, plus
    all of kernels/."""
    modules = {f"kernels.{p.stem}" if p.stem != "__init__" else "kernels": p
               for p in sorted((REPO / "kernels").glob("*.py"))}
    todo = ["models.hf_model"]
    while todo:
        name = todo.pop()
        if name in modules:
            continue
        modules[name] = REPO / (name.replace(".", "/") + ".py")
        todo += [m for m in project_imports(modules[name].read_text()) if m.startswith("models.")]
    names = [exported_name(m) for m in modules]
    assert len(set(names)) == len(names), f"two source files would share a name in the folder: {names}"
    return modules


def relative_imports(source: str) -> str:
    """source with every import of models.* / kernels* made relative to the folder's package."""
    def rewrite(match: re.Match) -> str:
        indent, package, sub = match.groups()
        if package == "kernels" and not sub:  # `from kernels import x`: a sibling module
            return f"{indent}from . import "
        return f"{indent}from .{exported_name(package + sub)} import "

    out = _IMPORT_KERNELS.sub(r"\1from . import kernels", _FROM.sub(rewrite, source))
    left = project_imports(out)
    assert not left, f"absolute project imports left after the rewrite: {left}"
    return out


def manifest(stems: list[str]) -> str:
    lines = "".join(f"    from .{stem} import *  # noqa: F401,F403\n" for stem in sorted(stems))
    return ("\n\n# Written by distill-export: names every file of this folder, so that transformers copies them\n"
            "# all into its module cache (the Triton ones are imported only when triton and CUDA are there).\n"
            "from typing import TYPE_CHECKING  # noqa: E402\n\nif TYPE_CHECKING:\n" + lines)


def write_code(out: Path) -> list[str]:
    """The folder's .py files; returns their names."""
    written = {}
    for module, path in source_modules().items():
        written[exported_name(module)] = relative_imports(path.read_text())
    modeling = RENAMED["models.hf_model"]
    written[modeling] += manifest([s for s in written if s != modeling])
    for stem, text in written.items():
        (out / f"{stem}.py").write_text(text)
    return [f"{stem}.py" for stem in sorted(written)]


def check_rotary(student: StudentLM, rebuilt: nn.Module) -> None:
    """The rotary embedding rebuilt from the teacher's config must give the training-time cos/sin."""
    x = torch.zeros(1, 1, dtype=torch.float32)
    positions = torch.arange(4096)[None]  # [1, T]
    for got, want in zip(rebuilt(x, positions), student.rotary_emb(x, positions), strict=True):
        if not torch.equal(got, want):
            raise ValueError(f"the teacher's rotary embedding ({type(student.rotary_emb).__name__}) cannot be rebuilt "
                             "from its config: its cos/sin differ from the student's copy")


def hf_tokenizer(tokenizer: Any) -> PreTrainedTokenizerBase:
    """The teacher's tokenizer as a Hugging Face one (a llama2.c tokenizer is converted)."""
    return tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else llama2c_to_hf(tokenizer)


def generation_config(teacher: nn.Module, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """The teacher's generation settings, with a pad token (generate warns and guesses without one)."""
    config = GenerationConfig.from_dict(teacher.generation_config.to_dict())
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return config


def hf_config(student: StudentLM, teacher: nn.Module, tokenizer: PreTrainedTokenizerBase,
              provenance: dict[str, Any]) -> RWKVDistillConfig:
    rotary = student.rotary_emb
    return RWKVDistillConfig(
        student=dataclasses.asdict(student.config), teacher_shape=dataclasses.asdict(student.shape),
        teacher_config=teacher.config.to_dict(), rotary_class=f"{type(rotary).__module__}.{type(rotary).__name__}",
        distill=provenance, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, architectures=[RWKVDistillForCausalLM.__name__], auto_map=AUTO_MAP)


def write_hf(student: StudentLM, teacher: nn.Module, tokenizer: Any, out: Path, dtype: torch.dtype,
             provenance: dict[str, Any]) -> list[str]:
    """Write the folder into out (existing, empty); returns the files written."""
    tokenizer = hf_tokenizer(tokenizer)
    model = RWKVDistillForCausalLM(hf_config(student, teacher, tokenizer, provenance))
    check_rotary(student, model.student.rotary_emb)
    model.student.load_state_dict(student.state_dict())
    model.generation_config = generation_config(teacher, tokenizer)
    model.to(dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_code(out)
    return sorted(p.name for p in out.iterdir())
