"""Speed of the linear probe (``pcl_ext.evaluate.linear_probe``) against the scikit-learn
probe it replaced, on the same cached features: seconds, the objective each one reaches,
test top-1, and how often their predictions agree.

    python benchmarks/linear_probe_speed.py --checkpoint runs/f16-pcl/checkpoint.pt \\
        --features build/f16-features.pt --threads 1
    python benchmarks/linear_probe_speed.py --features build/f16-features.pt  # cached

``--checkpoint`` extracts the query encoder's backbone features of the full train and test
splits (what ``pcl_ext.evaluate`` probes) and saves them to ``--features``; without it the
features are read from there. Both probes solve scikit-learn's ``LogisticRegression``
problem (C = 1, standardized features); the objective is evaluated in float64 at each
solution, so a lower one is the more converged.
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from common import (argument_parser, environment, format_header, format_row, init_device,
                    summary, time_round_robin, write_results)
from pcl_ext.evaluate import fit_logistic_regression


def sklearn_probe(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """The previous ``linear_probe``: StandardScaler + LogisticRegression(max_iter=1000)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a ConvergenceWarning shows in "iterations"
        probe.fit(x.numpy(), y.numpy())
    scaler, model = probe
    return (torch.from_numpy(model.coef_).double(), torch.from_numpy(model.intercept_).double(),
            torch.from_numpy(scaler.mean_).double(), torch.from_numpy(scaler.scale_).double(),
            int(model.n_iter_[0]))


def objective(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, mean: Tensor,
              std: Tensor) -> float:
    z = (x.double() - mean) / std
    return (F.cross_entropy(z @ weight.t() + bias, y)
            + weight.square().sum() / (2 * len(x))).item()


def predict(x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (((x.double() - mean) / std) @ weight.t() + bias).argmax(1)


def load_features(args: argparse.Namespace) -> dict:
    if args.checkpoint is None:
        return torch.load(args.features)
    from torch.utils.data import DataLoader

    from pcl_ext.data import build_datasets
    from pcl_ext.evaluate import extract_features, initial_encoder

    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    a = ckpt["args"]
    _, train_eval, test, info = build_datasets(a["dataset"], a["data_root"],
                                               image_size=a["image_size"])
    encoder = initial_encoder(a, info)
    encoder.load_state_dict(ckpt["model_q"])
    encoder.eval()
    feats = {name: extract_features(encoder.features, DataLoader(ds, batch_size=512), "cpu")
             for name, ds in (("train", train_eval), ("test", test))}
    args.features.parent.mkdir(parents=True, exist_ok=True)
    torch.save(feats, args.features)
    return feats


COLUMNS = (("probe", 12), ("s median [min-max]", 22), ("speedup", 7), ("objective", 12),
           ("top-1 %", 7), ("iterations", 10))


def main() -> None:
    p = argument_parser(__doc__.split("\n\n")[0])
    p.add_argument("--features", type=Path, required=True,
                   help="cached features {'train': (x, y), 'test': (x, y)} (written with "
                        "--checkpoint, read otherwise)")
    p.add_argument("--checkpoint", type=Path, help="a pcl_ext.train checkpoint to encode")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="output (default: benchmarks/results/"
                   "linear_probe_speed-<device>-<threads>t.json)")
    args = p.parse_args()
    device, threads = init_device(args)
    feats = load_features(args)
    (train_x, train_y), (test_x, test_y) = feats["train"], feats["test"]
    train_x, train_y = train_x.to(device), train_y.to(device)
    solutions = {}
    fns = {"scikit-learn": lambda: solutions.__setitem__(
               "scikit-learn", sklearn_probe(train_x.cpu(), train_y.cpu())),
           "pcl_ext": lambda: solutions.__setitem__(
               "pcl_ext", tuple(t.cpu() for t in fit_logistic_regression(train_x, train_y)))}
    # One untimed round: imports (torch.optim loads torch._dynamo), BLAS and CUDA warm-up.
    times = time_round_robin(fns, device, warmup=1, repeats=args.repeats)
    env = environment(device, n_train=len(train_x), n_test=len(test_x), d=train_x.shape[1],
                      repeats=args.repeats, features=str(args.features))
    print(f"# {env['device_name']}, torch {env['torch']}, {threads} threads, "
          f"{len(train_x)} x {train_x.shape[1]} training features")
    print(format_header(COLUMNS))
    results = {}
    base = summary(times["scikit-learn"], "s")["median_s"]
    for name in fns:
        weight, bias, mean, std, *iterations = solutions[name]
        predicted = predict(test_x, weight, bias, mean, std)
        results[name] = dict(seconds=summary(times[name], "s"),
                             objective=objective(train_x.cpu(), train_y.cpu(), weight, bias,
                                                 mean, std),
                             top1=100 * (predicted == test_y).double().mean().item(),
                             iterations=iterations[0] if iterations else None,
                             predictions=predicted)
        s = results[name]["seconds"]
        print(format_row((name, f"{s['median_s']:.1f} [{s['min_s']:.1f}-{s['max_s']:.1f}]",
                          f"{base / s['median_s']:.2f}", f"{results[name]['objective']:.7f}",
                          f"{results[name]['top1']:.2f}", iterations[0] if iterations else "-"),
                         COLUMNS), flush=True)
    same = (results["pcl_ext"].pop("predictions") == results["scikit-learn"].pop(
        "predictions")).double().mean().item()
    print(f"# same test prediction: {100 * same:.2f}%")
    write_results(dict(environment=env, results=results, same_prediction_share=same),
                  args.json, f"linear_probe_speed-{device.type}-{threads}t.json")


if __name__ == "__main__":
    main()
