"""Classification with Levenberg-Marquardt: a small CNN on MNIST-like digits drawn here.

The data are seven-segment digits 0-9 on a 14 x 14 canvas, each with a random offset, stroke
width, intensity and Gaussian noise, generated from a seed (nothing is downloaded). The model
(Conv-Tanh-Pool-Conv-Tanh-Pool-Linear, 666 parameters) is trained with fastopt.LM on the
cross-entropy loss (square-root residuals) and, for comparison, with Adam for the same time.

    python bench/lm_cnn_example.py                  # 4000 training and 1000 test images
    python bench/lm_cnn_example.py --epochs 3 --train 2000
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import fastopt
from fastopt.lm.testing import digits, shuffled_batches, train_adam_for


def cnn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.Tanh(),
        torch.nn.MaxPool2d(2),  # 4 x 7 x 7
        torch.nn.Conv2d(4, 8, 3),
        torch.nn.Tanh(),
        torch.nn.MaxPool2d(2),  # 8 x 2 x 2
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    )


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--lm-lr",
        type=float,
        default=0.05,
        help="LM's learning rate (0.05 in the package's "
        "MNIST example: square-root cross-entropy residuals make full Gauss-Newton steps too long)",
    )
    parser.add_argument("--adam-lr", type=float, default=0.01)
    args = parser.parse_args(argv)
    x, y = digits(args.train, seed=0)
    xt, yt = digits(args.test, seed=1)
    ce = torch.nn.CrossEntropyLoss()

    model = cnn()
    print(f"{sum(p.numel() for p in model.parameters())} parameters, {args.train} training images")
    lm = fastopt.LM(model, ce, learning_rate=args.lm_lr)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        record = fastopt.lm.fit(lm, shuffled_batches(x, y, args.batch_size, epoch), epochs=1, progress=False)[0]
        print(
            f"LM   epoch {epoch + 1:2d}  loss {record['loss']:.4f}  damping {record['damping']:.1e}  "
            f"train acc {accuracy(model, x, y):.3f}  test acc {accuracy(model, xt, yt):.3f}"
        )
        if record["stopped"]:
            print("LM   stopped: damping reached its maximum")
            break
    lm_time = time.perf_counter() - start

    adam_model = cnn()
    _, epoch = train_adam_for(adam_model, ce, x, y, args.batch_size, lm_time, args.adam_lr)
    print(f"\nLevenberg-Marquardt ({lm_time:.1f} s): test accuracy {accuracy(model, xt, yt):.3f}")
    print(f"Adam, {epoch} epochs in the same time: test accuracy {accuracy(adam_model, xt, yt):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
