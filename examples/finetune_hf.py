"""Fine-tune a Hugging Face causal LM through pipesched, with the model as transformers builds it.

::

    python examples/finetune_hf.py                       # a tiny random Llama, 2 CPU ranks
    python examples/finetune_hf.py --arch gpt2 --schedule zb-h1 --steps 20
    python examples/finetune_hf.py --pretrained <hub-name> --devices cuda:0 cuda:1

No adapter, no label shift, no loss normaliser: ``Pipeline`` traces the model's
own forward and cuts it at ``--split-points`` (default: the middle of its
block list), ``CausalLMLoss`` shifts the labels and counts tokens. The batch
here is random tokens, right-padded, repeated every step, so the loss falls
as the model memorises it; swap in your tokenizer and data loader.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from pipesched import CausalLMLoss, Pipeline


def build_model(arch: str, pretrained: str | None) -> torch.nn.Module:
    import transformers  # noqa: PLC0415 - an optional dependency, needed only here

    if pretrained is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(pretrained)
    if arch == "gpt2":
        config = transformers.GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=256, n_positions=128)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    return transformers.LlamaForCausalLM(config)


def padded_batch(rows: int, tokens: int, vocab: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random token rows of different lengths, right-padded; labels -100 on padding (HF's convention)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, tokens), generator=generator)
    lengths = torch.randint(tokens // 2, tokens + 1, (rows,), generator=generator)
    mask = (torch.arange(tokens) < lengths[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask}, ids.masked_fill(mask == 0, -100)


def main(argv: Sequence[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["llama", "gpt2"], default="llama")
    parser.add_argument("--pretrained", default=None, help="a Hub model name (downloads it) instead of --arch")
    parser.add_argument("--split-points", nargs="*", default=None, help="e.g. model.layers.2 (default: balanced)")
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--devices", nargs="*", default=None)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, nargs=2, default=[8, 32], metavar=("ROWS", "TOKENS"))
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = build_model(args.arch, args.pretrained)
    pipe = Pipeline(model, split_points=args.split_points, schedule=args.schedule, devices=args.devices,
                    chunks=args.chunks, loss_fn=CausalLMLoss())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    inputs, labels = padded_batch(*args.batch, vocab=model.config.vocab_size)
    losses = []
    with pipe:
        for step in range(args.steps):
            optimizer.zero_grad()
            loss = pipe.step(inputs, labels)
            optimizer.step()
            losses.append(float(loss))
            print(f"step {step}: loss {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    main()
