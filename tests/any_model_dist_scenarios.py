"""Code that runs inside the spawned processes of tests/test_any_model_distributed.py.

Every process builds the same float64 Hugging Face model from a tiny config
and a seed, keeps an untouched copy as its un-pipelined reference, and runs
``DistributedPipeline(model, split_points=...)`` on it. Each scenario writes
per-rank verdicts (errors against the reference, what crossed the wire) to
``OUT/rank{r}.json``; the test process only reads them.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dist_scenarios import run_scenarios
from test_any_model import reference  # the plain model's loss (HF's shifted cross-entropy in float64), gradients


def gpt2() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=100, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).double()


def llama(**extra) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100, **extra)
    return transformers.LlamaForCausalLM(config).double()


def batch(rows: int, tokens: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Right-padded rows of different lengths; labels are the ids, -100 on padding (HF's convention)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (rows, tokens), generator=generator)
    mask = torch.ones(rows, tokens, dtype=torch.long)
    for row in range(rows):
        if row % 3:
            mask[row, tokens - row % 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, -100)


def exact_steps(rank: int, build, split_points: list[str], schedule: str) -> dict:
    """Two steps (the second at another batch size and length, uneven micro-batches) against the plain model.

    Every parameter this rank's stages hold is compared (a tied weight after its
    gradients were summed across the processes); ``covered`` counts the model's
    parameters compared on this rank, so the test can check the ranks cover all.
    """
    from pipesched import CausalLMLoss
    from pipesched.distributed import DistributedPipeline

    model = build()
    plain = copy.deepcopy(model)
    names = {id(p): name for name, p in model.named_parameters()}
    loss_gap, grad_gap, covered, missing = 0.0, 0.0, set(), []
    with DistributedPipeline(model, split_points=split_points, schedule=schedule, chunks=4,
                             loss_fn=CausalLMLoss()) as pipe:
        first, last = pipe.placement[0] == rank, pipe.placement[-1] == rank
        for rows, tokens, seed in ((8, 12, 1), (6, 7, 2)):
            inputs, labels = batch(rows, tokens, seed)
            expected, grads = reference(plain, inputs, labels)
            expected = float(expected)
            loss = pipe.step(inputs if first else None, labels if last else None)
            loss_gap = max(loss_gap, abs(float(loss) - expected))
            for param in pipe.parameters():
                name = names[id(param)]
                covered.add(name)
                if param.grad is None:
                    missing.append(name)
                    continue
                grad_gap = max(grad_gap, float((param.grad - grads[name]).abs().max()))
            model.zero_grad()
        held = set(pipe.state_dict())
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return {"loss": loss_gap, "grad": grad_gap, "covered": sorted(covered), "missing": missing,
            "all": sorted(names.values()), "state_keys": sorted(held), "model_keys": sorted(plain.state_dict()),
            "tied": tied, "placement": list(pipe.placement)}


def scenario_gpt2(rank: int, world: int, out: dict) -> None:
    """GPT-2, tied embedding/head: 1F1B and ZB-H1 put them on two processes, ZB-V's V on one."""
    for schedule, points in [("1f1b", ["transformer.h.2"]), ("zb-h1", ["transformer.h.2"]),
                             ("zb-v", ["transformer.h.1", "transformer.h.2", "transformer.h.3"])]:
        out[f"gpt2/{schedule}"] = exact_steps(rank, gpt2, points, schedule)


def scenario_llama(rank: int, world: int, out: dict) -> None:
    """Llama (rotary cos/sin made on stage 0 and sent), untied and tied; interleaved 1F1B: four stages."""
    out["llama/1f1b"] = exact_steps(rank, llama, ["model.layers.2"], "1f1b")
    out["llama/zb-h1"] = exact_steps(rank, llama, ["model.layers.2"], "zb-h1")
    out["llama-tied/interleaved-1f1b"] = exact_steps(
        rank, lambda: llama(tie_word_embeddings=True), ["model.layers.1", "model.layers.2", "model.layers.3"],
        "interleaved-1f1b")


class SharedScale(nn.Module):
    """A buffer read by every block: stages on both processes read it (replicated by copy)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(6, 6) for _ in range(4))
        self.register_buffer("scale", torch.rand(6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x) * self.scale)
        return self.head(x)


def scenario_shared_buffer(rank: int, world: int, out: dict) -> None:
    """Each process starts with its own value of the buffer (seeded by rank): the lowest holder's wins,
    and both processes then compute what the plain model with that value computes."""
    from pipesched.distributed import DistributedPipeline

    torch.manual_seed(0)
    model = SharedScale().double()
    plain = copy.deepcopy(model)
    model.scale.fill_(1.0 + rank)  # disagree on purpose
    plain.scale.fill_(1.0)
    x = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(4))
    F.cross_entropy(plain(x), y).backward()
    with DistributedPipeline(model, example_inputs={"x": x[:2]}, schedule="1f1b", chunks=4,
                             loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.step({"x": x} if rank == 0 else None, y if rank == world - 1 else None)
        names = {id(p): n for n, p in model.named_parameters()}
        reference = dict(plain.named_parameters())
        out["shared_buffer"] = {
            "scale": float(model.scale[0]),
            "grad": max(float((p.grad - reference[names[id(p)]].grad).abs().max()) for p in pipe.parameters()),
            "reads_buffer": any(b is model.scale for b in pipe.local_stages.buffers()),
        }


def scenario_wire(rank: int, world: int, out: dict) -> None:
    """What actually crosses between the processes for a Llama: every message's bytes, and every
    tensor the first stage hands the transport (so a (B, 1, T, T) mask would be seen)."""
    from pipesched import CausalLMLoss
    from pipesched.distributed import DistributedPipeline

    model = llama()
    with DistributedPipeline(model, split_points=["model.layers.2"], schedule="1f1b", chunks=2,
                             checkpoint="never", loss_fn=CausalLMLoss()) as pipe:  # no recompute: one F each
        shapes: list[list[int]] = []
        if rank == 0:
            stage = pipe.local_stages["0"]
            stage.register_forward_hook(lambda _m, _i, output: shapes.extend(list(t.shape) for t in output))
        inputs, labels = batch(4, 10, 5)
        pipe.step(inputs if rank == 0 else None, labels if rank == 1 else None)
        sent = [{"kind": r.kind, "action": r.action, "bytes": r.nbytes} for r in pipe.last_comm]
    out["wire"] = {"shapes": shapes, "sent": sent}


def scenario_refusals(rank: int, world: int, out: dict) -> None:
    """Bad inputs on stage 0's rank fail the step on every rank (no rank left waiting), naming the fix;
    a model the cut cannot capture is refused on every rank at construction."""
    from pipesched import CausalLMLoss
    from pipesched.distributed import DistributedPipeline, RemoteStepError

    model = llama()
    with DistributedPipeline(model, split_points=["model.layers.2"], schedule="1f1b", chunks=2,
                             loss_fn=CausalLMLoss()) as pipe:
        inputs, labels = batch(4, 6, 6)
        try:
            pipe.step({"input_ids": inputs["input_ids"]} if rank == 0 else None, labels if rank == 1 else None)
            out["wrong_keys"] = "no error"
        except (ValueError, RemoteStepError) as error:
            out["wrong_keys"] = f"{type(error).__name__}: {error}"
        loss = pipe.step(inputs if rank == 0 else None, labels if rank == 1 else None)  # still usable
        out["after"] = bool(torch.isfinite(loss))
        with torch.no_grad():  # the forward half: the model's own output on the last stage's rank
            output = pipe(inputs if rank == 0 else None)
            out["forward"] = None if output is None else float((output["logits"] - model(**inputs).logits).abs().max())

    from test_any_model import DataDependent  # data-dependent control flow: torch.export cannot capture it

    try:
        DistributedPipeline(DataDependent(), example_inputs={"x": torch.randn(2, 4)}, schedule="1f1b")
        out["uncapturable"] = "no error"
    except (ValueError, RemoteStepError) as error:
        out["uncapturable"] = f"{type(error).__name__}: {error}"
    dist.barrier()


class Attending(nn.Module):
    """Returns ``(hidden, None)`` as a Hugging Face layer does without attention weights."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 6)

    def forward(self, x):
        return torch.tanh(self.linear(x)), None


class Receiving(nn.Module):
    """Takes the pair; records what arrived in the slot of the ``None``."""

    seen: list[str] = []

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, pair):
        hidden, weights = pair
        Receiving.seen.append(type(weights).__name__)
        return self.linear(hidden)


def scenario_none_entries(rank: int, world: int, out: dict) -> None:
    """A stage's output ``(hidden, None)`` crosses processes: only the tensor is sent, and the next
    stage gets ``None`` back in its slot; gradients equal the plain model's."""
    from pipesched.distributed import DistributedPipeline

    torch.manual_seed(0)
    model = nn.Sequential(Attending(), Receiving()).double()
    plain = copy.deepcopy(model)
    x = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(8))
    F.cross_entropy(plain(x), y).backward()
    Receiving.seen.clear()
    with DistributedPipeline(model, balance=[1, 1], schedule="1f1b", chunks=3, loss_fn=nn.CrossEntropyLoss()) as pipe:
        pipe.step(x if rank == 0 else None, y if rank == 1 else None)
        sent = [r.nbytes for r in pipe.last_comm if r.kind == "send" and r.action.startswith("F")]
    out["none_entries"] = {
        "seen": list(Receiving.seen),
        "grad": max(float((p.grad - q.grad).abs().max()) for p, q in zip(model.parameters(), plain.parameters())
                    if p.grad is not None),
        "sent": sent,
    }


SCENARIOS = {"none_entries": scenario_none_entries, "gpt2": scenario_gpt2, "llama": scenario_llama, "shared_buffer": scenario_shared_buffer,
             "wire": scenario_wire, "refusals": scenario_refusals}


def entry(rank: int, world: int, port: int, names: list[str], directory: str) -> None:
    run_scenarios(rank, world, port, names, directory, lambda name, out: SCENARIOS[name](rank, world, out),
                  isolate=True)
