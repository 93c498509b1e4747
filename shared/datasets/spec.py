"""Dataset specs, and what validating (:class:`DatasetInfo`) and loading (:class:`Dataset`) return."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch.utils.data import TensorDataset

from shared.errors import InvalidArgument

__all__ = ["Dataset", "DatasetInfo", "DatasetSpec", "OptionValue"]

#: Option values arrive from JSON or string maps; each option is parsed to its own type on validation.
OptionValue = str | int | float


@dataclass(frozen=True)
class DatasetSpec:
    """What a training job trains on; recorded with the job and the model's lineage.

    Types and values are checked by :func:`shared.datasets.validate`, not here, so that a spec built from
    any client input can be reported on with :class:`~shared.errors.InvalidArgument`.

    Attributes:
        name: One of ``"digits"``, ``"synthetic-classification"``, ``"synthetic-sequences"``, ``"text"``,
            ``"file"``.
        options: Per-dataset options (see the package docstring), e.g. ``{"path": "data.npz"}``.
        validation_fraction: Share of the samples held out for validation, in ``[0, 1)``.
        seed: Seed of the train/validation split (synthetic data has its own ``seed`` option, so the data,
            and its fingerprint, stay the same when only the split changes).
    """

    name: str
    options: dict[str, OptionValue] = field(default_factory=dict)
    validation_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        # A private copy: a caller mutating its dict after validation must not change what is trained on.
        if isinstance(self.options, Mapping):
            object.__setattr__(self, "options", dict(self.options))


@dataclass(frozen=True)
class DatasetInfo:
    """What validation learnt about a dataset, known before any worker starts.

    Attributes:
        num_train: Training samples (what :meth:`Dataset.shard` divides among workers).
        num_validation: Held-out samples.
        sample_shape: Shape of one ``x`` sample as :func:`shared.datasets.load` returns it for the
            architecture, e.g. ``(1, 8, 8)`` for digits on ``cnn``.
        num_classes: Labels lie in ``[0, num_classes)``; for text, the byte vocabulary (256).
        fingerprint: SHA-256 hex of the dataset content (see :func:`shared.datasets.fingerprint_arrays`);
            for user files, of the file's bytes, so it equals ``sha256sum FILE``.
    """

    num_train: int
    num_validation: int
    sample_shape: tuple[int, ...]
    num_classes: int
    fingerprint: str


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset, shaped for one architecture.

    Attributes:
        info: The same :class:`DatasetInfo` that validation returned.
        train: ``TensorDataset(x, y)`` of the training samples, in the split's shuffled order.
        validation: ``TensorDataset(x, y)`` of the held-out samples (empty when the fraction is 0).
    """

    info: DatasetInfo
    train: TensorDataset
    validation: TensorDataset

    def shard(self, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns worker ``rank``'s share ``(x, y)`` of the training set.

        Shards are strided: worker ``r`` gets training samples ``r, r + world_size, r + 2 * world_size, ...``.
        Every sample is in exactly one shard and shard sizes differ by at most one; since the training set
        is already shuffled by the split, every shard sees a similar class mix.

        Args:
            rank: This worker's index, in ``[0, world_size)``.
            world_size: Number of workers, at most ``info.num_train`` so that no worker gets nothing.

        Returns:
            Fresh contiguous tensors, so a worker can drop the full dataset and keep only its shard.

        Raises:
            InvalidArgument: If ``rank`` or ``world_size`` is out of range.
        """
        x, y = self.train.tensors
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise InvalidArgument.field("world_size", f"must be a positive integer, got {world_size!r}")
        if world_size > len(x):
            raise InvalidArgument.field(
                "world_size", f"is {world_size} but the training set has only {len(x)} samples; every worker needs one"
            )
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise InvalidArgument.field("rank", f"must be an integer in [0, {world_size}), got {rank!r}")
        return x[rank::world_size].contiguous(), y[rank::world_size].contiguous()
