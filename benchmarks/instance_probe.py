"""The instance (MoCo) loss of checkpoints under fixed encoders: what the training log cannot show.

    python -m pcl_ext.train ... --keep-checkpoints --out runs/x      # checkpoint-e<N>.pt per epoch
    python benchmarks/instance_probe.py runs/x/checkpoint-e*.pt

The loss a MoCo or PCL run logs is measured while it trains: each step's negatives are the
queue's keys, encoded by the momentum encoder over the previous steps, and that encoder trails
the query encoder. While the learning rate is high the queue's older keys are easier to tell
from the current positive than keys of the present encoder would be, so the logged loss is
lower than the representation's own; as the learning rate goes to zero the gap closes and the
logged loss can rise although nothing got worse. This probe holds each checkpoint's encoders
fixed and measures the instance InfoNCE on the same inputs for every checkpoint:

* ``fixed``: queries of ``--queries`` training images (one augmented view each), their
  positives (the other view, key encoder) and a fresh queue of ``--queue`` other images' keys,
  all encoded now by the checkpoint's encoders (batch norm in training mode, batches of the
  run's batch size, as training sees them);
* ``saved queue``: the same queries and positives against the queue saved in the checkpoint
  (the keys the run's last steps left there);
* the run's own log: the loss and top-1 of its last epoch.

Views and images are drawn from ``--seed`` alone, so the rows are comparable with each other.
Saved as JSON (``benchmarks/results/instance_probe-cpu-<T>t.json``).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common import (add_seed_and_json, argument_parser, environment, format_header,
                    format_row, init_device, write_results)
from pcl_ext.data import RAND_AUGMENT, build_datasets
from pcl_ext.evaluate import initial_encoder, load_checkpoint

COLUMNS = [("checkpoint", 28), ("epoch", 6), ("lr", 8), ("logged loss", 12),
           ("logged top-1", 13), ("fixed loss", 11), ("fixed top-1", 12),
           ("saved-queue loss", 17), ("align", 7)]
# What the probe reads from a checkpoint's args to build its inputs: they must agree.
DATA_ARGS = ("dataset", "data_root", "image_size", "crop_min", "aug", "randaug_ops",
             "randaug_magnitude", "max_samples")


def encode(model: nn.Module, images: Tensor, batch: int, device: torch.device) -> Tensor:
    return F.normalize(torch.cat([model(part.to(device)).float()
                                  for part in images.split(batch)]), dim=1)


def instance_loss(q: Tensor, pos: Tensor, negatives: Tensor, temperature: float) -> tuple:
    """MoCo's InfoNCE (mean over rows) and its top-1 (%), column 0 the positive."""
    logits = torch.cat([(q * pos).sum(1, keepdim=True), q @ negatives.T], 1) / temperature
    target = torch.zeros(len(q), dtype=torch.long, device=q.device)
    return (F.cross_entropy(logits.double(), target).item(),
            (logits.argmax(1) == 0).double().mean().item() * 100)


def main() -> None:
    p = argument_parser(__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", type=Path, nargs="+")
    p.add_argument("--queries", type=int, default=1024, help="query images (default 1024)")
    p.add_argument("--queue", type=int, default=None,
                   help="fresh negatives (default: the run's --queue-size)")
    add_seed_and_json(p, "instance_probe-<device>-<T>t.json")
    args = p.parse_args()
    device, threads = init_device(args)
    if args.queries < 1 or (args.queue is not None and args.queue < 1):
        p.error("--queries and --queue must be >= 1")
    ckpts = [load_checkpoint(path) for path in args.checkpoints]
    for path, ckpt in zip(args.checkpoints, ckpts):
        if "model_k" not in ckpt:
            p.error(f"{path}: no momentum encoder or queue (a SimCLR run?): nothing to probe")
        if any(ckpt["args"].get(k) != ckpts[0]["args"].get(k) for k in DATA_ARGS):
            p.error(f"{path}: its data or views differ from {args.checkpoints[0]}'s "
                    f"({', '.join(DATA_ARGS)})")
    a = ckpts[0]["args"]
    train_set, _, _, info = build_datasets(
        a["dataset"], a["data_root"], image_size=a["image_size"], aug=a["aug"],
        crop_scale=None if a["crop_min"] is None else (a["crop_min"], 1.0),
        rand_augment=(a.get("randaug_ops", RAND_AUGMENT[0]),  # older runs: the defaults
                      a.get("randaug_magnitude", RAND_AUGMENT[1])))
    n = len(train_set) if a["max_samples"] is None else min(a["max_samples"], len(train_set))
    queue_size = args.queue or a["queue_size"]
    if args.queries + queue_size > n:
        p.error(f"--queries {args.queries} + queue {queue_size} exceed the run's {n} images")
    torch.manual_seed(args.seed)  # the images, and their views (the transforms draw from it)
    pick = torch.randperm(n)[:args.queries + queue_size].tolist()
    views = [train_set[i][0] for i in pick]
    im_q = torch.stack([v[0] for v in views[:args.queries]])
    im_k = torch.stack([v[1] for v in views])

    rows = []
    print(f"{args.queries} queries, {queue_size} fresh negatives, {a['dataset']} "
          f"({n} images), {threads} thread(s), {environment(device)['device_name']}")
    print(format_header(COLUMNS))
    for path, ckpt in zip(args.checkpoints, ckpts):
        c = ckpt["args"]
        model_q, model_k = initial_encoder(c, info), initial_encoder(c, info)
        model_q.load_state_dict(ckpt["model_q"])
        model_k.load_state_dict(ckpt["model_k"])
        model_q.to(device).train()  # batch statistics, as in training (running stats unused)
        model_k.to(device).train()
        with torch.no_grad():
            q = encode(model_q, im_q, c["batch_size"], device)
            pos = encode(model_k, im_k[:args.queries], c["batch_size"], device)
            fresh = encode(model_k, im_k[args.queries:], c["batch_size"], device)
            saved = F.normalize(ckpt["queue"]["buffer"].to(device).float(), dim=1)
            fixed_loss, fixed_top1 = instance_loss(q, pos, fresh, c["temperature"])
            saved_loss, saved_top1 = instance_loss(q, pos, saved, c["temperature"])
            align = (q - pos).pow(2).sum(1).mean().item()
        last = ckpt["history"][-1]
        row = dict(checkpoint=str(path), epoch=ckpt["epoch"], lr=last["lr"],
                   logged_loss=last["loss"], logged_top1=last["acc_inst"],
                   fixed_loss=fixed_loss, fixed_top1=fixed_top1,
                   saved_queue_loss=saved_loss, saved_queue_top1=saved_top1, align=align)
        rows.append(row)
        print(format_row([path.name[-28:], ckpt["epoch"], f"{last['lr']:.4f}",
                          f"{last['loss']:.4f}", f"{last['acc_inst']:.1f}",
                          f"{fixed_loss:.4f}", f"{fixed_top1:.1f}", f"{saved_loss:.4f}",
                          f"{align:.3f}"], COLUMNS))
    write_results(dict(environment(device, queries=args.queries, queue=queue_size,
                                   seed=args.seed, run_args=a), rows=rows),
                  args.json, f"instance_probe-{device.type}-{threads}t.json")


if __name__ == "__main__":
    main()
