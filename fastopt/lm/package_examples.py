"""torch-levenberg-marquardt's two examples, run against a package given as an argument.

The package's repository has ``examples/sinc_curve_fitting.py`` (a 1-20-1 tanh network fitted to
sinc(10 x), Adam and LM through ``utils.fit``) and ``examples/mnist_classification.py`` (a
five-conv CNN on MNIST, Adam and LM with a torchmetrics accuracy). The functions here take the
same steps through the same public names, with the package passed in as ``tlm``: the
``torch_levenberg_marquardt`` module, or ``fastopt.lm`` (switching is changing that import, which
is what a user does). Differences from the scripts, for a comparison that means something: the
random state is seeded before each model and each fit (the same initial weights and shuffles under
both packages), MNIST is replaced by seven-segment digits drawn on 28 x 28 pixels here (nothing
downloads; :func:`fastopt.lm.testing.digits`), sizes are arguments, and there are no plots.

``bench/tlm_examples.py`` times both packages on both examples; ``tests/test_tlm_examples.py``
checks that fastopt reaches the package's losses on shortened runs.
"""

from __future__ import annotations

import time
from types import ModuleType
from typing import Any, Callable, Dict, Optional

import torch
from torch.utils.data import DataLoader, TensorDataset

from .testing import digits

__all__ = ["sinc_example", "digits_example", "LOADERS"]

LOADERS = ("fast", "dataloader")


def _loader(tlm: ModuleType, dataset: TensorDataset, batch_size: int, repeat: int, loader: str, device) -> Any:
    """The example's ``utils.FastDataLoader``, or a plain shuffled ``DataLoader`` (``repeat`` 1)."""
    if loader == "fast":
        return tlm.utils.FastDataLoader(dataset, batch_size=batch_size, repeat=repeat, shuffle=True, device=device)
    if loader == "dataloader":
        return DataLoader(dataset, batch_size=batch_size, shuffle=True)
    raise ValueError(f"Invalid loader: {loader!r}. Choose from: {LOADERS}")


def _timed_fit(tlm: ModuleType, module: Any, loader: Any, epochs: int, seed: int, **kwargs) -> float:
    torch.manual_seed(seed)  # the shuffles
    start = time.perf_counter()
    tlm.utils.fit(module, loader, epochs=epochs, **kwargs)
    return time.perf_counter() - start


def _train_both(
    tlm: ModuleType,
    network: Callable[[], torch.nn.Module],
    adam_loss: torch.nn.Module,
    lm_module: Callable[[torch.nn.Module], Any],
    train: Any,
    epochs: int,
    seed: int,
    adam: bool,
    evaluate: Callable[[torch.nn.Module], Dict[str, float]],
    fit_kwargs: Callable[[], Dict[str, Any]] = dict,
) -> Dict[str, float]:
    """What both examples do: Adam (lr 0.01) through ``OptimizerModule``, then LM, each on a fresh
    copy of the network made from ``seed``, each fit timed; ``{trainer}_seconds`` and
    ``{trainer}_{name}`` for each value ``evaluate`` returns."""
    result: Dict[str, float] = {}
    for name in ("adam", "lm") if adam else ("lm",):
        torch.manual_seed(seed)  # the same initial weights under both packages
        model = network()
        if name == "adam":
            optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
            module = tlm.training.OptimizerModule(model=model, optimizer=optimizer, loss_fn=adam_loss)
        else:
            module = lm_module(model)
        result[f"{name}_seconds"] = _timed_fit(tlm, module, train, epochs, seed + 1, **fit_kwargs())
        with torch.no_grad():
            result.update({f"{name}_{key}": value for key, value in evaluate(model).items()})
    return result


def sinc_example(
    tlm: ModuleType,
    *,
    samples: int = 20000,
    batch_size: int = 1000,
    repeat: int = 10,
    epochs: int = 10,
    loader: str = "fast",
    adam: bool = True,
    seed: int = 0,
    device: Any = "cpu",
) -> Dict[str, float]:
    """The sinc curve-fitting example: returns the fits' seconds and the final MSE on all points
    (``lm_seconds``, ``lm_loss``, and ``adam_*`` when ``adam``)."""
    x = torch.linspace(-1, 1, samples, dtype=torch.float32).unsqueeze(1).to(device)
    y = torch.sinc(10 * x)
    train = _loader(tlm, TensorDataset(x, y), batch_size, repeat, loader, device)

    def network() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(1, 20), torch.nn.Tanh(), torch.nn.Linear(20, 1)).to(device)

    def lm_module(model: torch.nn.Module) -> Any:
        return tlm.training.LevenbergMarquardtModule(
            model=model, loss_fn=tlm.loss.MSELoss(), learning_rate=1.0, attempts_per_step=10, solve_method="qr"
        )

    def evaluate(model: torch.nn.Module) -> Dict[str, float]:
        return {"loss": torch.nn.functional.mse_loss(model(x), y).item()}

    return _train_both(tlm, network, torch.nn.MSELoss(), lm_module, train, epochs, seed, adam, evaluate)


def conv_classifier(device: Any = "cpu") -> torch.nn.Module:
    """The MNIST example's network: five 2-D convolutions with ELU, then a linear layer (1026
    parameters on 1 x 28 x 28 images)."""
    layers = []
    for c_in, c_out, kernel, stride in ((1, 8, 4, 2), (8, 4, 4, 2), (4, 4, 2, 1), (4, 4, 2, 1), (4, 4, 2, 1)):
        layers += [torch.nn.Conv2d(c_in, c_out, kernel_size=kernel, stride=stride), torch.nn.ELU()]
    return torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(16, 10)).to(device)


def digits_example(
    tlm: ModuleType,
    *,
    train: int = 10000,
    test: int = 2000,
    batch_size: int = 5000,
    repeat: int = 1,
    epochs: int = 3,
    loader: str = "fast",
    adam: bool = True,
    metrics: Optional[Callable[[], Dict[str, Any]]] = None,
    seed: int = 0,
    device: Any = "cpu",
) -> Dict[str, float]:
    """The MNIST classification example on locally drawn digits: returns the fits' seconds and
    the cross-entropy and accuracy on the test images (``lm_seconds``, ``lm_loss``, ``lm_accuracy``;
    ``adam_*`` when ``adam``). ``metrics`` makes the fit's metrics dict (the example passes
    ``{'accuracy': torchmetrics.Accuracy(task='multiclass', num_classes=10)}``)."""
    x, y = digits(train, seed=seed, size=28)
    xt, yt = digits(test, seed=seed + 1, size=28)
    x, y, xt, yt = (t.to(device) for t in (x, y, xt, yt))
    loader_ = _loader(tlm, TensorDataset(x, y), batch_size, repeat, loader, device)

    def lm_module(model: torch.nn.Module) -> Any:
        return tlm.training.LevenbergMarquardtModule(
            model=model,
            loss_fn=tlm.loss.CrossEntropyLoss(),
            learning_rate=0.05,
            attempts_per_step=10,
            solve_method="cholesky",
        )

    def evaluate(model: torch.nn.Module) -> Dict[str, float]:
        logits = model(xt)
        return {
            "loss": torch.nn.functional.cross_entropy(logits, yt).item(),
            "accuracy": (logits.argmax(1) == yt).float().mean().item(),
        }

    return _train_both(
        tlm,
        lambda: conv_classifier(device),
        torch.nn.CrossEntropyLoss(),
        lm_module,
        loader_,
        epochs,
        seed,
        adam,
        evaluate,
        (lambda: {"metrics": metrics()}) if metrics is not None else dict,
    )
