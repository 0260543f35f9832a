"""pipesched benchmark suite: ``python -m benchmarks`` (or ``python benchmarks/run_all.py``).

Benchmarks, each printing a table and writing ``<out>/<name>.json`` (the six
first ones here, then cpu_pays; the full list is ``python -m benchmarks --list``
and benchmarks/README.md):

=================  ==========================================================
name               what it measures
=================  ==========================================================
orchestration      replay makespan of the plan on calibrated sleep costs ÷
                   measured step time, per schedule, p = 2/4/8, m = 4..64
pipeline1          pipeline-1 vs naive-1 (one rank, chunks = 1), checkpoint
                   never and always (recompute cost)
cpu_speedup        2 ranks on 2 cores vs the same micro-batches on one thread,
                   against the ideal 2m/(m+1)
torch_pipelining   pipesched vs ``torch.distributed.pipelining`` (2 gloo
                   processes), same model, batch, micro-batches, 1F1B
ddp                pipesched vs ``DistributedDataParallel`` (2 gloo processes)
memory             peak activation bytes per rank vs theory; the largest
                   model under an activation budget, per schedule
cpu_pays           a GPT-style model: 2 CPU ranks vs plain training on the
                   same cores, with torch's default and one intra-op thread
                   per rank; memory per rank
=================  ==========================================================

``--profile DIR`` runs each under ``torch.profiler`` (every thread) and writes
``DIR/<name>.trace.json`` (:mod:`benchmarks.profiling`).

Every comparison is a ratio of contenders measured side by side in the same
run, in several rounds whose order alternates (the machine may be shared);
tables give the median over rounds and the spread (min..max).

The helpers are one concept per module: :mod:`benchmarks.config` (sizes per
level), :mod:`benchmarks.stats` (median and spread), :mod:`benchmarks.rounds`
(alternating rounds), :mod:`benchmarks.table` (text tables),
:mod:`benchmarks.results` (JSON with the machine's description),
:mod:`benchmarks.load` (how many cores other processes used meanwhile),
:mod:`benchmarks.targets` (PASS/MISS verdicts), :mod:`benchmarks.threads`
(one intra-op thread per rank, and a probe that proves it),
:mod:`benchmarks.sleep_stage` (stages of calibrated, GIL-free duration),
:mod:`benchmarks.workloads` (the residual-MLP workload and its un-pipelined
baselines), :mod:`benchmarks.gloo_peers` and :mod:`benchmarks.peer_worker`
(two gloo processes driven from the benchmark), :mod:`benchmarks.activation_meter`
(an independent count of activation bytes).
"""
