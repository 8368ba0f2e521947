"""The engine-parity check: two greedy answers agree, or part only where the other engine saw a tie.

Random tiny weights leave some steps with top-two margins of a few 1e-7, where two correct engines may round
either way; an adapter bug (a wrong mask, a shifted prompt id) moves logits by far more. So at the first step
where the answers differ, the other engine, teacher-forced along the reference answer, must rate the
reference's token within TIE of its own best. TIE is 100 times the largest gap measured between transformers
and vLLM on the same token (9.5e-7 in log-probability over 12 prompts x 32 steps, benchmarks/engine_parity.py).
"""

from __future__ import annotations

from collections.abc import Sequence

TIE = 1e-4


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    step = next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if step is None and len(a) != len(b):
        return min(len(a), len(b))
    return step


def parity_problem(reference: Sequence[int], other: Sequence[int], forced: Sequence[dict[int, float]],
                   expected: Sequence[float] | None = None, tie: float = TIE) -> str | None:
    """None when `other` equals `reference` or parts from it on a tie; else what is wrong.

    `forced[k]`: the other engine's log-probabilities at answer step k, teacher-forced along `reference`
    (at least its best token and the reference's token). `expected[k]`, when given: the reference engine's own
    log-probability of its token at step k; the two must then agree within `tie` at every step, which catches
    a bug that happens not to change the greedy tokens (a mask hiding a few prompt positions).
    """
    for step, (token, mine) in enumerate(zip(reference, expected or ())):
        theirs = forced[step].get(token, float("-inf")) if step < len(forced) else float("-inf")
        if abs(theirs - mine) > tie:
            return (f"step {step}: the engines rate token {token} {abs(theirs - mine):.3g} apart in "
                    f"log-probability, more than a tie ({tie:g})")
    step = first_difference(reference, other)
    if step is None:
        return None
    if step >= len(reference) or step >= len(forced):
        return f"the answers differ in length at step {step}"
    seen = forced[step]
    best = max(seen.values())
    mine = seen.get(reference[step], float("-inf"))
    if best - mine <= tie:
        return None
    return (f"step {step}: the reference's token {reference[step]} is {best - mine:.3g} below the other engine's "
            f"best, more than a tie ({tie:g})")
