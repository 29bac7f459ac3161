"""Every sampling parameter reaches the llama.cpp sampler chain it should (issue 19).

Two kinds of checks, both through the path a user takes (``LLM(...).complete(...)`` and
``SamplingParams``):

* structure: the stages (``SamplerChain.names`` / ``stage_params``) of the chain a call
  really ran with, in order, with the values llama.cpp was handed where the chain records
  them (penalties), and the chain's seed.  LLM has no public way to show the chain a call
  built, so ``llm_chain`` below wraps ``LLM._request`` (which builds each request through
  ``pyllama.sampling.build_chain``) and reads ``GenerationRequest.sampler``;
  ``build_chain`` itself is checked with the same table.
* values: ``stage_params`` records what each stage was handed (k, p, temperature, seed,
  tau/eta, the bias map, penalty windows), and the table below checks every value a
  setting implies.  Beyond that, what the stages *do* with their values is checked by
  behaviour: the model here has all-zero output weights (every logit is 0 at every step), so a
  ``logit_bias`` alone sets the distribution each token is drawn from, and one completion
  of N tokens is N independent draws from it (no penalties).  The sets of tokens that can
  come out are worked out from llama.cpp's sampler code (vendor/llama.cpp/src/llama-sampler.cpp)
  and compared exactly: a parameter that were ignored, or mapped to another value, gives
  another set.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest

from pyllama import LLM
from pyllama.sampling import SamplingParams, build_chain

THREADS = 1   # a tiny model decodes ~10x faster on one thread when the cores are busy
N_CTX = 1024
PROMPT = "x"   # not one of the tokens below, so it never counts as a repetition

# Ordinary (non-control) tokens of the llama SPM vocabulary the tiny model uses.
T = [1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007]
BASE = 40.0    # every other token has logit 0: e**-40 each, never drawn

# Everything neutral except what a test sets: a plain "temp 1 -> dist" chain.
NEUTRAL = dict(top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, temperature=1.0)
DEFAULT_CHAIN = ["top-k", "top-p", "min-p", "temp", "dist"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def flat_model(tiny_model_factory):
    """A tiny llama whose logits are all exactly 0 (output weights scaled by 0)."""
    return tiny_model_factory(output_scale=0.0)


@pytest.fixture(scope="module")
def llm(flat_model):
    with LLM(flat_model, n_ctx=N_CTX, n_threads=THREADS) as llm:
        yield llm


@pytest.fixture(scope="module")
def llm_chain():
    """chains(llm, call) -> (result of call(), [GenerationRequest, ...] it built)."""

    def run(llm, call):
        built = []
        original = LLM._request

        def spy(self, *args, **kwargs):
            req = original(self, *args, **kwargs)
            built.append(req)
            return req

        llm._request = spy.__get__(llm)
        try:
            result = call()
        finally:
            del llm._request
        return result, built

    return run


def stages_of(llm, llm_chain, **kwargs):
    """The request LLM.complete built for these sampling settings (one token generated)."""
    _, built = llm_chain(llm, lambda: llm.complete(PROMPT, max_tokens=1, **kwargs))
    assert len(built) == 1
    return built[0]


def bias_for(probs, base=BASE):
    """A logit_bias giving T[0], T[1], ... the probabilities `probs` (everything else ~0)."""
    return {T[i]: base + math.log(p) for i, p in enumerate(probs)}


def draws(llm, probs, n=150, seed=1234, **kwargs):
    """n tokens drawn with the distribution `probs` over T[:len(probs)], as indices into T."""
    settings = dict(NEUTRAL, logit_bias=bias_for(probs), seed=seed)
    settings.update(kwargs)
    comp = llm.complete(PROMPT, max_tokens=n, **settings)
    assert len(comp.tokens) == n, comp.finish_reason
    assert set(comp.tokens) <= set(T[:len(probs)]), "a token outside the biased set was drawn"
    return [T.index(t) for t in comp.tokens]


def first_draws(llm, probs, seeds=range(30), n=1, **kwargs):
    """For each seed a fresh chain: the first n tokens drawn (as indices into T)."""
    return [tuple(draws(llm, probs, n=n, seed=s, **kwargs)) for s in seeds]


FOUR = [0.4, 0.3, 0.2, 0.1]


# --------------------------------------------------------------------------- structure: stage table

PEN = {"last_n": 64, "repeat": 1.0, "frequency": 0.0, "presence": 0.0}

# (settings, stage names of the chain, parameters of the stages that record them)
CASES = [
    pytest.param({}, DEFAULT_CHAIN, {}, id="defaults"),
    pytest.param({"temperature": 0}, ["greedy"], {}, id="temperature-0-greedy"),
    pytest.param({"temperature": 0, "top_k": 5, "top_p": 0.5, "min_p": 0.5, "typical_p": 0.5},
                 ["greedy"], {}, id="greedy-ignores-truncation"),
    pytest.param({"temperature": 0.0, "logit_bias": {5: 1.0}}, ["logit-bias", "greedy"], {}, id="greedy-bias"),
    pytest.param({"temperature": 1.5}, DEFAULT_CHAIN, {}, id="temperature"),
    pytest.param({"top_k": 0}, ["top-p", "min-p", "temp", "dist"], {}, id="top_k-0-off"),
    pytest.param({"top_k": 7}, DEFAULT_CHAIN, {}, id="top_k"),
    pytest.param({"top_p": 1.0}, ["top-k", "min-p", "temp", "dist"], {}, id="top_p-1-off"),
    pytest.param({"top_p": 0.5}, DEFAULT_CHAIN, {}, id="top_p"),
    pytest.param({"min_p": 0.0}, ["top-k", "top-p", "temp", "dist"], {}, id="min_p-0-off"),
    pytest.param({"min_p": 0.25}, DEFAULT_CHAIN, {}, id="min_p"),
    pytest.param({"typical_p": 0.5}, ["top-k", "typical", "top-p", "min-p", "temp", "dist"], {}, id="typical_p"),
    pytest.param({"typical_p": 1.0}, DEFAULT_CHAIN, {}, id="typical_p-1-off"),
    pytest.param(NEUTRAL, ["temp", "dist"], {}, id="all-truncation-off"),
    pytest.param({"repeat_penalty": 1.25}, ["penalties", *DEFAULT_CHAIN],
                 {"penalties": dict(PEN, repeat=1.25)}, id="repeat_penalty"),
    pytest.param({"frequency_penalty": 0.5}, ["penalties", *DEFAULT_CHAIN],
                 {"penalties": dict(PEN, frequency=0.5)}, id="frequency_penalty"),
    pytest.param({"presence_penalty": -0.75}, ["penalties", *DEFAULT_CHAIN],
                 {"penalties": dict(PEN, presence=-0.75)}, id="presence_penalty"),
    pytest.param({"repeat_penalty": 1.5, "frequency_penalty": 0.25, "presence_penalty": 0.125,
                  "last_n_tokens_size": 16}, ["penalties", *DEFAULT_CHAIN],
                 {"penalties": {"last_n": 16, "repeat": 1.5, "frequency": 0.25, "presence": 0.125}},
                 id="all-penalties"),
    pytest.param({"repeat_penalty": 1.25, "last_n_tokens_size": 0}, ["penalties", *DEFAULT_CHAIN],
                 {"penalties": dict(PEN, repeat=1.25, last_n=0)}, id="last_n-0"),
    pytest.param({"repeat_penalty": 1.25, "last_n_tokens_size": -1}, ["penalties", *DEFAULT_CHAIN],
                 {"penalties": dict(PEN, repeat=1.25, last_n="n_ctx")}, id="last_n-minus-1-whole-context"),
    pytest.param({"last_n_tokens_size": 16}, DEFAULT_CHAIN, {}, id="last_n-alone-no-penalty"),
    pytest.param({"mirostat_mode": 1}, ["temp", "mirostat"], {}, id="mirostat-1"),
    pytest.param({"mirostat_mode": 2}, ["temp", "mirostat-v2"], {}, id="mirostat-2"),
    pytest.param({"mirostat_mode": 2, "temperature": 0}, ["temp", "mirostat-v2"], {}, id="mirostat-at-temperature-0"),
    pytest.param({"mirostat_mode": 1, "repeat_penalty": 1.25, "logit_bias": {7: -math.inf}},
                 ["logit-bias", "penalties", "temp", "mirostat"], {"penalties": dict(PEN, repeat=1.25)},
                 id="mirostat-with-bias-and-penalties"),
    pytest.param({"logit_bias": {7: 2.0}}, ["logit-bias", *DEFAULT_CHAIN], {}, id="logit_bias"),
    pytest.param({"logit_bias": {}}, DEFAULT_CHAIN, {}, id="logit_bias-empty"),
    pytest.param({"ignore_eos": True}, ["logit-bias", *DEFAULT_CHAIN], {}, id="ignore_eos"),
    pytest.param({"logit_bias": {7: 2.0}, "repeat_penalty": 1.25, "typical_p": 0.5},
                 ["logit-bias", "penalties", "top-k", "typical", "top-p", "min-p", "temp", "dist"],
                 {"penalties": dict(PEN, repeat=1.25)}, id="full-order"),
    # llama.cpp's newer samplers, in llama.cpp's order: penalties, DRY, top-n-sigma, top-k,
    # typical, top-p, min-p, XTC, temperature (dynamic: temp-ext)
    pytest.param({"top_n_sigma": 1.5}, ["top-n-sigma", *DEFAULT_CHAIN], {"top-n-sigma": {"n": 1.5}},
                 id="top_n_sigma"),
    pytest.param({"top_n_sigma": 0.0}, DEFAULT_CHAIN, {}, id="top_n_sigma-0-off"),
    pytest.param({"xtc_probability": 0.5, "xtc_threshold": 0.25}, ["top-k", "top-p", "min-p", "xtc", "temp", "dist"],
                 {}, id="xtc"),
    pytest.param({"xtc_probability": 0.0}, DEFAULT_CHAIN, {}, id="xtc-0-off"),
    pytest.param({"xtc_probability": 0.5, "xtc_threshold": 0.75}, DEFAULT_CHAIN, {}, id="xtc-threshold-over-half-off"),
    pytest.param({"dynatemp_range": 0.5, "dynatemp_exponent": 2.0}, ["top-k", "top-p", "min-p", "temp-ext", "dist"],
                 {}, id="dynatemp"),
    pytest.param({"dry_multiplier": 0.5}, ["dry", *DEFAULT_CHAIN], {}, id="dry"),
    pytest.param({"dry_multiplier": 0.5, "dry_base": 2.0, "dry_allowed_length": 3, "dry_penalty_last_n": -1,
                  "dry_sequence_breakers": ["\n", "zz"]}, ["dry", *DEFAULT_CHAIN],
                 {"dry": {"multiplier": 0.5, "base": 2.0, "allowed_length": 3, "last_n": "n_ctx",
                          "seq_breakers": ["\n", "zz"]}}, id="dry-all-settings"),
    pytest.param({"dry_multiplier": 0.5, "dry_penalty_last_n": 0}, DEFAULT_CHAIN, {}, id="dry-last_n-0-off"),
    pytest.param({"dry_multiplier": 0.0, "dry_base": 3.0}, DEFAULT_CHAIN, {}, id="dry-multiplier-0-off"),
    pytest.param({"temperature": 0, "dry_multiplier": 0.5, "top_n_sigma": 1.0, "xtc_probability": 1.0,
                  "dynatemp_range": 0.5}, ["dry", "greedy"], {}, id="greedy-keeps-dry-only"),
    pytest.param({"logit_bias": {7: 2.0}, "repeat_penalty": 1.25, "dry_multiplier": 0.5, "top_n_sigma": 2.0,
                  "typical_p": 0.5, "xtc_probability": 0.5, "xtc_threshold": 0.25, "dynatemp_range": 0.5},
                 ["logit-bias", "penalties", "dry", "top-n-sigma", "top-k", "typical", "top-p", "min-p", "xtc",
                  "temp-ext", "dist"], {"penalties": dict(PEN, repeat=1.25)}, id="full-order-new-samplers"),
]


def _expected_params(expected, n_ctx):
    out = {}
    for stage, params in expected.items():
        out[stage] = {k: (n_ctx if v == "n_ctx" else v) for k, v in params.items()}
    return out


def _implied_params(name, sp, eog):
    """The parameters a stage must have been handed for the effective SamplingParams `sp`."""
    seed = 0xFFFFFFFF if sp.seed in (None, -1) else sp.seed
    if name == "top-k":
        return {"k": sp.top_k}
    if name in ("top-p", "min-p", "typical"):
        p = {"top-p": sp.top_p, "min-p": sp.min_p, "typical": sp.typical_p}[name]
        return {"p": pytest.approx(p, rel=1e-6), "min_keep": 1}
    if name == "temp":
        return {"t": pytest.approx(sp.temperature, rel=1e-6)}
    if name == "dist":
        return {"seed": seed}
    if name == "mirostat":
        return {"seed": seed, "tau": pytest.approx(sp.mirostat_tau, rel=1e-6),
                "eta": pytest.approx(sp.mirostat_eta, rel=1e-6), "m": 100}
    if name == "mirostat-v2":
        return {"seed": seed, "tau": pytest.approx(sp.mirostat_tau, rel=1e-6),
                "eta": pytest.approx(sp.mirostat_eta, rel=1e-6)}
    if name == "top-n-sigma":
        return {"n": pytest.approx(sp.top_n_sigma, rel=1e-6)}
    if name == "xtc":
        return {"p": pytest.approx(sp.xtc_probability, rel=1e-6), "t": pytest.approx(sp.xtc_threshold, rel=1e-6),
                "min_keep": 1, "seed": seed}
    if name == "temp-ext":
        return {"t": pytest.approx(sp.temperature, rel=1e-6), "delta": pytest.approx(sp.dynatemp_range, rel=1e-6),
                "exponent": pytest.approx(sp.dynatemp_exponent, rel=1e-6)}
    if name == "dry":
        return {"multiplier": pytest.approx(sp.dry_multiplier, rel=1e-6), "base": pytest.approx(sp.dry_base, rel=1e-6),
                "allowed_length": sp.dry_allowed_length, "last_n": sp.dry_penalty_last_n,
                "seq_breakers": list(sp.dry_sequence_breakers)}
    if name == "logit-bias":
        bias = {int(t): float(b) for t, b in (sp.logit_bias or {}).items()}
        if sp.ignore_eos:
            bias.update({t: -math.inf for t in eog})
        return {"bias": bias}
    return {}


def _check_chain(chain, names, params, n_ctx, sp=None, eog=()):
    """Stage names in order; the parameters the table lists; with `sp` (the effective
    SamplingParams) every other stage's values too."""
    assert chain.names == names
    assert len(chain) == len(names)
    got = chain.stage_params
    assert [n for n, _ in got] == names
    want = _expected_params(params, n_ctx)
    for name, p in got:
        if name in want or sp is None:
            assert p == want.get(name, {}), name
        else:
            assert p == _implied_params(name, sp, eog), name


@pytest.mark.parametrize("settings,names,params", CASES)
def test_llm_call_builds_stages(llm, llm_chain, settings, names, params):
    req = stages_of(llm, llm_chain, **settings)
    _check_chain(req.sampler, names, params, llm.context.n_ctx_seq, llm.defaults.replace(**settings),
                 _eog(llm))
    assert req.grammar is None


@pytest.mark.parametrize("settings,names,params", CASES)
def test_llm_defaults_build_stages(flat_model, llm_chain, settings, names, params):
    """The same settings given to LLM() as defaults instead of per call."""
    with LLM(flat_model, n_ctx=256, n_threads=THREADS, **settings) as llm:
        req = stages_of(llm, llm_chain)
        _check_chain(req.sampler, names, params, llm.context.n_ctx_seq, SamplingParams(**settings), _eog(llm))


@pytest.mark.parametrize("settings,names,params", CASES)
def test_build_chain_from_sampling_params(llm, settings, names, params):
    eog = _eog(llm)
    chain = build_chain(SamplingParams(**settings), llm.vocab, eog if settings.get("ignore_eos") else (), n_ctx=333)
    _check_chain(chain, names, params, 333, SamplingParams(**settings), eog)


def _eog(llm):
    return [t for t in range(llm.vocab.n_tokens) if llm.vocab.is_eog(t)]


def test_per_call_overrides_defaults(flat_model, llm_chain):
    with LLM(flat_model, n_ctx=256, n_threads=THREADS, temperature=0, repeat_penalty=1.25) as llm:
        assert stages_of(llm, llm_chain).sampler.names == ["penalties", "greedy"]
        req = stages_of(llm, llm_chain, temperature=0.5, repeat_penalty=1.0, top_k=0)
        assert req.sampler.names == ["top-p", "min-p", "temp", "dist"]
        assert stages_of(llm, llm_chain).sampler.names == ["penalties", "greedy"]   # defaults unchanged


def test_last_n_minus_one_is_the_context(llm, llm_chain):
    req = stages_of(llm, llm_chain, repeat_penalty=1.25, last_n_tokens_size=-1)
    assert dict(req.sampler.stage_params)["penalties"]["last_n"] == llm.context.n_ctx_seq == N_CTX


@pytest.mark.parametrize("entry", ["complete", "invoke", "stream", "generate", "generate_stream", "n=2"])
def test_every_entry_point_uses_the_settings(llm, llm_chain, entry):
    kw = dict(max_tokens=1, top_k=0, typical_p=0.5, repeat_penalty=1.5, last_n_tokens_size=8, seed=4321)
    calls = {
        "complete": lambda: llm.complete(PROMPT, **kw),
        "invoke": lambda: llm.invoke(PROMPT, **kw),
        "stream": lambda: list(llm.stream(PROMPT, **kw)),
        "generate": lambda: llm.generate([PROMPT, PROMPT + "y"], **kw),
        "generate_stream": lambda: list(llm.generate_stream([PROMPT, PROMPT + "y"], **kw)),
        "n=2": lambda: llm.complete(PROMPT, n=2, **kw),
    }
    _, built = llm_chain(llm, calls[entry])
    assert built
    for req in built:
        assert req.sampler.names == ["penalties", "typical", "top-p", "min-p", "temp", "dist"]
        assert dict(req.sampler.stage_params)["penalties"] == {"last_n": 8, "repeat": 1.5, "frequency": 0.0,
                                                               "presence": 0.0}


# --------------------------------------------------------------------------- seeds


def test_seed_reaches_dist(llm, llm_chain):
    assert stages_of(llm, llm_chain, seed=1234).sampler.seed == 1234
    assert stages_of(llm, llm_chain, seed=0).sampler.seed == 0
    assert stages_of(llm, llm_chain, seed=0xFFFFFFFE).sampler.seed == 0xFFFFFFFE


@pytest.mark.parametrize("mode", [1, 2])
def test_seed_reaches_mirostat(llm, llm_chain, mode):
    assert stages_of(llm, llm_chain, seed=777, mirostat_mode=mode).sampler.seed == 777


def test_seed_none_is_random(llm, llm_chain):
    seeds = {stages_of(llm, llm_chain, seed=s).sampler.seed for s in (None, None, -1, -1)}
    assert len(seeds) == 4 and 0xFFFFFFFF not in seeds


def test_seed_offsets_for_n(llm, llm_chain):
    _, built = llm_chain(llm, lambda: llm.complete(PROMPT, n=3, max_tokens=1, seed=41))
    assert [r.sampler.seed for r in built] == [41, 42, 43]


def test_seed_fixes_the_draws(llm):
    a = draws(llm, FOUR, n=60, seed=5)
    assert a == draws(llm, FOUR, n=60, seed=5)
    assert a != draws(llm, FOUR, n=60, seed=6)
    assert draws(llm, FOUR, n=60, seed=None) != draws(llm, FOUR, n=60, seed=None)


# --------------------------------------------------------------------------- grammar stages


def test_grammar_builds_a_grammar_stage(llm, llm_chain):
    req = stages_of(llm, llm_chain, grammar='root ::= "a" | "b"')
    assert req.grammar is not None and req.grammar.names == ["grammar"]
    assert req.sampler.names == DEFAULT_CHAIN   # the grammar runs beside the chain, not in it


def test_grammar_path_builds_a_grammar_stage(llm, llm_chain):
    from pyllama.grammar import grammar_path

    assert stages_of(llm, llm_chain, grammar_path=grammar_path("list")).grammar.names == ["grammar"]


def test_json_schema_builds_a_grammar_stage(llm, llm_chain):
    req = stages_of(llm, llm_chain, json_schema={"type": "boolean"})
    assert req.grammar.names == ["grammar"]


def test_no_grammar_without_grammar_settings(llm, llm_chain):
    assert stages_of(llm, llm_chain).grammar is None


def test_grammar_constrains_output(llm):
    """All logits are 0 (greedy would pick token 0): only the grammar makes it "yes"/"no"."""
    for g in ('root ::= "yes" | "no"', 'root ::= "no"'):
        text = llm.complete(PROMPT, grammar=g, temperature=0, max_tokens=8).text
        assert text in ("yes", "no") and (g.count("|") or text == "no"), text
    assert llm.complete(PROMPT, json_schema={"const": "ok"}, temperature=0, max_tokens=8).text == '"ok"'


# --------------------------------------------------------------------------- values: what each stage does


def test_neutral_chain_draws_everything(llm):
    assert set(draws(llm, [1 / 6] * 6)) == set(range(6))


def test_temperature_zero_is_argmax(llm):
    assert set(draws(llm, FOUR, n=40, temperature=0)) == {0}
    assert set(draws(llm, [0.1, 0.9], n=40, temperature=0)) == {1}


@pytest.mark.parametrize("k,expect", [(1, {0}), (3, {0, 1, 2}), (5, {0, 1, 2, 3, 4})])
def test_top_k_value(llm, k, expect):
    near_uniform = [math.exp(-0.1 * i) for i in range(7)]
    assert set(draws(llm, near_uniform, top_k=k)) == expect


@pytest.mark.parametrize("p,expect", [(0.65, {0, 1}), (0.85, {0, 1, 2}), (0.35, {0}), (0.97, {0, 1, 2, 3})])
def test_top_p_value(llm, p, expect):
    # llama.cpp keeps the most likely tokens until their total reaches p: 0.4, 0.7, 0.9, 1.0
    assert set(draws(llm, FOUR, top_p=p)) == expect


@pytest.mark.parametrize("p,expect", [(0.9, {0}), (0.6, {0, 1}), (0.4, {0, 1, 2}), (0.2, {0, 1, 2, 3})])
def test_min_p_value(llm, p, expect):
    # keeps tokens with probability >= p * 0.4
    assert set(draws(llm, FOUR, min_p=p)) == expect


@pytest.mark.parametrize("p,expect", [(0.25, {1}), (0.45, {1, 2}), (0.6, {0, 1, 2}), (0.95, {0, 1, 2, 3})])
def test_typical_p_value(llm, p, expect):
    # Locally typical sampling: entropy H = 1.28 nats; |-ln p - H| orders the tokens
    # 0.3 (0.08), 0.2 (0.33), 0.4 (0.36), 0.1 (1.02); kept until their total exceeds p.
    # The most likely token is not the first kept: no other stage would keep {1}.
    assert set(draws(llm, FOUR, typical_p=p)) == expect


@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0])
def test_temperature_value(llm, temp):
    """The draws' frequencies are best explained by softmax(logits / temp) at the given
    temperature, among temperatures a factor of 2 apart."""
    peaked = [0.7, 0.2, 0.08, 0.02]
    counts = Counter(draws(llm, peaked, n=400, temperature=temp, seed=99))

    def loglik(t):
        w = [p ** (1 / t) for p in peaked]
        return sum(c * math.log(w[i] / sum(w)) for i, c in counts.items())

    assert max([0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0], key=loglik) == temp, counts


def test_truncation_happens_before_temperature(llm):
    # top_k=2 first, then a very high temperature: both survivors, never the others
    got = Counter(draws(llm, FOUR, n=300, top_k=2, temperature=50.0))
    assert set(got) == {0, 1} and min(got.values()) > 100


def test_logit_bias_values(llm):
    # all logits are 0: the bias alone decides, with its exact value
    greedy = dict(temperature=0, max_tokens=5)
    assert set(llm.complete(PROMPT, logit_bias={T[0]: 0.5, T[1]: 0.25}, **greedy).tokens) == {T[0]}
    assert set(llm.complete(PROMPT, logit_bias={T[0]: 0.5, T[1]: 0.75}, **greedy).tokens) == {T[1]}
    # -inf forbids a token
    got = draws(llm, [0.5, 0.5], logit_bias={**bias_for([0.5, 0.5]), T[0]: -math.inf})
    assert set(got) == {1}
    # ratios of probabilities follow the bias: e**1 : 1
    c = Counter(draws(llm, [math.e, 1.0], n=400))
    assert abs(c[0] / 400 - math.e / (1 + math.e)) < 0.05, c


def test_ignore_eos(llm):
    eos = llm.vocab.eos
    bias = {eos: 10.0, T[0]: 5.0}
    comp = llm.complete(PROMPT, logit_bias=bias, temperature=0, max_tokens=6)
    assert comp.tokens == [] and comp.finish_reason == "eog"
    comp = llm.complete(PROMPT, logit_bias=bias, temperature=0, max_tokens=6, ignore_eos=True)
    assert comp.tokens == [T[0]] * 6 and comp.finish_reason == "length"


def _greedy_run(llm, n=12, k=8, **kw):
    """Greedy over T[0..k) with logits 40.0, 39.9, 39.8, ... (the rest 0)."""
    bias = {T[i]: BASE - 0.1 * i for i in range(k)}
    toks = llm.complete(PROMPT, logit_bias=bias, temperature=0, max_tokens=n, **kw).tokens
    return [T.index(t) for t in toks]


def test_repeat_penalty_and_window(llm):
    # A repeated token's logit (~40) is divided by 2: below every token not in the window,
    # so greedy cycles through last_n + 1 tokens.
    assert _greedy_run(llm) == [0] * 12
    assert _greedy_run(llm, repeat_penalty=2.0, last_n_tokens_size=3) == [0, 1, 2, 3] * 3
    assert _greedy_run(llm, repeat_penalty=2.0, last_n_tokens_size=5) == [0, 1, 2, 3, 4, 5] * 2
    assert _greedy_run(llm, repeat_penalty=2.0, last_n_tokens_size=0) == [0] * 12   # 0: off
    # the default window (64) holds all 8: then the penalised T0 (20.0) is the best again
    assert _greedy_run(llm, repeat_penalty=2.0) == list(range(8)) + [0, 0, 0, 0]


def test_frequency_and_presence_penalties(llm):
    # T0: 40.0, T1: 39.9.  presence 0.15 once: T0 -> T1 -> T0 for good (39.85 > 39.75);
    # frequency 0.15 per occurrence: they alternate.
    assert _greedy_run(llm, n=8, k=2, presence_penalty=0.15) == [0, 1, 0, 0, 0, 0, 0, 0]
    assert _greedy_run(llm, n=8, k=2, frequency_penalty=0.15) == [0, 1, 0, 1, 0, 1, 0, 1]
    assert _greedy_run(llm, n=8, k=2, presence_penalty=0.05) == [0] * 8          # 39.95 still wins
    # 40 - 0.04 n stays above 39.9 for n <= 2
    assert _greedy_run(llm, n=8, k=2, frequency_penalty=0.04) == [0, 0, 0, 1, 0, 1, 0, 1]
    # negative penalties reward what was said: T1 never gets a turn
    assert _greedy_run(llm, n=4, k=2, presence_penalty=-1.0) == [0, 0, 0, 0]
    assert _greedy_run(llm, n=4, k=2, frequency_penalty=-1.0, presence_penalty=0.5) == [0, 0, 0, 0]


# --------------------------------------------------------------------------- mirostat


def test_mirostat_v2_tau(llm):
    # mu starts at 2 tau bits; tokens more surprising than mu are cut.  Surprise in bits:
    # 1.32, 1.74, 2.32, 3.32.
    def first(tau):
        return {d[0] for d in first_draws(llm, FOUR, mirostat_mode=2, mirostat_tau=tau)}

    assert first(0.8) == {0}
    assert first(1.0) == {0, 1}
    assert first(1.5) == {0, 1, 2}
    assert first(5.0) == {0, 1, 2, 3}


@pytest.mark.parametrize("eta,expect", [(0.1, {0}), (0.5, {0, 1}), (1.0, {0, 1, 2})])
def test_mirostat_v2_eta(llm, eta, expect):
    # tau 0.8: the first draw is T0, alone after the cut (surprise 0), so mu grows by
    # 0.8 * eta: 1.68, 2.0, 2.4 bits for the second draw.
    got = first_draws(llm, FOUR, n=2, mirostat_mode=2, mirostat_tau=0.8, mirostat_eta=eta)
    assert {d[0] for d in got} == {0}
    assert {d[1] for d in got} == expect


def _mirostat_v1_k(mu, probs=FOUR, n_vocab=32000, m=100):
    """How many tokens llama.cpp's mirostat (v1) keeps at target surprise mu: it fits a
    Zipf exponent s_hat to the m most likely tokens (here the 4 biased ones, then ties)."""
    logits = sorted([BASE + math.log(p) for p in probs] + [0.0] * (m - len(probs)), reverse=True)
    num = den = 0.0
    for i in range(m - 1):
        t = math.log((i + 2) / (i + 1))
        num += t * (logits[i] - logits[i + 1])
        den += t * t
    s_hat = num / den
    eps = s_hat - 1
    return max(int((eps * 2 ** mu / (1 - n_vocab ** -eps)) ** (1 / s_hat)), 1)


@pytest.mark.parametrize("tau,expect", [(0.5, {0}), (5.0, {0, 1}), (6.5, {0, 1, 2}), (8.0, {0, 1, 2, 3})])
def test_mirostat_v1_tau(llm, tau, expect):
    assert set(range(_mirostat_v1_k(2 * tau))) == expect   # k: 1.35, 2.65, 3.3, 4.15
    assert {d[0] for d in first_draws(llm, FOUR, mirostat_mode=1, mirostat_tau=tau)} == expect


@pytest.mark.parametrize("eta,expect", [(2.0, {0}), (14.0, {0, 1}), (30.0, {0, 1, 2, 3})])
def test_mirostat_v1_eta(llm, eta, expect):
    # tau 0.5: the first draw is T0 alone (surprise 0), so mu = 1 + 0.5 eta: 2, 8, 16 bits
    assert set(range(_mirostat_v1_k(1 + 0.5 * eta))) == expect   # k: 1.46, 2.28, 4.15
    got = first_draws(llm, FOUR, n=2, mirostat_mode=1, mirostat_tau=0.5, mirostat_eta=eta)
    assert {d[0] for d in got} == {0}
    assert {d[1] for d in got} == expect


def test_mirostat_ignores_truncation_settings(llm):
    # mirostat picks its own truncation: top_k=1 is not applied
    got = {d[0] for d in first_draws(llm, FOUR, mirostat_mode=2, mirostat_tau=5.0, top_k=1, top_p=0.1)}
    assert got == {0, 1, 2, 3}


# --------------------------------------------------------------------------- top-n-sigma, XTC, dynamic temperature, DRY


def _all_logits(llm, probs):
    """Every logit the chain sees for draws(llm, probs): 0, plus the bias on T[:len(probs)]."""
    logits = [0.0] * llm.vocab.n_tokens
    for i, p in enumerate(probs):
        logits[T[i]] = BASE + math.log(p)
    return logits


def _top_n_sigma_kept(logits, n, k):
    """llama.cpp's top-n-sigma: keep logits >= max - n * std (population std over every
    finite logit), as indices into T[:k]."""
    mean = sum(logits) / len(logits)
    std = math.sqrt(sum((x - mean) ** 2 for x in logits) / len(logits))
    top = max(logits)
    return {i for i in range(k) if logits[T[i]] >= top - n * std}


@pytest.mark.parametrize("n", [0.5, 1.0, 2.0, 4.0])
def test_top_n_sigma_value(llm, n):
    # FOUR sits 0, 0.29, 0.69 and 1.39 below the top logit; the std over 32000 logits
    # (nearly all 0) is ~0.43, so each n keeps another number of them.
    expect = _top_n_sigma_kept(_all_logits(llm, FOUR), n, len(FOUR))
    assert set(draws(llm, FOUR, top_n_sigma=n)) == expect
    assert len({len(_top_n_sigma_kept(_all_logits(llm, FOUR), m, 4)) for m in (0.5, 1.0, 2.0, 4.0)}) == 4


@pytest.mark.parametrize("threshold,expect", [(0.25, {1, 2, 3}), (0.15, {2, 3}), (0.35, {0, 1, 2, 3}),
                                              (0.05, {3})])
def test_xtc_threshold_value(llm, threshold, expect):
    # XTC at probability 1 removes every token at or above the threshold except the least
    # likely of them (none when fewer than two qualify): FOUR is 0.4, 0.3, 0.2, 0.1.
    assert set(draws(llm, FOUR, xtc_probability=1.0, xtc_threshold=threshold)) == expect


def test_xtc_probability_value(llm):
    # At probability p a draw is made without the top choice about p of the time.
    firsts = Counter(d[0] for d in first_draws(llm, FOUR, seeds=range(200), xtc_probability=0.5,
                                               xtc_threshold=0.25))
    without_xtc = Counter(d[0] for d in first_draws(llm, FOUR, seeds=range(200)))
    assert firsts[0] < without_xtc[0] * 0.75 and firsts[0] > 0, (firsts, without_xtc)
    assert set(draws(llm, FOUR, xtc_probability=0.0, xtc_threshold=0.25)) == {0, 1, 2, 3}


def _best_temperature(llm, probs, **kwargs):
    counts = Counter(draws(llm, probs, n=400, seed=99, **kwargs))

    def loglik(t):
        w = [p ** (1 / t) for p in probs]
        return sum(c * math.log(w[i] / sum(w)) for i, c in counts.items())

    return max([0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0], key=loglik)


def test_dynamic_temperature_value(llm):
    """llama.cpp's temp-ext: the temperature is max(0, t - r) + 2r * (H / H_max) ** exponent,
    H the entropy of the candidates and H_max = ln(n_vocab)."""
    peaked = [0.7, 0.2, 0.08, 0.02]
    # exponent 0: always the top of the range
    assert _best_temperature(llm, peaked, temperature=1.0, dynatemp_range=1.0, dynatemp_exponent=0.0) == 2.0
    # exponent 1, t = r: the temperature is 2r * H / H_max; pick r so that it is 0.5
    h = -sum(p * math.log(p) for p in peaked)
    r = 0.25 / (h / math.log(llm.vocab.n_tokens))
    assert r > 2.0   # without the entropy scaling, t = r would be fitted as 4 (or 2)
    assert _best_temperature(llm, peaked, temperature=r, dynatemp_range=r, dynatemp_exponent=1.0) == 0.5


def _dry_reference(history, candidates, multiplier, base, allowed_length, last_n):
    """DRY penalties as llama.cpp computes them (no sequence breakers in `history`): a
    candidate that would extend a repeat of n >= allowed_length tokens loses
    multiplier * base ** (n - allowed_length)."""
    window = history[-last_n:] if last_n > 0 else list(history)
    if len(window) <= allowed_length:
        return {}
    longest = {}
    for end in range(len(window) - 1):            # an earlier occurrence ending at `end`
        n = 0
        while n <= end and window[end - n] == window[len(window) - 1 - n]:
            n += 1
        follower = window[end + 1]
        if n >= allowed_length and follower in candidates:
            longest[follower] = max(longest.get(follower, 0), n)
    return {t: multiplier * base ** (n - allowed_length) for t, n in longest.items()}


def _dry_greedy_reference(prompt, logits, steps, **dry):
    """Greedy tokens under DRY over prompt + answer (what llama-server's slots see)."""
    history, out = list(prompt), []
    for _ in range(steps):
        pen = _dry_reference(history, set(logits), **dry)
        best = max(logits, key=lambda t: (logits[t] - pen.get(t, 0.0), -t))
        out.append(best)
        history.append(best)
    return out


@pytest.mark.parametrize("dry", [
    dict(multiplier=0.5, base=1.75, allowed_length=2, last_n=64),
    dict(multiplier=0.03, base=2.0, allowed_length=1, last_n=64),   # no penalty difference is 0.1 or 0.2: no ties
    dict(multiplier=0.5, base=1.75, allowed_length=3, last_n=6),
], ids=["defaults", "weak-base-2", "allowed-3-window-6"])
def test_dry_value(llm, dry):
    logits = {T[i]: BASE - 0.1 * i for i in range(3)}          # 40.0, 39.9, 39.8
    prompt = llm.tokenize(PROMPT)
    want = _dry_greedy_reference(prompt, logits, 24, **dry)
    got = llm.complete(prompt, logit_bias=logits, temperature=0, max_tokens=24, dry_multiplier=dry["multiplier"],
                       dry_base=dry["base"], dry_allowed_length=dry["allowed_length"],
                       dry_penalty_last_n=dry["last_n"]).tokens
    assert got == want
    assert len(set(got)) > 1                                     # it did change something
    plain = llm.complete(PROMPT, logit_bias=logits, temperature=0, max_tokens=24).tokens
    assert plain == [T[0]] * 24


def test_dry_sequence_breakers_stop_a_repeat(llm):
    """A breaker token in the history ends every repeat that would run across it."""
    logits = {T[i]: BASE - 0.1 * i for i in range(3)}
    dry = dict(temperature=0, max_tokens=16, logit_bias=logits, dry_multiplier=0.5)
    breaker = llm.vocab.token_text(T[0])
    broken = llm.complete(PROMPT, dry_sequence_breakers=[breaker], **dry).tokens
    assert broken == [T[0]] * 16      # every T0 is a breaker: no repeat ever gets long enough
    assert llm.complete(PROMPT, **dry).tokens != broken


# --------------------------------------------------------------------------- the prompt counts


def test_penalties_see_the_prompt(llm):
    """Penalties (and DRY) count the prompt's tokens as llama.cpp's tools, llama-server and
    llama-cpp-python do: T0 in the prompt is already a repetition."""
    logits = {T[0]: BASE, T[1]: BASE - 0.1}
    prompt = llm.tokenize(PROMPT) + [T[0]]
    greedy = dict(logit_bias=logits, temperature=0, max_tokens=1)
    assert llm.complete(prompt, **greedy).tokens == [T[0]]
    assert llm.complete(prompt, repeat_penalty=2.0, **greedy).tokens == [T[1]]
    assert llm.complete(prompt, presence_penalty=0.5, **greedy).tokens == [T[1]]
    # ...within the window only: with last_n 1 the prompt's last token is all it sees
    far = llm.tokenize(PROMPT) + [T[0], T[2]]
    assert llm.complete(far, repeat_penalty=2.0, last_n_tokens_size=1, **greedy).tokens == [T[0]]
    assert llm.complete(far, repeat_penalty=2.0, last_n_tokens_size=2, **greedy).tokens == [T[1]]
    # DRY: the prompt "T0 T0 T0" makes a fourth T0 a repeat of length 2
    rep = llm.tokenize(PROMPT) + [T[0]] * 3
    assert llm.complete(rep, dry_multiplier=0.5, **greedy).tokens == [T[1]]
    assert llm.complete(rep, dry_multiplier=0.5, dry_penalty_last_n=2, **greedy).tokens == [T[0]]


def test_accept_context_low_level(llm):
    from pyllama import SamplerChain

    chain = SamplerChain(llm.vocab).add_penalties(4, 2.0).add_greedy()
    chain.accept_context([T[0], -5, T[1]])                 # negative keys (images) are skipped
    from pyllama.errors import InvalidTokenError

    with pytest.raises(InvalidTokenError):
        chain.accept_context([llm.vocab.n_tokens])
    g = SamplerChain(llm.vocab).add_grammar('root ::= "a"')
    with pytest.raises(ValueError, match="grammar"):
        g.accept_context([T[0]])


# --------------------------------------------------------------------------- settings that do not exist


@pytest.mark.parametrize("name,value", [
    ("penalty_last_n", 64), ("mirostat", 2), ("tfs_z", 0.9), ("min_keep", 2), ("dry_penalty_lastn", 8),
    ("xtc_prob", 0.5),
])
def test_unsupported_settings_are_refused_not_ignored(llm, flat_model, name, value):
    """Settings SamplingParams does not have (llama.cpp's other spellings, removed samplers):
    they must raise, never be dropped silently."""
    with pytest.raises(TypeError, match="unexpected keyword|unknown"):
        SamplingParams(**{name: value})
    with pytest.raises(TypeError, match="unknown"):
        llm.complete(PROMPT, max_tokens=1, **{name: value})
    with pytest.raises(TypeError, match="unexpected keyword|unknown"):
        LLM(flat_model, n_threads=THREADS, **{name: value})
