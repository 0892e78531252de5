"""Speed of ``pcl_ext.RingQueue.enqueue_`` against MoCo's ``_dequeue_and_enqueue`` (same run,
same keys). MoCo keeps the queue as [dim, size] with a pointer it reads back to the host
(``int(self.queue_ptr)``: a device-to-host sync on CUDA) and needs size % B == 0; the
"moco-int" column keeps the pointer as a Python int instead, so it never syncs.

Each repeat times ``--calls`` back-to-back enqueues (synchronized only around the loop) and
reports the time per call.

    python benchmarks/queue_speed.py --device cpu --threads 1
    python benchmarks/queue_speed.py --quick
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import pcl_ext
from common import (add_seed_and_json, argument_parser, environment, format_header, format_row,
                    init_device, summary, sync, timed, write_results)
from pcl_ext.reference import moco_dequeue_and_enqueue_


class MoCoQueue:
    """MoCo's queue (facebookresearch/moco builder.py), minus concat_all_gather; with
    ``host_ptr`` the pointer stays a Python int instead of a buffer read back each call."""

    def __init__(self, initial: Tensor, host_ptr: bool) -> None:
        self.queue = initial.t().contiguous()  # dim x size, as MoCo registers it
        self.queue_ptr = torch.zeros(1, dtype=torch.long, device=initial.device)
        self.host_ptr = 0 if host_ptr else None

    def dequeue_and_enqueue(self, keys: Tensor) -> None:
        if self.host_ptr is not None:
            self.host_ptr = moco_dequeue_and_enqueue_(self.queue, self.host_ptr, keys)
        else:
            self.queue_ptr[0] = moco_dequeue_and_enqueue_(self.queue, int(self.queue_ptr), keys)


def time_calls(fn: Callable[[Tensor], None], keys: list[Tensor], device: torch.device,
               warmup: int, repeats: int, calls: int) -> list[float]:
    """Seconds per call, one number per repeat of `calls` back-to-back calls."""
    def burst(n: int) -> None:
        for i in range(n):
            fn(keys[i % len(keys)])

    burst(warmup)
    return [timed(lambda: burst(calls), device)[1] / calls for _ in range(repeats)]


def run_size(size: int, args: argparse.Namespace, device: torch.device, warmup: int,
             repeats: int, calls: int) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    initial = F.normalize(torch.randn(size, args.dim, generator=gen), dim=1).to(device)
    keys = [F.normalize(torch.randn(args.batch, args.dim, generator=gen), dim=1).to(device)
            for _ in range(4)]
    ring = pcl_ext.RingQueue(size, args.dim, device=device)
    ring.buffer.copy_(initial)
    moco, moco_int = MoCoQueue(initial, host_ptr=False), MoCoQueue(initial, host_ptr=True)
    fns = {"ring": ring.enqueue_, "moco": moco.dequeue_and_enqueue,
           "moco-int": moco_int.dequeue_and_enqueue}
    out = dict(size=size, batch=args.batch, dim=args.dim, warmup=warmup, repeats=repeats,
               calls=calls)
    for name, fn in fns.items():
        out[name] = summary(time_calls(fn, keys, device, warmup, repeats, calls), "us")
    # Every side ran the same number of calls on the same keys: the queues must agree.
    sync(device)
    out["max_abs_diff"] = max((ring.buffer - q.queue.t()).abs().max().item()
                              for q in (moco, moco_int))
    out["same_ptr"] = int(ring.ptr) == int(moco.queue_ptr) == moco_int.host_ptr
    out["speedup_vs_moco"] = out["moco"]["median_us"] / out["ring"]["median_us"]
    out["speedup_vs_moco_int"] = out["moco-int"]["median_us"] / out["ring"]["median_us"]
    return out


COLUMNS = (("size", 6), ("B", 4), ("dim", 4), ("device", 6), ("thr", 3),
           ("ring us [IQR]", 20), ("moco us [IQR]", 20), ("moco-int us [IQR]", 20),
           ("vs moco", 7), ("vs int", 7), ("same", 5))


def table_row(r: dict, device: str, threads: int) -> str:
    def us(side: str) -> str:
        s = r[side]
        return f"{s['median_us']:.3g} [{s['iqr_us'][0]:.3g}-{s['iqr_us'][1]:.3g}]"

    same = r["max_abs_diff"] == 0 and r["same_ptr"]
    cells = (r["size"], r["batch"], r["dim"], device, threads, us("ring"), us("moco"),
             us("moco-int"), f"{r['speedup_vs_moco']:.2f}x", f"{r['speedup_vs_moco_int']:.2f}x",
             "yes" if same else "NO")
    return format_row(cells, COLUMNS)


def parse_args() -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--sizes", default="16384,65536", help="comma list of queue sizes")
    p.add_argument("--batch", type=int, default=256, help="keys per enqueue (B)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default: 30)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 50)")
    p.add_argument("--calls", type=int, default=None,
                   help="enqueues per repeat (default: 1000 on CUDA, 200 on CPU)")
    p.add_argument("--quick", action="store_true", help="5 repeats of 20 calls: a smoke run")
    add_seed_and_json(p, "queue_speed-<device>-<threads>t[-quick].json")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    bad = [s for s in sizes if s % args.batch]
    if bad:
        raise SystemExit(f"MoCo's queue needs size % B == 0; {bad} are not multiples of "
                         f"{args.batch}")
    device, threads = init_device(args)
    warmup = args.warmup if args.warmup is not None else (5 if args.quick else 50)
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 30)
    calls = args.calls if args.calls is not None else (
        20 if args.quick else 1000 if device.type == "cuda" else 200)

    env = environment(device, dtype="float32", seed=args.seed)
    print(f"# {env['device_name']}, torch {env['torch']}, {threads} threads, float32; "
          f"us per enqueue, median [IQR] of {repeats} x {calls} calls")
    print(format_header(COLUMNS))
    results = []
    for size in sizes:
        results.append(run_size(size, args, device, warmup, repeats, calls))
        print(table_row(results[-1], device.type, threads), flush=True)

    default = f"queue_speed-{device.type}-{threads}t{'-quick' if args.quick else ''}.json"
    write_results(dict(environment=env, results=results), args.json, default)


if __name__ == "__main__":
    main()
