"""What the console entry points share: config resolvers, user-error handling, the summary table."""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("distill")

# Absolute, so the console scripts find the configs however they are started (Hydra would read a
# relative config_path as a Python package when the caller is an installed entry point).
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# Mistakes a user can fix from the command line: shown as one line, not a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)


def package_dir(name: str) -> str:
    """Directory of an importable package: lets configs name files shipped with the code."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ValueError(f"${{package_dir:{name}}}: no importable package named {name!r}")
    return str(Path(spec.origin).parent)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("package_dir"):
        OmegaConf.register_new_resolver("package_dir", package_dir)


def user_error(error: BaseException) -> BaseException | None:
    """The user error behind `error`, if any (hydra.utils.instantiate wraps what a target raises)."""
    while error is not None:
        if isinstance(error, USER_ERRORS):
            return error
        error = error.__cause__
    return None


def run_cli(job: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run a job; a user error exits with status 2 and one clear line on stderr."""
    try:
        return job(cfg)
    except Exception as error:
        cause = user_error(error)
        if cause is None:
            raise
        log.error("%s: %s", type(cause).__name__, cause)
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


def summary_table(summary: dict[str, Any]) -> str:
    """The run's numbers as a small fixed-width table, plus the greedy continuations."""
    rows = [
        ("teacher ppl", f"{summary['teacher_ppl']:.3f}"),
        ("student ppl", f"{summary['student_ppl']:.3f}"),
        ("student/teacher ppl", f"{summary['student_ppl'] / summary['teacher_ppl']:.3f}"),
        ("KL(teacher||student)", f"{summary['kl']:.4f} nats/token"),
        ("top-1 agreement", f"{summary['top1_agreement']:.3f}"),
        ("held-out tokens", f"{summary['eval_tokens']:,}"),
    ]
    if "tokens_seen" in summary:
        rows += [
            ("tokens seen", f"{summary['tokens_seen']:,}"),
            ("train tokens/s", f"{summary['tokens_per_second']:,.0f}"),
            ("wall seconds", f"{summary['wall_seconds']:.1f}"),
        ]
        rows += [(f"stage {s['name']}", f"{s['steps']} steps, {s['tokens']:,} tokens, final loss {s['final_loss']:.4f}")
                 for s in summary["stages"]]
    if "alignment_errors" in summary:
        rows.append(("align error per layer", " ".join(f"{e:.3f}" for e in summary["alignment_errors"])))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    cont = summary.get("continuation")
    if cont:
        lines += ["", f"prompt : {cont['prompt']!r}", f"teacher: {cont['teacher']!r}", f"student: {cont['student']!r}"]
    return "\n".join(lines)
