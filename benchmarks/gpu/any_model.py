"""Item 6: a model that is not an ``nn.Sequential``, traced and cut, on the device.

The any-model path (``Pipeline(model, split_points=...)``) rewrites the devices
the trace baked in so each stage creates its tensors on its own device; on the
CPU that is all one device, so only a GPU shows whether it holds. The model
is a Hugging Face Llama with tied embeddings built from a tiny config where
``transformers`` is importable, otherwise a small causal LM written here (an
embedding, a ``ModuleList`` of attention blocks, a norm, a head tied to the
embedding, keyword inputs ``input_ids`` / ``attention_mask``): the same trace,
cut and transport either way. Batches are right-padded with labels ``-100``
on padding; the loss is ``pipesched.CausalLMLoss``.

* ``float64``: against one backward of the plain model on the whole batch
  (HF's shifted cross-entropy, token-normalised); max |Δ| ≤ 1e-10.
* ``bf16``: the same model in float32 under ``torch.autocast(dtype=bfloat16)``
  against the plain model under the same autocast on the whole batch; max
  |Δ| ≤ 2e-2 × max |reference| per tensor, as item 2's bf16 case.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.gpu.budget import ItemBudget
from benchmarks.gpu.env import Env
from benchmarks.gpu.grads import distance
from benchmarks.gpu.results import ItemResult, Results
from pipesched import CausalLMLoss, Pipeline

NAME = "any_model"
TITLE = "6. Any model (traced and cut) on the device vs the plain model on the same device"
COLUMNS = [("model", "model"), ("variant", "variant"), ("schedule", "schedule"), ("stages", "stages"),
           ("policy", "checkpoint"), ("max_abs_diff", "max abs diff"), ("tolerance", "tolerance"), ("ok", "equal"),
           ("seconds", "s")]
VOCAB = 96
TOLERANCES = {"float64": (1e-10, False), "bf16": (2e-2, True)}


class TinyCausalLM(nn.Module):
    """A causal LM that is no ``nn.Sequential``: keyword inputs, a block list, a tied head."""

    def __init__(self, width: int, blocks: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(VOCAB, width)
        self.layers = nn.ModuleList(_Block(width, heads) for _ in range(blocks))
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, VOCAB, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.embed(input_ids)
        tokens = input_ids.shape[1]
        causal = torch.ones(tokens, tokens, dtype=torch.bool, device=input_ids.device).tril()
        allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
        for layer in self.layers:
            h = layer(h, allowed)
        return self.lm_head(self.norm(h))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h: Tensor, allowed: Tensor) -> Tensor:
        rows, tokens, width = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(rows, tokens, 3, self.heads, width // self.heads).unbind(2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  attn_mask=allowed)
        h = h + self.out(attended.transpose(1, 2).reshape(rows, tokens, width))
        return h + self.mlp(self.ln2(h))


@dataclass
class Case:
    variant: str
    schedule: str
    stages: int
    policy: str


def build(env: Env) -> tuple[str, nn.Module, str]:
    """(name, model in float32 on the device, prefix of the block list's qualified names)."""
    torch.manual_seed(0)
    width = 32 if env.dry_run else 256
    try:
        import transformers
    except ImportError:
        return "TinyCausalLM (transformers not installed)", TinyCausalLM(width, 4).to(env.device), "layers"
    config = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=width, intermediate_size=2 * width,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      tie_word_embeddings=True, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config)
    return f"Llama, tied (transformers {transformers.__version__})", model.to(env.device), "model.layers"


def batch(env: Env, rows: int = 12, tokens: int = 24) -> tuple[dict[str, Tensor], Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (rows, tokens), generator=generator)
    mask = torch.ones(rows, tokens, dtype=torch.long)
    for row in range(rows):
        mask[row, tokens - row % 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(env.device), "attention_mask": mask.to(env.device)}, labels.to(env.device)


def _logits(output: object) -> Tensor:
    return output if isinstance(output, Tensor) else output["logits"]  # type: ignore[index]


def reference(env: Env, model: nn.Module, inputs: dict[str, Tensor], labels: Tensor,
              autocast: torch.dtype | None) -> list[Tensor]:
    """The plain model's gradients on the whole batch: HF's shifted cross-entropy, token mean."""
    plain = copy.deepcopy(model)
    with env.autocast(autocast):
        logits = _logits(plain(**inputs))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    return [p.grad.detach().clone() for p in plain.parameters()]


def cases(env: Env) -> Iterator[Case]:
    for variant in ("float64", "bf16"):
        for schedule, stages in (("1f1b", 2), ("zb-h1", 2), ("gpipe", 2), ("zb-v", 4)):
            for policy in ("never", "always"):
                if env.dry_run and (policy == "never" or schedule == "gpipe"):
                    continue
                yield Case(variant, schedule, stages, policy)


def run_case(env: Env, model: nn.Module, prefix: str, case: Case, inputs: dict[str, Tensor],
             labels: Tensor) -> list[Tensor]:
    model = copy.deepcopy(model)
    points = [f"{prefix}.{block}" for block in range(1, 4)] if case.stages == 4 else [f"{prefix}.2"]
    with Pipeline(model, split_points=points, schedule=case.schedule, devices=[env.device] * 2, chunks=4,
                  checkpoint=case.policy, loss_fn=CausalLMLoss(), stall_timeout=120.0,
                  example_inputs={key: value[:3] for key, value in inputs.items()}) as pipe:
        with env.autocast(torch.bfloat16 if case.variant == "bf16" else None):
            pipe.step(inputs, labels)
    env.sync()
    return [p.grad.detach().clone() if p.grad is not None else torch.full_like(p, float("nan"))
            for p in model.parameters()]


def run(env: Env, results: Results, budget: ItemBudget) -> ItemResult:
    item = results.add_item(NAME, TITLE, COLUMNS)
    name, model, prefix = build(env)
    results.note(item, f"model: {name}; 2 ranks on {env.device}, 4 micro-batches, right-padded batch of 12 x 24")
    inputs, labels = batch(env)
    models = {"float64": copy.deepcopy(model).double(), "bf16": model}
    references = {"float64": reference(env, models["float64"], inputs, labels, None),
                  "bf16": reference(env, models["bf16"], inputs, labels, torch.bfloat16)}
    estimate = 5.0
    for case in cases(env):
        label = f"{case.variant} {case.schedule} {case.policy}"
        if item.rows and not budget.fits(estimate):
            results.skip(item, label, f"item budget ({budget.left():.0f} s left, ~{estimate:.1f} s needed)")
            continue
        try:
            seconds, grads = env.timed(run_case, env, models[case.variant], prefix, case, inputs, labels)
        except Exception as error:  # noqa: BLE001 - recorded, the run goes on
            results.fail(item, f"{label}: raised {type(error).__name__}: {error}")
            continue
        estimate = max(1.0, 1.5 * seconds)
        tolerance, relative = TOLERANCES[case.variant]
        diff, where = distance(grads, references[case.variant], relative)
        ok = diff <= tolerance
        shown = f"{tolerance:g}{' × max abs ref' if relative else ''}"
        results.row(item, model=name.split(" (")[0], variant=case.variant, schedule=case.schedule,
                    stages=case.stages, policy=case.policy, max_abs_diff=diff, tolerance=shown, ok=ok,
                    seconds=seconds)
        if not ok:
            results.fail(item, f"{label}: parameter {where} off by {diff:.3e} (tolerance {shown})")
    return item
