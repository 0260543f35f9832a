"""More Hugging Face families, attention kernels and paddings through the traced cut, and what crosses stages.

Families whose forward computes parts in float32 even in a float64 model
(Gemma's and Cohere's norms upcast with ``.float()``) are compared with the
plain model run on the *same micro-batches* (each micro-batch's loss weighted
by its share of the batch's tokens, gradients accumulated): the float32 sums
inside a norm's weight gradient then cover the same rows in both, and the
pipeline must agree to 1e-12. (Against one whole-batch backward they differ
by float32 rounding, ~1e-10, which says nothing about the pipeline.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipesched import CausalLMLoss, Pipeline
from pipesched.runtime.microbatch import split_sizes

transformers = pytest.importorskip("transformers")

from test_any_model import batch, gpt2, llama  # noqa: E402 - after the skip

TOLERANCE = 1e-12
CHUNKS = 4
COMMON = dict(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=100)


def family(name: str) -> nn.Module:
    """Each one computes something outside its block list that a hand-written extractor misses."""
    torch.manual_seed(0)
    if name == "gemma2":  # final logit softcapping (and attention-logit softcapping, sliding windows)
        config = transformers.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=2.0,
                                           attn_logit_softcapping=5.0, sliding_window=4,
                                           attn_implementation="eager")
        return transformers.Gemma2ForCausalLM(config).double()
    if name == "cohere":  # logits scaled by logit_scale, parallel attention/MLP blocks
        return transformers.CohereForCausalLM(transformers.CohereConfig(**COMMON, logit_scale=0.25)).double()
    if name == "phi3":  # fused qkv and gate/up projections
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(**COMMON, pad_token_id=0)).double()
    # Gemma 3: per-layer rotary (local base frequency on sliding layers, global on full ones), softcap
    config = transformers.Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=4, final_logit_softcapping=2.0,
                                           layer_types=["sliding_attention", "full_attention"] * 2)
    return transformers.Gemma3ForCausalLM(config).double()


def microbatched_reference(model: nn.Module, inputs: dict, labels: torch.Tensor) -> tuple[float, dict]:
    """The plain model on the pipeline's micro-batches: each loss weighted by its share of the tokens."""
    model.zero_grad()
    tokens = int((labels[:, 1:] != -100).sum())
    total, first = 0.0, 0
    for rows in split_sizes(labels.shape[0], CHUNKS):
        part = {k: v[first:first + rows] for k, v in inputs.items()}
        logits = model(**part).logits
        target = labels[first:first + rows, 1:].flatten()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), target, ignore_index=-100, reduction="sum") / tokens
        loss.backward()
        total += float(loss.detach())
        first += rows
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return total, grads


def assert_exact_on_microbatches(model: nn.Module, pipe: Pipeline, left: bool = False) -> None:
    for rows, tokens, seed in ((8, 12, 1), (6, 7, 2)):  # the second: another shape, uneven micro-batches
        inputs, labels = batch(rows, tokens, seed, left)
        expected, grads = microbatched_reference(model, inputs, labels)
        loss = pipe.step(inputs, labels)
        assert abs(float(loss) - expected) <= TOLERANCE
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            assert float((p.grad - grads[name]).abs().max()) <= TOLERANCE, name
        model.zero_grad()


@pytest.mark.slow  # a trace and two steps per family: run with PIPESCHED_SLOW=1
@pytest.mark.parametrize("name", ["gemma2", "cohere", "phi3", "gemma3"])
def test_more_families_exact(name):
    model = family(name)
    with Pipeline(model, split_points=["model.layers.2"], schedule="1f1b", chunks=CHUNKS,
                  loss_fn=CausalLMLoss()) as pipe:
        assert_exact_on_microbatches(model, pipe)
        inputs, _ = batch(3, 6, 4)
        with torch.no_grad():
            logits = pipe(inputs)["logits"]
            assert torch.equal(logits, model(**inputs).logits)
        if name in ("gemma2", "gemma3"):  # the softcap, which lives after the block list, was applied
            assert float(logits.abs().max()) < 2.0


@pytest.mark.slow  # a trace and two steps per case: run with PIPESCHED_SLOW=1
@pytest.mark.parametrize("name,attention,left", [("llama", "sdpa", False), ("llama", "sdpa", True),
                                                ("llama", "eager", False), ("gpt2", "sdpa", True)])
def test_attention_kernels_with_either_padding(name, attention, left):
    """sdpa and eager, right and left padding (where a dropped or wrong mask shows), under zb-h1, on
    configs that keep HF's default use_cache=True (pipesched traces with use_cache=False). GPT-2 eager
    left-padded is in test_any_model.py; HF's own Llama under eager attention gives NaN logits on
    left-padded rows (their all-masked padding queries), in the plain model too, so there is nothing
    to compare."""
    model = (llama if name == "llama" else gpt2)(attn_implementation=attention)
    assert model.config.use_cache
    points = ["model.layers.2"] if name == "llama" else ["transformer.h.2"]
    with Pipeline(model, split_points=points, schedule="zb-h1", chunks=CHUNKS, loss_fn=CausalLMLoss()) as pipe:
        assert_exact_on_microbatches(model, pipe, left=left)


def test_mask_crosses_stages_as_the_2d_mask():
    """What each stage hands the transport, seen by a forward hook on every stage but the last: no
    tensor has 4 dims or a (T, T) tail (a (B, 1, T, T) mask would), and the 2-D attention mask is there."""
    model = gpt2()
    handed: list[tuple[int, ...]] = []
    with Pipeline(model, split_points=["transformer.h.1", "transformer.h.3"], schedule="1f1b",
                  devices=["cpu:0", "cpu:1", "cpu:2"], chunks=2, loss_fn=CausalLMLoss()) as pipe:
        for stage in pipe.stages[:-1]:
            stage.register_forward_hook(lambda _m, _i, out: handed.extend(tuple(t.shape) for t in out))
        inputs, labels = batch(4, 9, 3)
        pipe.step(inputs, labels)
    assert handed
    assert all(len(shape) <= 3 and shape[-2:] != (9, 9) for shape in handed), handed
    assert (2, 9) in handed  # the attention mask of a micro-batch of 2 rows


class WithNone(nn.Module):
    """A block list whose blocks return ``(hidden, None)`` (HF's attention-weights slot)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))

    def forward(self, x):
        extra = None
        for block in self.blocks:
            x, extra = torch.tanh(block(x)), extra
        return {"logits": x, "extra": extra}


def test_none_in_a_traced_model_never_crosses_a_stage():
    """A ``None`` the forward carries between blocks is no tensor in the trace: nothing is sent for it,
    and the output's ``None`` field is rebuilt by the last stage (never passed silently as a value)."""
    torch.manual_seed(0)
    model = WithNone().double()
    with Pipeline(model, example_inputs={"x": torch.randn(2, 4, dtype=torch.float64)}, chunks=2) as pipe:
        out = pipe({"x": torch.randn(4, 4, dtype=torch.float64)})
    assert out["extra"] is None and out["logits"].shape == (4, 4)


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return torch.tanh(self.linear(x)), None  # HF's layer tuple without attention weights


class TakePair(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, pair):
        hidden, weights = pair
        if weights is not None:
            raise AssertionError(f"the None slot arrived as {type(weights).__name__}")
        return {"logits": self.linear(hidden), "attentions": None}


def test_none_entries_of_stage_outputs_are_skipped_and_come_back_as_none():
    """Regression: a stage returning ``(hidden, None)`` was refused ("it must return a Tensor, ...");
    the None is no tensor to send, and the next stage (and loss_fn) gets it back in its slot."""
    torch.manual_seed(0)
    model = nn.Sequential(Pair(), TakePair()).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6,))
    loss_fn = lambda out, target: F.cross_entropy(out["logits"], target)  # noqa: E731
    loss_fn(model(x), y).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with Pipeline(model, balance=[1, 1], devices=["cpu:0", "cpu:1"], schedule="zb-h1", chunks=3,
                  loss_fn=loss_fn) as pipe:
        pipe.step(x, y)
        with torch.no_grad():
            out = pipe(x)
    assert out["attentions"] is None and out["logits"].shape == (6, 2)
    assert max(float((p.grad - g).abs().max()) for p, g in zip(model.parameters(), expected)) <= TOLERANCE
