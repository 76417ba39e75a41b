"""Batches without per-sample collation: ``FastDataLoader`` and the loader fast path of ``fit``.

A ``DataLoader`` over a ``TensorDataset`` builds every batch by fetching its samples one by one
and stacking them (``default_collate``). For the small models Levenberg-Marquardt trains, that is
where the time goes: on torch-levenberg-marquardt's sinc example (batches of 1000 single-row
samples) iterating the loader alone took about 1.75 s of the 2 s that 10 epochs take on this
project's CPU. The same batches are one ``index_select`` per tensor away, so:

* :func:`iterate_batches` (what :func:`fastopt.lm.fit` iterates): for a plain ``DataLoader`` over a
  ``TensorDataset`` with the default collate, in the main process, it draws the batch indices from
  the loader's own batch sampler and indexes the dataset's tensors at once. Same batches, same
  order, same random draws (also the one ``DataLoader.__iter__`` takes for its workers' base seed,
  so the random state after an epoch is the loader's too). Any other loader is iterated as is.
* :class:`FastDataLoader`: torch-levenberg-marquardt's loader (the whole dataset collated once and
  kept on ``device``, ``repeat`` passes per epoch, ``torch.randperm`` shuffles), with the same
  batches for the same random state; a ``TensorDataset`` is taken as its tensors, without the
  package's sample-by-sample ``list(dataset)``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, List, Optional, Union, cast

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from .._validation import flag, int_at_least
from .tree import tree_indices, tree_to_device

__all__ = ["FastDataLoader", "iterate_batches", "indexes_tensors_directly"]


def indexes_tensors_directly(loader: Any) -> bool:
    """Whether :func:`iterate_batches` builds ``loader``'s batches by indexing its tensors.

    True for a ``torch.utils.data.DataLoader`` itself (not a subclass, whose ``__iter__`` may do
    anything) over a ``TensorDataset`` itself, batching with its batch sampler (``batch_size`` not
    None), the default collate, no worker processes and no pinned memory.
    """
    return (
        type(loader) is DataLoader
        and type(loader.dataset) is TensorDataset
        and loader.batch_sampler is not None
        and loader.collate_fn is default_collate
        and loader.num_workers == 0
        and not loader.pin_memory
    )


def _tensor_batches(loader: DataLoader) -> Iterator[List[torch.Tensor]]:
    tensors = cast(TensorDataset, loader.dataset).tensors
    assert loader.batch_sampler is not None  # indexes_tensors_directly checked it
    # The order of DataLoader.__iter__: the sampler's iterator is made (a generator, it draws
    # nothing yet), then the base seed for workers is drawn from the loader's generator, then the
    # sampler draws its permutation on the first batch. Drawing in the same order leaves the
    # global (or the loader's) random state exactly where the DataLoader leaves it.
    batches = iter(loader.batch_sampler)
    torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
    for indices in batches:
        index = torch.as_tensor(indices, dtype=torch.long)
        # default_collate turns each (x, y) sample tuple into a list of stacked tensors.
        yield [t.index_select(0, index.to(t.device)) for t in tensors]


def iterate_batches(loader: Iterable) -> Iterator[Any]:
    """Iterate ``loader``'s batches; see :func:`indexes_tensors_directly` for when they are built
    by indexing the dataset's tensors instead of collating samples (same values, same order)."""
    if indexes_tensors_directly(loader):
        return _tensor_batches(cast(DataLoader, loader))
    return iter(loader)


def _tensor_list(examples: Any) -> bool:
    """Whether ``examples`` is a list of tensors on one device, each with a batch dimension."""
    return (
        type(examples) is list
        and all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in examples)
        and len({t.device for t in examples}) <= 1
    )


class FastDataLoader(DataLoader):
    """torch-levenberg-marquardt's ``utils.FastDataLoader``: the whole dataset held collated on
    ``device``, batches taken from it by index.

    Args (the package's, same defaults):
        dataset: a map-style dataset; a ``TensorDataset`` is taken as its tensors.
        batch_size: samples per batch (the last batch of a pass may be smaller).
        repeat: passes over the dataset per epoch (``len`` counts the batches of all of them).
        shuffle: a new ``torch.randperm`` order at the start of each pass (global random state,
            or ``generator``).
        device: where the collated dataset is kept.
        collate_fn: turns the list of all samples into one batch; ``default_collate`` if None.
        generator: fastopt's addition: a ``torch.Generator`` for the shuffles.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        repeat: int = 1,
        shuffle: bool = False,
        device: Union[torch.device, str] = "cpu",
        collate_fn: Optional[Callable[[list], Any]] = None,
        *,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        int_at_least(1)("batch_size", batch_size)
        int_at_least(1)("repeat", repeat)
        flag("shuffle", shuffle)
        if collate_fn is not None and not callable(collate_fn):
            raise TypeError(f"collate_fn must be callable or None, got {type(collate_fn).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        device = torch.device(device)
        super().__init__(dataset=dataset, batch_size=int(batch_size))
        self.repeat = int(repeat)
        self.shuffle = shuffle
        self.shuffle_generator = generator
        if type(dataset) is TensorDataset and collate_fn in (None, default_collate):
            # default_collate(list(dataset)) stacks the rows back into these very tensors.
            examples: Any = list(dataset.tensors)
            self.num_examples = len(dataset)
        else:
            samples = list(cast(Iterable[Any], dataset))  # the package's way: any indexable dataset
            self.num_examples = len(samples)
            examples = (collate_fn or default_collate)(samples)
        self.examples = tree_to_device(examples, device)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]  # batches, not a DataLoader iterator
        # A list of tensors (a TensorDataset's, or what default_collate made of tuples): each batch
        # one index_select per tensor. tree_indices' pytree walk cost ~20 us a batch of the sinc
        # example's ~30 us (measured: 10 epochs of 200 batches of 1000, 2 threads), for the same
        # tensors.
        tensors = self.examples if _tensor_list(self.examples) else None
        for _ in range(self.repeat):
            order = torch.arange(self.num_examples)
            if self.shuffle:
                order = order[torch.randperm(self.num_examples, generator=self.shuffle_generator)]
            if tensors is not None:
                order = order.to(tensors[0].device) if len(tensors) else order
            for start in range(0, self.num_examples, self._batch):
                index = order[start : start + self._batch]
                if tensors is not None:
                    yield [t.index_select(0, index) for t in tensors]
                else:
                    yield tree_indices(self.examples, index)

    def __len__(self) -> int:
        return self.repeat * -(-self.num_examples // self._batch)

    @property
    def _batch(self) -> int:
        return cast(int, self.batch_size)  # set from the int argument, never None here
