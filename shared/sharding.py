"""How a model's parameters are spread over parameter-server shards.

Every training worker and every shard computes the same plan from the same ``name -> shape`` map, so
the plan itself never travels: :meth:`ShardPlan.fingerprint` lets two parties check they agree.

Parameters are float32. A tensor larger than its fair share (``total / num_shards`` elements) is cut
into contiguous element ranges of its flattened form, so one huge embedding cannot pin a whole shard;
then pieces are placed greedily (largest first onto the least-loaded shard), which keeps shard bytes
balanced. Piece keys are ``"<name>#<index>"``; every tensor has at least ``#0``.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from shared.errors import InvalidArgument

__all__ = ["BYTES_PER_ELEMENT", "Piece", "ShardPlan", "piece_key", "plan_shards"]

# Parameters are stored and exchanged as float32.
BYTES_PER_ELEMENT = 4


def piece_key(name: str, index: int) -> str:
    """The key of piece ``index`` of parameter ``name``."""
    return f"{name}#{index}"


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, stop)`` of the flattened parameter ``param``, held by shard ``shard``."""

    key: str
    param: str
    start: int
    stop: int
    shard: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ShardPlan:
    """Where every piece of every parameter lives.

    Attributes:
        num_shards: How many shards the plan spreads over.
        shapes: Each parameter's shape, by name.
        pieces: Every piece, ordered by parameter name then offset.
    """

    num_shards: int
    shapes: dict[str, tuple[int, ...]]
    pieces: list[Piece]
    _by_key: dict[str, Piece] = field(init=False, repr=False, compare=False)
    _by_param: dict[str, list[Piece]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_param: dict[str, list[Piece]] = {}
        for piece in self.pieces:
            by_param.setdefault(piece.param, []).append(piece)
        # Frozen dataclass: indexes are built once here rather than on every lookup.
        object.__setattr__(self, "_by_key", {p.key: p for p in self.pieces})
        object.__setattr__(self, "_by_param", by_param)

    def piece(self, key: str) -> Piece:
        """The piece with this key.

        Raises:
            InvalidArgument: If no piece has this key.
        """
        try:
            return self._by_key[key]
        except KeyError:
            raise InvalidArgument.field("key", f"unknown piece {key!r}") from None

    def pieces_of(self, name: str) -> list[Piece]:
        """The pieces of one parameter, in offset order.

        Raises:
            InvalidArgument: If the plan has no such parameter.
        """
        try:
            return list(self._by_param[name])
        except KeyError:
            raise InvalidArgument.field("name", f"unknown parameter {name!r}") from None

    def for_shard(self, shard: int) -> list[Piece]:
        """The pieces shard ``shard`` holds, ordered by parameter name then offset.

        Raises:
            InvalidArgument: If ``shard`` is not in ``[0, num_shards)``.
        """
        if not 0 <= shard < self.num_shards:
            raise InvalidArgument.field("shard", f"must be in [0, {self.num_shards}), got {shard}")
        return [p for p in self.pieces if p.shard == shard]

    def shard_bytes(self) -> list[int]:
        """The float32 bytes each shard holds, indexed by shard."""
        totals = [0] * self.num_shards
        for piece in self.pieces:
            totals[piece.shard] += piece.numel * BYTES_PER_ELEMENT
        return totals

    def fingerprint(self) -> str:
        """A hex digest identifying the plan, for checking that workers and shards agree on it."""
        doc = {
            "num_shards": self.num_shards,
            "shapes": {n: list(s) for n, s in sorted(self.shapes.items())},
            "pieces": [[p.key, p.start, p.stop, p.shard] for p in self.pieces],
        }
        return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()

    def split(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cuts one parameter (or its gradient) into its pieces.

        Args:
            name: The parameter's name.
            tensor: Its value, flat or in its own shape; only the element count must match.

        Returns:
            Piece key -> 1-D contiguous slice. Slices may share memory with ``tensor``; clone them
            before changing either in place.

        Raises:
            InvalidArgument: If the parameter is unknown or the element count is wrong.
        """
        pieces = self.pieces_of(name)
        expected = math.prod(self.shapes[name])
        if tensor.numel() != expected:
            raise InvalidArgument.field(name, f"has {tensor.numel()} elements, the plan expects {expected}")
        flat = tensor.reshape(-1)
        return {p.key: flat[p.start : p.stop] for p in pieces}

    def join(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reassembles parameters from their pieces.

        Args:
            values: Piece key -> 1-D tensor. Every parameter that has one piece here must have all.

        Returns:
            Parameter name -> tensor in the parameter's shape (a fresh tensor, sharing nothing).

        Raises:
            InvalidArgument: On an unknown key, a piece of the wrong size, or a partial parameter.
        """
        names: set[str] = set()
        for key, value in values.items():
            piece = self.piece(key)
            if value.numel() != piece.numel:
                raise InvalidArgument.field(key, f"has {value.numel()} elements, the plan expects {piece.numel}")
            names.add(piece.param)
        out: dict[str, torch.Tensor] = {}
        for name in sorted(names):
            pieces = self._by_param[name]
            missing = [p.key for p in pieces if p.key not in values]
            if missing:
                raise InvalidArgument.field(name, f"missing pieces {missing[:5]}")
            parts = [values[p.key].reshape(-1) for p in pieces]
            out[name] = torch.cat(parts).reshape(self.shapes[name])
        return out


def _check_params(params: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    if not params:
        raise InvalidArgument.field("params", "no parameters to shard")
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in params.items():
        if not isinstance(name, str) or not name:
            raise InvalidArgument.field("params", f"parameter names must be non-empty strings, got {name!r}")
        dims = tuple(shape)
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in dims):
            raise InvalidArgument.field(name, f"shape must be non-negative integers, got {shape!r}")
        shapes[name] = dims
    return shapes


def _ranges(numel: int, count: int) -> list[tuple[int, int]]:
    """``count`` contiguous ranges covering ``[0, numel)`` whose sizes differ by at most one."""
    base, extra = divmod(numel, count)
    out, start = [], 0
    for i in range(count):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def plan_shards(
    params: Mapping[str, tuple[int, ...]], num_shards: int, max_piece_elements: int | None = None
) -> ShardPlan:
    """Plans how float32 parameters are spread over ``num_shards`` shards.

    The result depends only on the contents of ``params``, never on its iteration order.

    Args:
        params: Parameter name -> shape.
        num_shards: How many shards to spread over.
        max_piece_elements: If set, no piece is larger than this (e.g. to keep each under a message
            size limit), even when that means more pieces than balance alone needs.

    Returns:
        The plan.

    Raises:
        InvalidArgument: On empty or malformed ``params``, ``num_shards < 1``, more shards than
            parameter elements, or ``max_piece_elements < 1``.
    """
    shapes = _check_params(params)
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise InvalidArgument.field("num_shards", f"must be a positive integer, got {num_shards!r}")
    if max_piece_elements is not None and (isinstance(max_piece_elements, bool) or max_piece_elements < 1):
        raise InvalidArgument.field("max_piece_elements", f"must be positive, got {max_piece_elements!r}")
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    total = sum(sizes.values())
    if num_shards > total:
        raise InvalidArgument.field(
            "num_shards", f"more shards than parameters: {num_shards} shards for {total} elements"
        )

    # Unplaced pieces as (param, start, stop), in name order for determinism.
    cuts: list[tuple[str, int, int, int]] = []
    for name in sorted(shapes):
        numel = sizes[name]
        # ceil(numel * num_shards / total) pieces keeps each at most a fair share; summed over all
        # tensors this is at least num_shards, so no shard is left empty.
        count = max(1, -(-numel * num_shards // total))
        if max_piece_elements is not None:
            count = max(count, -(-numel // max_piece_elements))
        count = min(count, max(numel, 1))
        cuts.extend((name, index, start, stop) for index, (start, stop) in enumerate(_ranges(numel, count)))

    # Greedy LPT: largest first onto the least-loaded shard; ties broken by piece count then index so
    # empty tensors do not all land together and the outcome is fully determined.
    heap = [(0, 0, shard) for shard in range(num_shards)]  # (load, piece count, shard): already a heap
    placed: dict[tuple[str, int], int] = {}
    for name, index, start, stop in sorted(cuts, key=lambda c: (-(c[3] - c[2]), c[0], c[1])):
        load, count, shard = heapq.heappop(heap)
        heapq.heappush(heap, (load + stop - start, count + 1, shard))
        placed[(name, index)] = shard
    pieces = [
        Piece(key=piece_key(name, index), param=name, start=start, stop=stop, shard=placed[(name, index)])
        for name, index, start, stop in cuts
    ]
    return ShardPlan(num_shards=num_shards, shapes=shapes, pieces=pieces)


#: Pieces of at most this many float32 elements (4 MB) fit one 4 MiB message each way.
DEFAULT_MAX_PIECE_ELEMENTS = 1_000_000


def param_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the floating-point tensors of a state dict: what the parameter server holds."""
    return {name: tuple(t.shape) for name, t in state.items() if t.is_floating_point()}


def plan_for_state(state: Mapping[str, torch.Tensor], num_shards: int, max_piece_elements: int = 0) -> ShardPlan:
    """The plan every worker and shard of a job computes from the model's state dict."""
    return plan_shards(param_shapes(state), num_shards, max_piece_elements or DEFAULT_MAX_PIECE_ELEMENTS)
