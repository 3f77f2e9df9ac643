"""Online data mixing in a plain PyTorch loop: a small GPT, DDP, torchrun, no Composer.

    python -m torch.distributed.run --nproc_per_node 2 recipes/torchrun_example.py \\
        --manifest corpus/mixture.json --out runs/torchrun --method odm --steps 200
    # killed? the same command with --resume continues from the last checkpoint, exactly

Every rank streams its share of each global batch from a ``DynamicStreamingDataset``; a
mixer (:mod:`mixstream.mixing`) is told each batch's per-token losses and group ids
(``observe``) and that the batch is done (``step``), and changes the dataset's weights
live. Checkpoints (every ``--checkpoint-every`` batches, in ``OUT/checkpoints``) hold the
model, the optimizer, the dataset's and the mixer's states and every rank's RNG, so a
resumed run trains on the same samples and makes the same mixing decisions as one that was
never stopped. The mixer writes ``OUT/mixture_history.jsonl`` and, at the end,
``OUT/weights.json`` (``mixstream plot OUT`` draws them).

Methods: ``odm`` and ``ado`` learn from the training losses alone; ``aioli`` and
``skillit`` also measure each group's loss on the manifest's ``val`` split
(``GroupEvaluator``). Method options: ``--option key=value`` (JSON values), e.g.
``--option warmup_steps=50`` for ADO on a short run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from mixstream import DynamicStreamingDataset, Manifest
from mixstream.mixing import MIXERS, GroupEvaluator, Mixer


# --------------------------------------------------------------------------- a tiny GPT
class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.heads, C // self.heads).transpose(1, 2)
            for t in self.qkv(self.ln1(x)).split(C, dim=2)
        )
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """nanoGPT in miniature: token + position embeddings, pre-norm blocks, tied head."""

    def __init__(
        self, vocab: int, seq_len: int, layers: int, heads: int, dim: int, dropout: float
    ) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.ln, self.drop = nn.LayerNorm(dim), nn.Dropout(dropout)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight
        for module in self.modules():  # nanoGPT's initialisation
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def token_losses(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of every predicted token of packed sequences, ``(B, T-1)``."""
    ids = input_ids.long()
    logits = model(ids[:, :-1])
    flat = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return flat.view(ids.shape[0], -1)


# --------------------------------------------------------------------------- checkpoints
def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob("step-*.pt"))
    return found[-1] if found else None


def save_checkpoint(folder: Path, step: int, state: dict[str, Any]) -> None:
    """Every rank's RNG is gathered; rank 0 writes ``step-N.pt`` atomically (collective)."""
    rngs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, torch.get_rng_state())
    if dist.get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".step-{step:08d}.pt.tmp"
        torch.save({**state, "step": step, "rng": rngs}, tmp)
        os.replace(tmp, folder / f"step-{step:08d}.pt")
    dist.barrier()  # a checkpoint exists once every rank is past it


# --------------------------------------------------------------------------- the run
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="a tokenized corpus' mixture.json")
    parser.add_argument("--out", required=True, type=Path, help="run folder")
    parser.add_argument("--method", choices=sorted(MIXERS), default="odm")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a mixer option, the value in JSON (repeatable)",
    )
    parser.add_argument("--steps", type=int, default=200, help="global batches to train")
    parser.add_argument("--batch-size", type=int, default=16, help="global batch size")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-samples", type=int, default=32, help="val sequences per group")
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument(
        "--sample-log",
        type=Path,
        default=None,
        help="append every batch's group ids and token sums to PATH.rankN",
    )
    parser.add_argument(
        "--kill-at",
        type=int,
        default=None,
        help="SIGKILL every rank after this batch (to try --resume)",
    )
    return parser.parse_args(argv)


def mixer_options(pairs: list[str]) -> dict[str, Any]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option {pair!r}: expected KEY=VALUE, e.g. warmup_steps=50")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value  # a bare string, e.g. counts=group or a weights.json path
    return options


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dist.init_process_group("gloo")  # torchrun's RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by {world} ranks")
    torch.manual_seed(args.seed)
    manifest = Manifest.load(args.manifest)
    vocab = (manifest.tokenizer or {}).get("vocab_size")
    if manifest.sample.get("format") != "tokens" or not vocab:
        raise SystemExit(f"{args.manifest} is not a tokenized corpus (shard-tools --tokenizer)")
    seq_len = int(manifest.sample["seq_len"])

    dataset = DynamicStreamingDataset(
        manifest=manifest,
        batch_size=args.batch_size // world,
        num_workers=args.workers,
        seed=args.seed,
        lockstep=True,
    )
    model = GPT(vocab, seq_len - 1, args.layers, args.heads, args.dim, args.dropout)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    evaluate = GroupEvaluator(
        dataset,
        model,
        lambda batch: token_losses(model, batch["input_ids"]),
        samples_per_group=args.val_samples,
    )
    mixer: Mixer = MIXERS[args.method](
        dataset,
        run_dir=args.out,
        evaluate=evaluate,
        total_steps=args.steps,
        log_interval=args.log_every,
        **mixer_options(args.option),
    )

    checkpoints = args.out / "checkpoints"
    found = latest_checkpoint(checkpoints) if args.resume else None
    if found is not None:
        ckpt = torch.load(found, map_location="cpu", weights_only=False)
        if ckpt["method"] != args.method:
            raise SystemExit(f"{found} is a {ckpt['method']} run; pass --method {ckpt['method']}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        dataset.load_state_dict(ckpt["dataset"])
        mixer.load_state_dict(ckpt["mixer"])
    mixer.start()  # before the DataLoader is iterated
    step = mixer.steps_done
    if rank == 0:
        print(f"{args.method}: batch {step} of {args.steps}, {world} ranks", flush=True)

    loader = DataLoader(dataset, batch_size=dataset.device_batch_size, num_workers=args.workers)
    batches = iter(loader)
    if found is not None:  # after iter(): a DataLoader iterator draws its seed from the RNG
        torch.set_rng_state(ckpt["rng"][rank])
    while step < args.steps:
        yielded = 0  # batches from this iterator: the dataset's position is relative to it
        for batch in batches:
            losses = token_losses(ddp, batch["input_ids"])
            optimizer.zero_grad(set_to_none=True)
            losses.mean().backward()
            optimizer.step()
            mixer.observe(losses, batch["group"])
            step, yielded = step + 1, yielded + 1
            mixer.step(step)  # collective: the mixer may change the weights here
            if args.sample_log is not None:
                row = {
                    "step": step,
                    "groups": batch["group"].tolist(),
                    "sums": batch["input_ids"].long().sum(dim=1).tolist(),
                }
                with open(f"{args.sample_log}.rank{rank}", "a") as f:
                    f.write(json.dumps(row) + "\n")
            if rank == 0 and step % args.log_every == 0:
                weights = " ".join(f"{g}={w:.3f}" for g, w in dataset.weights.items())
                print(
                    f"step {step}  loss {losses.mean().item():.4f}  weights {weights}", flush=True
                )
            if step % args.checkpoint_every == 0 or step == args.steps:
                save_checkpoint(
                    checkpoints,
                    step,
                    {
                        "method": args.method,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "mixer": mixer.state_dict(),
                        "dataset": dataset.state_dict(yielded * args.batch_size, False),
                    },
                )
            if step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if step >= args.steps:
                break
        if step < args.steps:
            batches = iter(loader)  # the next epoch
    mixer.finish()
    if rank == 0:
        print(f"done: {args.out / 'weights.json'}", flush=True)
    dataset.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
