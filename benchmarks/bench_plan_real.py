"""17. ``auto`` and ``tune`` on real layers (a small GPT): measured against what they replace.

Issue #24 found both losing on a GPT: ``auto`` 1.27-1.65x slower than 1F1B
(its warm-up priced an unsplit backward as B + W), ``tune`` ranking
split-backward schedules it then measured 1.26-1.57x slower. This benchmark
measures, on :class:`benchmarks.gpt.GPTWorkload` over 2 CPU ranks (one
intra-op thread each):

A. ``auto`` against every built-in of its placement (gpipe, 1f1b, zb-h1),
   each its own ``Pipeline`` on the same model, balance and micro-batches,
   in alternating rounds after two untimed steps (``auto``'s warm-up and its
   first synthesised step); the figure is the median over rounds of
   ``auto``'s step ÷ the best built-in's in the same round.
B. ``tune`` (default ``measure=3``, "don't pipeline" included) over a small
   grid, then *every* candidate of the grid measured in alternating rounds
   (brute force): tune's pick ÷ the measured best, and each of tune's top 3,
   predicted vs measured.

The machine is shared: read the spread ([min..max] over rounds) beside every
median, and rerun with ``python -m benchmarks --only plan_real``.
"""

from __future__ import annotations

import copy
import statistics
import warnings
from typing import Any

from torch import nn

import pipesched
from benchmarks.config import RunConfig
from benchmarks.gpt import GPTWorkload
from benchmarks.rounds import alternating_rounds, timed
from benchmarks.stats import fmt
from benchmarks.table import format_table
from benchmarks.targets import Target
from pipesched import Pipeline
from pipesched.tune.unpipelined import unpipelined_step

NAME = "plan_real"
TITLE = "17. auto and tune on a small GPT (2 CPU ranks): measured against the built-ins and brute force"
RANKS = 2
BUILT_INS = ("gpipe", "1f1b", "zb-h1")


def workload(cfg: RunConfig) -> GPTWorkload:
    return cfg.pick(tiny=GPTWorkload(width=32, layers=2, heads=2, vocab=64, seq=16, batch=4),
                    quick=GPTWorkload(width=96, layers=4, heads=4, vocab=256, seq=32, batch=16),
                    full=GPTWorkload())


def auto_vs_built_ins(cfg: RunConfig, gpt: GPTWorkload, chunks: int) -> dict[str, Any]:
    x, y = gpt.data()
    return auto_race(cfg, gpt.model(), x, y, chunks, dict(balance=gpt.two_rank_balance(),
                                                           loss_fn=nn.CrossEntropyLoss()))


def tiny_llama() -> tuple[nn.Module, Any, Any] | None:
    """A 4-layer Llama of width 64 from ``transformers`` (random weights), a batch and its labels; None without it."""
    try:
        import transformers
    except ImportError:
        return None
    import torch

    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids


def auto_race(cfg: RunConfig, base: nn.Module, x: Any, y: Any, chunks: int, options: dict[str, Any]) -> dict[str, Any]:
    """``auto`` and every built-in, each its own ``Pipeline(copy, **options)``, in alternating rounds."""
    models = {name: copy.deepcopy(base) for name in (*BUILT_INS, "auto")}
    pipes = {name: Pipeline(model, schedule=name, devices=["cpu"] * RANKS, chunks=chunks, **options)
             for name, model in models.items()}
    try:
        def stepper(name: str):
            def step() -> None:
                models[name].zero_grad(set_to_none=True)
                pipes[name].step(x, y)
            return step

        rounds = cfg.n_rounds(tiny=1, quick=7, full=11)
        measured = alternating_rounds({n: timed(stepper(n)) for n in pipes}, rounds=rounds, steps=1, warmup=2)
        plan = pipes["auto"].last_report.plan
    finally:
        for pipe in pipes.values():
            pipe.close()
    # the best built-in by median step, then auto / it paired round by round (the same moment of the
    # machine); not / the per-round fastest of three, which is biased low by picking a minimum of noise
    medians = {n: statistics.median(measured.per_step[n]) for n in BUILT_INS}
    best = min(medians, key=medians.__getitem__)
    ratios = measured.ratios("auto", best)
    return {"rounds": rounds, "chunks": chunks, "seconds": {n: measured.seconds(n) for n in pipes},
            "best_built_in": best, "auto_over_best_per_round": ratios,
            "auto_over_best": statistics.median(ratios),
            "auto_over_best_of_medians": statistics.median(measured.per_step["auto"]) / medians[best],
            "auto_plan": plan}


def tune_vs_brute_force(cfg: RunConfig, gpt: GPTWorkload) -> dict[str, Any]:
    x, y = gpt.data()
    loss = nn.CrossEntropyLoss()
    base = gpt.model()
    chunks = cfg.pick(tiny=[1, 2], quick=[1, 2, 4], full=[1, 2, 4, 8])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pipesched.tune(base, x, y, loss, devices=["cpu"] * RANKS, schedules=[*BUILT_INS, "auto"],
                                chunks=chunks, checkpoint=["never"], repeat=cfg.pick(tiny=1, quick=3, full=5))
    steps, models, pipes = {}, {}, []
    label = {id(c): c.label for c in result.candidates}
    try:
        for c in result.candidates:
            model = models[label[id(c)]] = copy.deepcopy(base)
            if c.pipelined:
                pipe = Pipeline(model, **c.pipeline_kwargs(), loss_fn=loss)
                pipes.append(pipe)

                def step(model=model, pipe=pipe) -> None:
                    model.zero_grad(set_to_none=True)
                    pipe.step(x, y)
            else:
                step = unpipelined_step(model, x, y, loss, c.chunks, "cpu")
            steps[label[id(c)]] = timed(step)
        rounds = cfg.n_rounds(tiny=1, quick=5, full=7)
        measured = alternating_rounds(steps, rounds=rounds, steps=1, warmup=2)
    finally:
        for pipe in pipes:
            pipe.close()
    rows = []
    for rank, c in enumerate(result.candidates):
        seconds = measured.seconds(label[id(c)])
        rows.append({"rank": rank + 1, "candidate": c.label, "predicted_s": c.predicted_step_s,
                     "tune_measured_s": c.measured_step_s, "measured": seconds,
                     "error": (c.predicted_step_s - float(seconds["median"])) / float(seconds["median"])})
    fastest = min(rows, key=lambda r: float(r["measured"]["median"]))
    chosen = rows[0]
    return {"rows": rows, "rounds": rounds, "chunks": chunks, "overhead_s": result.overhead_s,
            "threads": result.threads, "advice": result.advice,
            "warnings": [str(w.message) for w in caught],
            "chosen_over_best": float(chosen["measured"]["median"]) / float(fastest["measured"]["median"]),
            "fastest": fastest["candidate"], "chosen": chosen["candidate"]}


def run(cfg: RunConfig) -> dict[str, Any]:
    gpt = workload(cfg)
    chunks = cfg.pick(tiny=2, quick=4, full=4)
    cfg.log(f"A: auto vs {', '.join(BUILT_INS)} on the GPT, {chunks} micro-batches")
    part_a = auto_vs_built_ins(cfg, gpt, chunks)
    cfg.log("B: tune, then every candidate measured")
    part_b = tune_vs_brute_force(cfg, gpt)
    llama = None if cfg.level == "tiny" else tiny_llama()
    part_c = None
    if llama is not None:
        from pipesched import CausalLMLoss

        cfg.log("C: auto vs built-ins on a tiny Hugging Face Llama, cut at split_points")
        model, inputs, labels = llama
        part_c = auto_race(cfg, model, inputs, labels, 4, dict(split_points=["model.layers.2"],
                                                                loss_fn=CausalLMLoss()))

    table_a = format_table(
        ["schedule", "step ms median [min..max]"],
        [[n, fmt({k: v * 1e3 for k, v in part_a["seconds"][n].items()}, 1)] for n in (*BUILT_INS, "auto")],
        title=TITLE + f" — A: auto vs built-ins, {chunks} micro-batches, {part_a['rounds']} alternating rounds",
    )
    ratios = part_a["auto_over_best_per_round"]
    notes_a = (f"auto / best built-in ({part_a['best_built_in']}, by median) paired per round: median "
               f"{part_a['auto_over_best']:.3f} [{min(ratios):.3f}..{max(ratios):.3f}]; ratio of medians "
               f"{part_a['auto_over_best_of_medians']:.3f}; auto ran: {part_a['auto_plan']}")
    table_b = format_table(
        ["tune rank", "candidate", "predicted ms", "measured ms median [min..max]", "pred/meas"],
        [[r["rank"], r["candidate"], f"{r['predicted_s'] * 1e3:.1f}",
          fmt({k: v * 1e3 for k, v in r["measured"].items()}, 1), f"{1 + r['error']:.2f}"] for r in part_b["rows"]],
        title=f"B: tune (measure=3) vs brute force over its grid, {part_b['rounds']} alternating rounds",
    )
    notes_b = (f"tune's pick: {part_b['chosen']}; fastest measured: {part_b['fastest']}; chosen/best "
               f"{part_b['chosen_over_best']:.3f}; engine cost per task {part_b['overhead_s'] * 1e6:.0f} us; "
               f"advice: {part_b['advice'] or '-'}; tune warned {len(part_b['warnings'])} time(s)")
    parts = [table_a, notes_a, "", table_b, notes_b]
    targets = [
        Target("auto / best built-in, measured step (median of paired per-round ratios)", part_a["auto_over_best"], 1.02,
               higher_is_better=False, note=f"best built-in {part_a['best_built_in']}"),
        Target("tune's pick measured / brute-force best measured", part_b["chosen_over_best"], 1.10,
               higher_is_better=False, note=f"{part_b['chosen']} vs {part_b['fastest']}"),
    ]
    if part_c is not None:
        ratios_c = part_c["auto_over_best_per_round"]
        parts += ["", format_table(
            ["schedule", "step ms median [min..max]"],
            [[n, fmt({k: v * 1e3 for k, v in part_c["seconds"][n].items()}, 1)] for n in (*BUILT_INS, "auto")],
            title=f"C: tiny HF Llama (4 layers, width 64, 8 x 32 tokens), split_points=['model.layers.2'], "
                  f"4 micro-batches, {part_c['rounds']} alternating rounds"),
            f"auto / best built-in ({part_c['best_built_in']}) paired per round: median {part_c['auto_over_best']:.3f} "
            f"[{min(ratios_c):.3f}..{max(ratios_c):.3f}]; auto ran: {part_c['auto_plan']}"]
        targets.append(Target("HF Llama: auto / best built-in, measured step (median of paired per-round ratios)",
                              part_c["auto_over_best"], 1.02, higher_is_better=False,
                              note=f"best built-in {part_c['best_built_in']}"))
    targets += [Target(f"tune top {r['rank']} ({r['candidate']}) |predicted - measured| / measured", abs(r["error"]),
                       0.15, higher_is_better=False) for r in part_b["rows"][:3]]
    return {
        "title": TITLE,
        "table": "\n".join(parts),
        "targets": targets,
        "workload": {**gpt.as_dict(), "ranks": RANKS, "chunks": chunks},
        "auto": part_a,
        "tune": part_b,
        "hf_llama": part_c,
        "rows": part_b["rows"],
    }
