"""distill-generate: streams the same greedy text from a format=hf folder and from its ONNX step,
reports speed and memory, and refuses bad arguments with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from distill.generate import GenerateConfig, generate, main, parse, prompt_ids
from tests.distill.helpers import REPO

NEW_TOKENS = 40


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.generate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def folder_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


def test_hf_and_onnx_print_the_same_greedy_text_as_the_student(exported_student):
    student, onnx_folder, hf_folder = exported_student
    runs = {name: cli(str(folder), "prompt=ROMEO:", f"max_new_tokens={NEW_TOKENS}", "stop_at_eos=false")
            for name, folder in (("hf", hf_folder), ("onnx", onnx_folder), ("int8", onnx_folder / "model.int8.onnx"))}
    for name, run in runs.items():
        assert run.returncode == 0, (name, run.stderr[-2000:])
        assert "tokens/s" in run.stderr and "peak resident memory" in run.stderr, run.stderr[-500:]
    assert runs["hf"].stdout == runs["onnx"].stdout
    tokenizer = folder_tokenizer(hf_folder)
    ids = prompt_ids(tokenizer, "ROMEO:")  # BOS + the prompt
    want = student.generate(ids, NEW_TOKENS)[0, ids.shape[1]:].tolist()
    text = tokenizer.decode(want, skip_special_tokens=True)
    assert runs["hf"].stdout.startswith("ROMEO:" + text)
    assert runs["int8"].stdout.startswith("ROMEO:") and len(runs["int8"].stdout) > len("ROMEO:")


def test_generation_returns_its_numbers_and_sampling_follows_the_seed(exported_student, capsys):
    _, onnx_folder, hf_folder = exported_student
    runs = [generate(GenerateConfig(model=str(folder), prompt="ROMEO:", max_new_tokens=16, temperature=0.8, seed=seed,
                                    stop_at_eos=False))
            for folder, seed in ((hf_folder, 1), (hf_folder, 1), (onnx_folder, 1), (hf_folder, 2))]
    assert runs[0]["tokens"] == runs[1]["tokens"] == runs[2]["tokens"]  # same seed, same logits -> same samples
    assert runs[3]["tokens"] != runs[0]["tokens"]
    for run in runs:
        assert len(run["tokens"]) == 16 and run["tokens_per_second"] > 0 and run["peak_rss_bytes"] > 2**20
    hf, onnx = runs[0], runs[2]
    assert hf["state_bytes"] == onnx["state_bytes"] > 0  # the same fixed-size WKV state, both runtimes
    assert capsys.readouterr().out.startswith("ROMEO:")


@pytest.mark.parametrize("args, message", [
    ([], "MODEL (an exported folder or .onnx file) must come first"),
    (["prompt=x"], "MODEL (an exported folder or .onnx file) must come first"),
    (["/no/such/folder"], "MODEL='/no/such/folder': no such file or directory"),
    (["{hf}", "temprature=0.5"], "unknown argument 'temprature=0.5'; usage: distill-generate MODEL"),
    (["{hf}", "max_new_tokens=ten"], "max_new_tokens='ten' is not a valid int"),
    (["{hf}", "stop_at_eos=maybe"], "stop_at_eos='maybe' is not a boolean"),
    (["{hf}", "onnx=int4"], "onnx='int4' is not one of ('fp32', 'int8')"),
    (["{tmp}"], "is neither a distill-export folder"),
])
def test_bad_arguments_are_one_clear_line(exported_student, tmp_path, capsys, args, message):
    _, _, hf_folder = exported_student
    args = [a.format(hf=hf_folder, tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_parse_types_every_key():
    cfg = parse(["m", "prompt=a b=c", "max_new_tokens=5", "temperature=0.5", "seed=3", "onnx=int8", "stop_at_eos=false"])
    assert cfg == GenerateConfig(model="m", prompt="a b=c", max_new_tokens=5, temperature=0.5, seed=3, onnx="int8",
                                 stop_at_eos=False)
