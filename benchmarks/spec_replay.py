#!/usr/bin/env python3
"""Which n-gram drafting pays on this machine? A replay of greedy answers (issue 25).

    python benchmarks/spec_replay.py                       # SmolLM2 and Gemma 3, recorded cost curves
    python benchmarks/spec_replay.py --measure-costs       # measure the decode cost curve here first

Speculation with greedy verification emits, per decode, the sampled token plus the drafted tokens
that agree with what plain greedy decoding would have produced.  So how well a drafting method
works is fixed by the greedy answer itself: this script generates each workload answer of
benchmarks/spec_bench.py once with plain greedy decoding, then *replays* it under each drafting
method — at every step the method drafts from the prompt and the answer so far, the accepted
run is the draft's common prefix with the rest of the answer — and prices each step with the
measured cost of decoding ``1 + draft`` tokens at once.  Noise-free (no timing in the replay),
so methods and draft-length policies can be compared exactly; the predicted speed-up is
``tokens x cost(1) / sum(cost(1 + draft))`` (what a single stream gains; prompt evaluation and
the per-step Python work are left out: they are the same with and without drafts).

Methods (llama.cpp's names and defaults, common/ngram-map.cpp, common/ngram-mod.cpp):

* ``ngram-simple n=3`` (pyllama's default lookup: the last 3 tokens' latest earlier occurrence,
  draft what followed it), and ``n=12`` (llama-server's default ``--spec-ngram-simple-size-n``);
* ``ngram-map-k``: the same lookup through a key map, each key's draft capped by how many of its
  last draft were accepted (llama.cpp's key-only map; n=12 and n=4);
* ``ngram-mod``: a hash of the last 24 tokens -> the token that followed, chained, shared by all
  requests (the table persists across the workload's answers), drafting only runs of >= 48;
* ``oracle``: the answer's own next tokens (always right): the ceiling of any drafting here.

Draft-length policies: a fixed cap L (the best L is reported), and pyllama's engine rule (the
length that maximises expected tokens per ms for the request's acceptance so far, each drafted
token accepted with probability p, independently).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import describe  # noqa: E402
from spec_bench import FREE, GROUNDED  # noqa: E402

#: Decode cost by batch size, ms (one context, position ~300, median of 15), measured on this
#: 2-core Xeon on 2026-12-06 (BENCHMARKS.md, "Speculative decoding, the full round").
RECORDED_COSTS = {
    "smollm2": {1: 14.6, 2: 18.4, 4: 31.7, 8: 54.6, 16: 104.0},
    "gemma3": {1: 1.0, 2: 1.26, 4: 1.54, 8: 2.43, 16: 3.48},   # relative to one token
}
CAPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


# ---------------------------------------------------------------------- costs


class Cost:
    """cost(k): linear interpolation of a measured curve, extended with its last slope."""

    def __init__(self, points: dict) -> None:
        self.ks = sorted(points)
        self.ts = [points[k] for k in self.ks]

    def __call__(self, k: int) -> float:
        ks, ts = self.ks, self.ts
        if k <= ks[0]:
            return ts[0]
        for (k0, t0), (k1, t1) in zip(zip(ks, ts), zip(ks[1:], ts[1:])):
            if k <= k1:
                return t0 + (t1 - t0) * (k - k0) / (k1 - k0)
        slope = (ts[-1] - ts[-2]) / (ks[-1] - ks[-2])
        return ts[-1] + slope * (k - ks[-1])


def straight_line(points: dict) -> Cost:
    """The least-squares line t = a + b k through the curve: what the engine's online fit
    (_spec_cost_model) converges to when it sees decodes of all these sizes."""
    ks = sorted(points)
    mk = sum(ks) / len(ks)
    mt = sum(points[k] for k in ks) / len(ks)
    b = sum((k - mk) * (points[k] - mt) for k in ks) / sum((k - mk) ** 2 for k in ks)
    a = mt - b * mk
    return Cost({1: a + b, 2: a + 2 * b})


def measure_costs(model_path: str, threads: int, reps: int = 15) -> dict:
    """Decode k tokens at position 300 of one sequence, median of `reps`, for k in 1..16."""
    from pyllama import _core

    model = _core.Model(model_path)
    ctx = _core.Context(model, n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads)
    batch = _core.Batch(512, 1)
    base = 300
    batch.add_sequence([1 + (i * 7) % 500 for i in range(base)], 0, 0, logits_last=True)
    ctx.decode(batch)
    out = {}
    for k in (1, 2, 4, 8, 16):
        times = []
        for _ in range(reps):
            batch.clear()
            for j in range(k):
                batch.add(1 + j, base + j, 0, True)
            t0 = time.perf_counter()
            ctx.decode(batch)
            times.append((time.perf_counter() - t0) * 1e3)
            ctx.kv_seq_rm(0, base, -1)
        out[k] = statistics.median(times)
    ctx.close()
    model.close()
    return out


# ---------------------------------------------------------------------- drafting methods


def _latest_match(hist: list, n: int, before: int) -> int:
    """Start of the latest occurrence of hist[-n:] that begins before `before` (-1: none)."""
    key = hist[-n:]
    for j in range(before - 1, -1, -1):
        if hist[j:j + n] == key:
            return j
    return -1


class NgramSimple:
    """The latest earlier occurrence of the last n tokens; draft what followed it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.name = f"ngram-simple n={n}"

    def begin(self, prompt: list) -> None:
        pass

    def draft(self, hist: list, cap: int) -> list:
        n = self.n
        if len(hist) <= n:
            return []
        j = _latest_match(hist, n, len(hist) - n)
        return hist[j + n:j + n + cap] if j >= 0 else []

    def accept(self, n_accepted: int) -> None:
        pass


class NgramMapK(NgramSimple):
    """llama.cpp's key-only n-gram map: as ngram-simple, but each key remembers how many tokens
    of its last draft were accepted and drafts no more than that next time (m=48 at first)."""

    def __init__(self, n: int, m: int = 48) -> None:
        super().__init__(n)
        self.m = m
        self.name = f"ngram-map-k n={n}"
        self.accepted_by_key: dict = {}
        self.last_key = None

    def begin(self, prompt: list) -> None:
        self.accepted_by_key = {}
        self.last_key = None

    def draft(self, hist: list, cap: int) -> list:
        self.last_key = None
        n = self.n
        if len(hist) <= n:
            return []
        j = _latest_match(hist, n, len(hist) - n)
        if j < 0:
            return []
        key = tuple(hist[-n:])
        self.last_key = key
        length = min(cap, self.m, self.accepted_by_key.get(key, self.m))
        return hist[j + n:j + n + length]

    def accept(self, n_accepted: int) -> None:
        if self.last_key is not None:
            self.accepted_by_key[self.last_key] = n_accepted


class NgramMod:
    """llama.cpp's ngram-mod: hash(last n_match tokens) -> the next token, one table shared by
    every request; a draft is the chain of lookups, kept only when at least n_min long."""

    def __init__(self, n_match: int = 24, n_min: int = 48, n_max: int = 64) -> None:
        self.n, self.n_min, self.n_max = n_match, n_min, n_max
        self.name = f"ngram-mod n={n_match} min={n_min}"
        self.table: dict = {}
        self.i_last = 0
        self.low = 0
        self.last_len = 0

    def begin(self, prompt: list) -> None:
        n = self.n
        for i in range(len(prompt) - n):
            self.table[tuple(prompt[i:i + n])] = prompt[i + n]
        self.i_last = max(0, len(prompt) - n)

    def draft(self, hist: list, cap: int) -> list:
        n = self.n
        self.last_len = 0
        if len(hist) < n:
            return []
        if self.i_last + 32 < len(hist):
            for i in range(self.i_last, len(hist) - n):
                self.table[tuple(hist[i:i + n])] = hist[i + n]
            self.i_last = len(hist) - n
        window = hist[-n:]
        out: list = []
        for i in range(self.n_max):
            tok = self.table.get(tuple(window))
            if tok is None:
                if i < self.n_min:
                    return []
                break
            out.append(tok)
            window = window[1:] + [tok]
        out = out[:cap]
        self.last_len = len(out)
        return out

    def accept(self, n_accepted: int) -> None:
        if self.last_len:
            if n_accepted / self.last_len < 0.25:
                self.low += 1
                if self.low >= 5:
                    self.table.clear()
                    self.low = 0
                    self.i_last = 0
            else:
                self.low = 0


class Oracle:
    name = "oracle (always right)"

    def __init__(self, answer_of: dict) -> None:
        self.answer_of = answer_of
        self.future: list = []

    def begin(self, prompt: list) -> None:
        self.n_prompt = len(prompt)
        self.future = self.answer_of[tuple(prompt)]

    def draft(self, hist: list, cap: int) -> list:
        i = len(hist) - self.n_prompt
        return list(self.future[i:i + cap])

    def accept(self, n_accepted: int) -> None:
        pass


# ---------------------------------------------------------------------- the replay


class FixedCap:
    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.name = f"cap {cap}"

    def length(self) -> int:
        return self.cap

    def update(self, drafted: int, accepted: int) -> None:
        pass


class EngineRule:
    """pyllama's _spec_draft_len: maximise (expected tokens) / cost(1 + d), each drafted token
    accepted with p = (accepted + 1) / (accepted + rejections + 2); a probe every 32 skips."""

    name = "engine rule"

    def __init__(self, cost: Cost, limit: int = 16, model: "Cost | None" = None) -> None:
        # `model`: the cost the rule believes (the engine's online straight-line fit), when it
        # differs from the true `cost` the replay charges
        self.cost, self.limit = (model or cost), limit
        self.accepted = self.rejections = self.skips = 0

    def length(self) -> int:
        p = (self.accepted + 1.0) / (self.accepted + self.rejections + 2.0)
        best, best_d, expected, pk = 1.0 / self.cost(1) * 1.02, 0, 1.0, 1.0
        for d in range(1, self.limit + 1):
            pk *= p
            expected += pk
            rate = expected / self.cost(1 + d)
            if rate > best:
                best, best_d = rate, d
        if best_d == 0:
            self.skips += 1
            if self.skips >= 32:
                self.skips = 0
                return 1
        return best_d

    def update(self, drafted: int, accepted: int) -> None:
        self.accepted += accepted
        if accepted < drafted:
            self.rejections += 1


def replay(method_factory, policy_factory, cases: list, cost: Cost) -> dict:
    """Replay every (prompt, answer) under a fresh method (whose state, ngram-mod's shared
    table, lives across the answers of this one replay); one policy object per answer (as the
    engine keeps acceptance per request).  Returns tokens, steps, drafted, accepted, cost."""
    method = method_factory()
    tot = {"tokens": 0, "steps": 0, "drafted": 0, "accepted": 0, "cost": 0.0, "plain": 0.0}
    for prompt, answer in cases:
        method.begin(prompt)
        policy = policy_factory()
        # the first token comes from the prompt's evaluation: drafting starts after it
        i = 1
        while i < len(answer):
            hist = prompt + answer[:i]
            cap = min(policy.length(), len(answer) - i - 1) if len(answer) - i > 1 else 0
            draft = method.draft(hist, cap) if cap > 0 else []
            a = 0
            while a < len(draft) and i + a < len(answer) and draft[a] == answer[i + a]:
                a += 1
            method.accept(a)
            policy.update(len(draft), a)
            tot["steps"] += 1
            tot["drafted"] += len(draft)
            tot["accepted"] += a
            tot["cost"] += cost(1 + len(draft))
            i += a + 1
        tot["tokens"] += len(answer) - 1
        tot["plain"] += (len(answer) - 1) * cost(1)
    tot["speedup"] = tot["plain"] / tot["cost"] if tot["cost"] else 1.0
    return tot


def answers(model_path: str, prompts: list, max_tokens: int, threads: int) -> list:
    from pyllama import LLM

    llm = LLM(model_path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    try:
        out = []
        for text in prompts:
            messages = [{"role": "user", "content": text}]
            prompt = list(llm.chat_tokens(messages))
            comp = llm.chat(messages, max_tokens=max_tokens, temperature=0.0)
            out.append((prompt, list(comp.tokens)))
        return out
    finally:
        llm.close()


def main() -> int:
    from pyllama.models import model_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measure-costs", action="store_true",
                        help="measure the decode cost curve on this machine (else the recorded one)")
    args = parser.parse_args()
    print(describe())
    for name in args.models.split(","):
        path = str(model_path(name))
        if args.measure_costs:
            points = measure_costs(path, args.threads)
            source = "measured now"
        else:
            points = RECORDED_COSTS[name]
            source = "recorded"
        cost = Cost(points)
        line = straight_line(points)
        curve = ", ".join(f"{k}: {cost(k) / cost(1):.2f}x" for k in (2, 4, 8, 16))
        print(f"\n## {name}: decode cost of k tokens vs one ({source}): {curve}")
        workloads = {"grounded": answers(path, GROUNDED, args.max_tokens, args.threads),
                     "free": answers(path, FREE, args.max_tokens, args.threads)}
        for wl, cases in workloads.items():
            n_tok = sum(len(a) for _p, a in cases)
            print(f"\n### {name}, {wl} ({len(cases)} answers, {n_tok} tokens)\n")
            print("| method | policy | drafted | accepted | acceptance | tokens per decode | predicted speed-up |")
            print("|---|---|---|---|---|---|---|")
            answer_of = {tuple(p): a for p, a in cases}
            methods = [lambda: NgramSimple(3), lambda: NgramSimple(4), lambda: NgramSimple(12),
                       lambda: NgramMapK(3), lambda: NgramMapK(4), lambda: NgramMapK(12),
                       lambda: NgramMod(), lambda: NgramMod(12, 1, 64), lambda: Oracle(answer_of)]
            for factory in methods:
                method = factory()
                rows = [(f"cap {c}", replay(factory, lambda c=c: FixedCap(c), cases, cost)) for c in CAPS]
                best_name, best = max(rows, key=lambda r: r[1]["speedup"])
                rule = replay(factory, lambda: EngineRule(cost), cases, cost)
                linear = replay(factory, lambda: EngineRule(cost, model=line), cases, cost)
                for policy, r in ((f"best fixed ({best_name})", best), ("engine rule", rule),
                                  ("engine rule, straight-line cost", linear)):
                    acc = r["accepted"] / r["drafted"] if r["drafted"] else 0.0
                    print(f"| {method.name} | {policy} | {r['drafted']} | {r['accepted']} | {acc:.0%} | "
                          f"{r['tokens'] / r['steps']:.2f} | {r['speedup']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
