"""Every ```python example of README.md and docs/**/*.md runs, and does what the text around it says.

Blocks are found by a distinctive line of their text, not by position, so
reordering the README or moving a block between pages is harmless (a block the
README and a docs page both show must be the same text: it is collected once); a block that disappears or whose key line
changes fails naming that line, and a new block fails
``test_every_readme_block_is_covered`` until it gets a test here.

Each block runs with ``exec`` in a namespace filled by an explicit prelude
(what the README's text assumes exists: ``model``, ``x``, ``y``, ...). Where
the text cannot run as is here (CPU only, no torchgpipe, no torchrun), the
changes are listed per block in ``SUBSTITUTIONS`` (each ``old`` must be in
the block) or ``SKIPPED`` (with the reason).
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import assert_grads_equal, mlp, reference_grads
import pipesched
from pipesched import GPipe, Pipeline, get_schedule, list_schedules

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"


def documents() -> list[Path]:
    """The README and every page of the docs site."""
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]

# the key line of each block (a substring that must occur in exactly one ```python block)
QUICK_START = 'pipe = Pipeline(model, schedule="1f1b", balance=[4, 3], devices=["cpu", "cpu"]'
TRAINING_STEP = "scaler = torch.amp.GradScaler(device)"
SKIP_UNET = "@skippable(stash=[\"down\"])"
TORCHGPIPE = "from torchgpipe import GPipe"
AUTO = 'auto = get_schedule("auto", costs=costs, memory_limit=[4, 3, 2, 1])'
CUSTOM = "class ForwardOrderGPipe(Schedule):"
BALANCE = "from pipesched.balance import balance_by_time, balance_by_size"
TUNE = "result = pipesched.tune(model, x, y, nn.CrossEntropyLoss()"
RECOMPUTING = "class CountingLayer(nn.Module):"
DISTRIBUTED = 'dist.init_process_group("gloo")                     # torchrun provides rank and world size'
ANY_MODEL_DISTRIBUTED = "model = build_model()"
JSONL = 'log = configure_jsonl_logging("run.jsonl")'
PROFILER = "with torch.profiler.profile(experimental_config=_ExperimentalConfig(profile_all_threads=True))"
ANY_MODEL = 'pipe = Pipeline(model, split_points=["model.layers.2"]'

# old -> new, applied to the block before it runs: only what a CPU-only test machine needs
SUBSTITUTIONS: dict[str, dict[str, str]] = {
    # `loss_fn=...` is the README's placeholder for "your loss": a literal Ellipsis here
    AUTO: {"loss_fn=...": "loss_fn=loss_fn"},
    # `...` stands for the usual arguments; a step needs a loss (and 4 micro-batches show the order)
    CUSTOM: {'schedule="forward-order-gpipe", ...)': 'schedule="forward-order-gpipe", chunks=4, loss_fn=loss_fn)'},
    TUNE: {'devices=["cuda:0", "cuda:1"]': 'devices=["cpu", "cpu"]'},
    # torchgpipe's own "before" lines, run under pipesched's imports (the README's "after")
    TORCHGPIPE: {
        "from torchgpipe import GPipe\n": "",
        "from torchgpipe.balance import balance_by_time\n": "",
        "torch.cuda.device_count()": "2",
    },
}

SKIPPED = {
    TORCHGPIPE: "the 'before' half imports torchgpipe, which is not installed; its lines run under "
                "pipesched's imports in test_torchgpipe_switch_after_half",
    DISTRIBUTED: "needs torchrun (one process per rank); DistributedPipeline runs are covered by "
                 "tests/test_distributed.py",
    ANY_MODEL_DISTRIBUTED: "needs torchrun (one process per rank); DistributedPipeline on a traced model is "
                           "covered by tests/test_any_model_distributed.py",
}


def python_blocks() -> list[str]:
    """Every distinct ```python block of the README and the docs, dedented (one is indented inside a list)."""
    pattern = re.compile(r"^([ \t]*)```python[ \t]*\n(.*?)^\1```[ \t]*$", re.DOTALL | re.MULTILINE)
    blocks: list[str] = []
    for path in documents():
        for match in pattern.finditer(path.read_text(encoding="utf-8")):
            block = textwrap.dedent(match.group(2))
            if block not in blocks:
                blocks.append(block)
    return blocks


def readme_block(key: str) -> str:
    found = [block for block in python_blocks() if key in block]
    assert found, (
        f"README.md and docs/ have no ```python block containing {key!r}: the example was removed or its "
        f"key line changed; update tests/test_readme_examples.py"
    )
    assert len(found) == 1, (
        f"{len(found)} different ```python blocks of README.md and docs/ contain {key!r}; pick a distinctive "
        f"line (or make the copies the same text)"
    )
    return found[0]


def substituted(key: str, code: str | None = None) -> str:
    code = readme_block(key) if code is None else code
    for old, new in SUBSTITUTIONS.get(key, {}).items():
        assert old in code, f"the README example {key!r} no longer contains {old!r}: review its substitution"
        code = code.replace(old, new)
    return code


def run_block(key: str, code: str, namespace: dict, opened: list) -> dict:
    """``exec`` one block; every Pipeline it leaves in the namespace is closed at teardown."""
    try:
        exec(compile(code, f"README.md <{key}>", "exec"), namespace)  # noqa: S102 - running the examples is the point
    finally:
        opened.extend(v for v in namespace.values()
                      if isinstance(v, Pipeline) and not any(v is p for p in opened))
    return namespace


@pytest.fixture
def opened(no_thread_leak):
    """Pipelines to close after the test, failed or not (before the thread-leak check)."""
    pipes: list[Pipeline] = []
    yield pipes
    for pipe in pipes:
        pipe.close()


@pytest.fixture
def tracked(opened):
    """A ``Pipeline`` for the preludes that records each pipeline built (a block may rebind ``pipe``)."""
    def build(*args, **kwargs):
        pipe = Pipeline(*args, **kwargs)
        opened.append(pipe)
        return pipe
    return build


@pytest.fixture(autouse=True)
def one_thread_per_rank():
    """Two CPU ranks on 2 cores: one intra-op thread each (no oversubscription warning, faster)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry has no unregister: give the test a copy of its table, restored afterwards."""
    from pipesched.plan import registry

    factories = dict(registry._factories)
    factories.pop("forward-order-gpipe", None)  # tests/test_registry.py registers the same name
    monkeypatch.setattr(registry, "_factories", factories)


def classification_batch(rows: int = 16, width: int = 8, classes: int = 4):
    return torch.randn(rows, width, dtype=torch.float64), torch.randint(0, classes, (rows,))


def test_every_readme_block_is_covered():
    keys = [QUICK_START, TRAINING_STEP, SKIP_UNET, TORCHGPIPE, AUTO, CUSTOM, BALANCE, TUNE, RECOMPUTING, DISTRIBUTED,
            JSONL, PROFILER, ANY_MODEL, ANY_MODEL_DISTRIBUTED]
    for index, block in enumerate(python_blocks()):
        matching = [key for key in keys if key in block]
        assert len(matching) == 1, (
            f"README/docs ```python block #{index} (starting {block.strip().splitlines()[0]!r}) matches "
            f"{len(matching)} keys of tests/test_readme_examples.py; give it a test"
        )


@pytest.mark.parametrize("key", [TORCHGPIPE, DISTRIBUTED, ANY_MODEL_DISTRIBUTED],
                         ids=["torchgpipe-before", "torchrun", "torchrun-any-model"])
def test_skipped_blocks_still_exist(key):
    readme_block(key)
    pytest.skip(SKIPPED[key])


def test_quick_start(opened):
    batches = [(torch.randn(16, 32), torch.randint(0, 10, (16,))) for _ in range(2)]
    ns = run_block(QUICK_START, readme_block(QUICK_START), {"batches": batches}, opened)
    assert math.isfinite(ns["loss"].item())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ns["model"].parameters())
    peaks = ns["pipe"].last_report.peak_activation_bytes
    assert len(peaks) == 2 and all(b > 0 for b in peaks)


def test_training_step_with_float16_scaling_and_clipping(opened):
    """The recipe trains: the loss falls over a few steps of one batch, and every gradient the
    optimizer saw was clipped (the unscaled norm after clipping is at most 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = torch.randn(32, 32), torch.randint(0, 10, (32,))
    batches = [(x, y)] * 6
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def recorded(parameters, *args, **kwargs):  # the pipeline's clip calls torch's: record what it left
        parameters = list(parameters)
        total = clip(parameters, *args, **kwargs)
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters]))))
        return total

    ns = {"torch": torch, "nn": nn, "Pipeline": Pipeline, "model": model, "batches": batches}
    losses = []
    original = Pipeline.step

    def step(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        losses.append(loss.item())
        return loss

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.utils, "clip_grad_norm_", recorded)
        patch.setattr(Pipeline, "step", step)
        run_block(TRAINING_STEP, readme_block(TRAINING_STEP), ns, opened)
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
    assert len(norms) == 6 and max(norms) <= 1.0 + 1e-6, norms


def test_skip_connections_unet(tracked, opened):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the block builds its layers: float64 for an exact comparison
    try:
        x, target = torch.randn(16, 64), torch.randn(16, 64)
        ns = run_block(SKIP_UNET, readme_block(SKIP_UNET),
                       {"torch": torch, "nn": nn, "Pipeline": tracked, "x": x}, opened)
    finally:
        torch.set_default_dtype(previous)
    model, pipe = ns["model"], ns["pipe"]
    _, expected = reference_grads(model, nn.MSELoss(), x, target)
    pipe.step(x, target)
    assert_grads_equal(model, expected)
    assert len(pipe.devices) == 2 and pipe.num_stages == 4  # zb-v: 4 stages in a V on 2 ranks


def test_torchgpipe_switch_after_half(tracked, opened):
    block = readme_block(TORCHGPIPE)
    markers = ("# after: pipesched; only the imports change\n", "# ... the same lines ...",
               "# or, in place of GPipe(model, ...)")  # the last: a Pipeline instead of the GPipe
    for marker in markers:
        assert block.count(marker) == 1, f"the README example {TORCHGPIPE!r} no longer contains {marker!r}"
    before, after = block.split(markers[0])
    cut = after.index(markers[2])
    imports, alternative = after[:cut], after[cut:]
    program = imports.replace(markers[1], substituted(TORCHGPIPE, before))

    plain = mlp(layers=6)
    inputs, targets = classification_batch()
    reference = mlp(layers=6)
    nn.functional.cross_entropy(reference(inputs), targets).backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    ns = run_block(TORCHGPIPE, program, {
        "torch": torch, "nn": nn, "F": nn.functional, "model": plain, "sample": inputs[:2],
        "loader": [(inputs, targets)], "optimizer": torch.optim.SGD(plain.parameters(), lr=0.1),
        "Pipeline": tracked,
    }, opened)
    gpipe = ns["model"]
    assert isinstance(gpipe, GPipe) and gpipe.balance == ns["balance"] and sum(ns["balance"]) == 6
    for got, want in zip(plain.parameters(), reference.parameters()):  # one SGD step, as the plain model's
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    gpipe.close()

    plain.zero_grad()
    loss, expected = reference_grads(plain, nn.CrossEntropyLoss(), inputs, targets)
    ns = run_block(TORCHGPIPE, alternative, {"nn": nn, "Pipeline": tracked, "model": plain,
                                             "balance": ns["balance"], "inputs": inputs, "targets": targets},
                   opened)
    torch.testing.assert_close(ns["loss"], loss, rtol=0, atol=1e-12)
    assert_grads_equal(plain, expected)


def test_auto_schedule_from_costs(tracked, opened):
    from pipesched.plan.schedule import validate_plan
    from pipesched.plan.simulate import peak_inflight

    model, loss_fn = mlp(layers=8), nn.CrossEntropyLoss()
    ns = run_block(AUTO, substituted(AUTO), {"get_schedule": get_schedule, "Pipeline": tracked,
                                             "model": model, "loss_fn": loss_fn}, opened)
    auto = ns["auto"]
    plan = validate_plan(auto.plan(4, 8, 4), 4, 8, 4, auto.placement(4, 4))
    assert all(peak_inflight(row) <= cap for row, cap in zip(plan, [4, 3, 2, 1], strict=True))

    given, measured = opened[-2], opened[-1]  # the block builds two and keeps the second as `pipe`
    assert measured is ns["pipe"] and given.schedule is auto and given.balance == [2, 2, 2, 2]
    x, y = classification_batch()
    _, expected = reference_grads(model, loss_fn, x, y)
    given.step(x, y)
    assert given.last_report.plan.startswith("auto: synthesised for given costs")
    assert_grads_equal(model, expected)
    model.zero_grad()
    measured.step(x, y)
    assert measured.last_report.plan.startswith("auto: warm-up")
    model.zero_grad()
    measured.step(x, y)
    assert measured.last_report.plan.startswith("auto: synthesised for measured costs")
    assert_grads_equal(model, expected)


def test_custom_schedule(scratch_registry, tracked, opened):
    model, loss_fn = mlp(layers=4), nn.CrossEntropyLoss()
    ns = run_block(CUSTOM, substituted(CUSTOM), {"Pipeline": tracked, "model": model, "loss_fn": loss_fn},
                   opened)
    assert "forward-order-gpipe" in list_schedules()
    assert isinstance(get_schedule("forward-order-gpipe"), ns["ForwardOrderGPipe"])
    x, y = classification_batch()
    _, expected = reference_grads(model, loss_fn, x, y)
    pipe = ns["pipe"]
    pipe.step(x, y)
    assert_grads_equal(model, expected)
    order = [(t.kind, t.microbatch) for t in pipe.last_report.tasks if t.rank == 0]
    assert order == [("F", m) for m in range(4)] + [("B", m) for m in range(4)]


def test_is_recomputing_guard(tracked, opened):
    ns = run_block(RECOMPUTING, readme_block(RECOMPUTING), {"nn": nn}, opened)
    layer = ns["CountingLayer"]()
    layer.rows_seen, layer.inner = 0, nn.Linear(8, 8).double()
    calls = []
    layer.inner.register_forward_hook(lambda *_: calls.append(1))
    model = nn.Sequential(nn.Linear(8, 8), layer, nn.Linear(8, 4)).double()
    pipe = tracked(model, balance=[2, 1], chunks=4, checkpoint="always", loss_fn=nn.CrossEntropyLoss())
    pipe.step(*classification_batch())
    assert len(calls) == 8  # each micro-batch ran twice: checkpointed, then recomputed
    assert layer.rows_seen == 16  # but its rows were counted once


def test_balance_by_time_and_size(monkeypatch, tracked, opened):
    import pipesched.balance

    results = []
    for name in ("balance_by_time", "balance_by_size"):
        real = getattr(pipesched.balance, name)

        def recording(*args, _real=real, **kwargs):
            results.append(_real(*args, **kwargs))
            return results[-1]
        monkeypatch.setattr(pipesched.balance, name, recording)

    model, loss_fn = mlp(layers=10, width=16), nn.CrossEntropyLoss()
    x, y = classification_batch()
    ns = run_block(BALANCE, readme_block(BALANCE), {
        "Pipeline": tracked, "model": model, "sample": x[:2], "batch": x, "loss_fn": loss_fn}, opened)
    assert [len(b) for b in results] == [4, 4, 8]  # zb-v: 2 stages per rank on 4 ranks
    assert all(isinstance(b, list) and sum(b) == 10 and min(b) >= 1 for b in results)
    pipe = ns["pipe"]
    assert pipe.balance == results[-1] and len(pipe.devices) == 4
    _, expected = reference_grads(model, loss_fn, x, y)
    pipe.step(x, y)
    assert_grads_equal(model, expected)


def test_tune(monkeypatch, tmp_path, tracked, opened):
    monkeypatch.chdir(tmp_path)
    model = mlp(layers=8, width=32)
    x, y = classification_batch()
    ns = run_block(TUNE, substituted(TUNE), {"pipesched": pipesched, "nn": nn, "Pipeline": tracked,
                                             "model": model, "x": x, "y": y}, opened)
    result, best, pipe = ns["result"], ns["best"], ns["pipe"]
    assert best is result.best_pipelined and best.fits and best.pipelined
    assert result.best.measured_step_s is not None  # measure=3: the top 3 ran
    assert any(line.startswith("best: ") for line in result.format_table().splitlines())
    assert (pipe.schedule.name, pipe.balance, pipe.chunks) == (best.schedule, best.balance, best.chunks)
    assert math.isfinite(pipe.step(x, y).item())
    saved = json.loads((tmp_path / "tune.json").read_text())
    assert len(saved["candidates"]) == len(result.candidates) and saved["profiles"]


def test_jsonl_logging(monkeypatch, tmp_path, tracked, opened):
    import structlog

    monkeypatch.chdir(tmp_path)
    x, y = classification_batch()
    pipe = tracked(mlp(layers=4), balance=[2, 2], chunks=2, loss_fn=nn.CrossEntropyLoss())
    ns: dict = {"pipe": pipe, "x": x, "y": y}
    try:
        run_block(JSONL, readme_block(JSONL), ns, opened)
    finally:
        if "log" in ns:
            ns["log"].close()
        structlog.reset_defaults()  # the block replaced structlog's global configuration
    events = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    tasks = [e for e in events if e["event"] == "task"]
    assert len(tasks) == len(pipe.last_report.tasks) == 8  # F and B of 2 stages × 2 micro-batches
    table = ns["analysis"].format_table()
    assert isinstance(table, str) and table.strip()


def test_profiler_labels(monkeypatch, tmp_path, tracked, opened):
    monkeypatch.chdir(tmp_path)
    x, y = classification_batch()
    pipe = tracked(mlp(layers=4), balance=[2, 2], chunks=2, loss_fn=nn.CrossEntropyLoss())
    run_block(PROFILER, readme_block(PROFILER), {"torch": torch, "pipe": pipe, "x": x, "y": y}, opened)
    trace = (tmp_path / "trace.json").read_text()
    assert "pipesched F0.0" in trace
    for task in pipe.last_report.tasks:
        assert f'"pipesched {task.kind}{task.stage}.{task.microbatch}"' in trace


def test_any_model(opened):
    """The Hugging Face block runs; its loss is HF's shifted loss on the padded batch (float32 here)."""
    pytest.importorskip("transformers")
    ns = run_block(ANY_MODEL, readme_block(ANY_MODEL), {}, opened)
    model, ids, mask, labels = ns["model"], ns["ids"], ns["mask"], ns["labels"]
    logits = model(input_ids=ids, attention_mask=mask).logits
    expected = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert abs(float(ns["loss"]) - expected.item()) < 1e-5
    assert torch.allclose(ns["logits"], logits, atol=1e-5)
    assert all(p.grad is not None for p in model.parameters())
