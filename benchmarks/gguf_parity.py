"""How close the GGUF export on llama.cpp is to transformers in float32, per GGUF type.

    python benchmarks/gguf_parity.py [--model tiny|DIR] [--steps 32]

For 8 chat prompts: transformers' greedy answer (--steps tokens, no stop), then for each type the export loaded with
llama-cpp-python: its own greedy answer (how many tokens before it first parts from transformers') and, teacher-forced
along transformers' answer, the largest gap between the two engines' log-probabilities of the same token. The
smallest top-two margin of transformers' steps says how close to a tie the random weights come.
tests/test_llamacpp.py sets its ties from these gaps.

`--speed` instead times the export's conversion of one MIO-7B MLP matrix (11008 x 4096, bf16, random) per type, and
scales it to the 6.16 B weights of the real-size LLM (reading and writing the files not included).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

QUESTIONS = ["What is in this picture?", "Tell me about the red kite.", "Hi", "mem0", "Numbers like 1, 2, 3",
             "a cat on a blue chair", "the market in the morning", "Tell me a story"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--speed", action="store_true", help="time the conversion of one real-size matrix instead")
    args = parser.parse_args()
    if args.speed:
        speed()
        return
    import llama_cpp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from miocli.core.pipeline import Engine
    from miocli.core.prompts import Prompt, task_prompt_text
    from miocli.core.tasks import TASKS
    from miocli.model.checkpoint import resolve_model
    from miocli.model.devices import RuntimeOptions
    from miocli.model.gguf_export import GGUF_TYPES, export_gguf
    from miocli.model.runtime import Runtime

    folder = resolve_model(args.model)
    steps = args.steps
    engine = Engine(Runtime(RuntimeOptions(model=str(folder), device="cpu", dtype="float32")))
    prompts = engine.encode([Prompt(task_prompt_text(TASKS["chat"], "instruct", {"question": q}, 0), [])
                             for q in QUESTIONS])
    llm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    references = []
    with torch.inference_mode():
        for prompt in prompts:
            out = llm.generate(torch.tensor([prompt]), do_sample=False, num_beams=1, max_new_tokens=steps,
                               min_new_tokens=steps, pad_token_id=0)
            ids = out[0, len(prompt):].tolist()
            logits = llm(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : len(prompt) - 1 + steps]
            references.append((ids, torch.log_softmax(logits.double(), -1).numpy()))
    margin = min(float(np.diff(np.sort(lp, axis=-1)[:, -2:], axis=-1).min()) for _, lp in references)
    print(f"\n### the GGUF export on llama.cpp against transformers float32 ({folder.name}, {len(prompts)} prompts x "
          f"{steps} greedy steps; smallest top-two margin in transformers: {margin:.2g})\n")
    print("| GGUF type | largest log-probability gap, teacher-forced | greedy tokens before the first difference |\n"
          "|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="mio-gguf-") as tmp:
        for kind in GGUF_TYPES[::-1]:
            path = export_gguf(folder, Path(tmp) / f"{kind}.gguf", kind)
            model = llama_cpp.Llama(model_path=str(path), n_ctx=1024, logits_all=True, n_threads=1, verbose=False)
            gap, same = 0.0, 0
            for prompt, (ids, logprobs) in zip(prompts, references):
                model.reset()
                model.eval(prompt)
                answer = []
                for _ in range(steps):
                    answer.append(int(np.argmax(model.scores[model.n_tokens - 1])))
                    model.eval([answer[-1]])
                same += next((n for n, (a, b) in enumerate(zip(answer, ids)) if a != b), steps)
                model.reset()
                model.eval(prompt + ids)
                rows = np.asarray(model.scores[len(prompt) - 1 : len(prompt) - 1 + steps], dtype=np.float64)
                theirs = rows - np.logaddexp.reduce(rows, axis=-1, keepdims=True)
                gap = max(gap, float(np.abs(theirs - logprobs).max()))
            model.close()
            print(f"| {kind} | {gap:.2g} | {same} of {len(prompts) * steps} |")


def speed() -> None:
    import time

    import gguf
    import torch

    from miocli.model.gguf_export import _Plan

    plan = _Plan(gguf, {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 4}, "q4_0")
    weights = (torch.randn(11008, 4096, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    print("\n### converting one 11008 x 4096 bf16 matrix (45.1 M weights), this CPU, one thread of numpy\n")
    print("| GGUF type | seconds | at 6.16 B weights |\n|---|---|---|")
    for kind in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16):
        start = time.perf_counter()
        plan.data("model.layers.0.mlp.up_proj.weight", weights, kind)
        seconds = time.perf_counter() - start
        print(f"| {kind.name} | {seconds:.2f} | {seconds * 6.16e9 / weights.numel() / 60:.1f} min |")


if __name__ == "__main__":
    main()
