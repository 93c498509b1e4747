"""The shard plan: determinism, balance, coverage and the split/join helpers."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import InvalidArgument
from shared.sharding import ShardPlan, plan_shards


def _model_shapes() -> dict[str, tuple[int, ...]]:
    """One big embedding and many small layers, like a real language model."""
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (5000, 64)}
    for i in range(40):
        shapes[f"layer{i}.weight"] = (32, 16 + i)
        shapes[f"layer{i}.bias"] = (32,)
    return shapes


def _check_coverage(plan: ShardPlan, shapes: dict[str, tuple[int, ...]]) -> None:
    for name, shape in shapes.items():
        pieces = plan.pieces_of(name)
        assert pieces[0].start == 0
        assert pieces[-1].stop == math.prod(shape)
        for before, after in itertools.pairwise(pieces):
            assert before.stop == after.start
        assert [p.key for p in pieces] == [f"{name}#{i}" for i in range(len(pieces))]


def test_plan_is_independent_of_dict_order() -> None:
    shapes = _model_shapes()
    items = list(shapes.items())
    random.Random(3).shuffle(items)
    first, second = plan_shards(shapes, 5), plan_shards(dict(items), 5)
    assert first.pieces == second.pieces
    assert first.fingerprint() == second.fingerprint()
    assert first.fingerprint() != plan_shards(shapes, 6).fingerprint()


@pytest.mark.parametrize("num_shards", [2, 3, 4, 7, 16])
def test_one_big_tensor_and_many_small_are_balanced(num_shards: int) -> None:
    shapes = _model_shapes()
    plan = plan_shards(shapes, num_shards)
    sizes = plan.shard_bytes()
    assert sum(sizes) == 4 * sum(math.prod(s) for s in shapes.values())
    assert max(sizes) / min(sizes) < 1.05
    # The embedding alone is over half the model, so it must have been cut up.
    assert len(plan.pieces_of("embed.weight")) >= num_shards // 2
    _check_coverage(plan, shapes)


def test_max_piece_elements_caps_every_piece() -> None:
    shapes = _model_shapes()
    plan = plan_shards(shapes, 2, max_piece_elements=1000)
    assert max(p.numel for p in plan.pieces) <= 1000
    _check_coverage(plan, shapes)


def test_for_shard_partitions_the_pieces() -> None:
    plan = plan_shards(_model_shapes(), 3)
    held = [plan.for_shard(i) for i in range(3)]
    assert sorted(p.key for group in held for p in group) == sorted(p.key for p in plan.pieces)
    assert all(all(p.shard == i for p in group) for i, group in enumerate(held))
    with pytest.raises(InvalidArgument):
        plan.for_shard(3)


def test_split_join_round_trip() -> None:
    shapes = _model_shapes()
    plan = plan_shards(shapes, 4)
    params = {name: torch.randn(shape) for name, shape in shapes.items()}
    pieces = {key: t for name, value in params.items() for key, t in plan.split(name, value).items()}
    assert set(pieces) == {p.key for p in plan.pieces}
    joined = plan.join(pieces)
    assert set(joined) == set(params)
    for name, value in params.items():
        assert torch.equal(joined[name], value)
    # A flat tensor splits the same way as the shaped one.
    flat = params["embed.weight"].reshape(-1)
    assert all(
        torch.equal(a, b) for a, b in zip(plan.split("embed.weight", flat).values(), pieces.values(), strict=False)
    )


def test_join_and_split_reject_bad_input() -> None:
    plan = plan_shards({"a": (10, 10), "b": (3,)}, 4)
    with pytest.raises(InvalidArgument):
        plan.split("missing", torch.zeros(3))
    with pytest.raises(InvalidArgument):
        plan.split("b", torch.zeros(4))
    pieces = plan.split("a", torch.zeros(10, 10))
    pieces.pop(next(iter(pieces)))
    with pytest.raises(InvalidArgument, match="missing pieces"):
        plan.join(pieces)
    with pytest.raises(InvalidArgument):
        plan.join({"nope#0": torch.zeros(1)})
    with pytest.raises(InvalidArgument):
        plan.join({"b#0": torch.zeros(5)})


def test_too_many_shards_rejected() -> None:
    with pytest.raises(InvalidArgument, match="more shards than parameters"):
        plan_shards({"a": (2, 2), "b": (1,)}, 6)
    plan = plan_shards({"a": (2, 2), "b": (1,)}, 5)
    assert plan.shard_bytes() == [4] * 5


@pytest.mark.parametrize(
    ("params", "num_shards", "max_piece"),
    [({}, 1, None), ({"a": (3,)}, 0, None), ({"a": (3,)}, True, None), ({"a": (-1,)}, 1, None), ({"a": (3,)}, 1, 0)],
)
def test_bad_arguments_rejected(params: dict, num_shards: int, max_piece: int | None) -> None:
    with pytest.raises(InvalidArgument):
        plan_shards(params, num_shards, max_piece)


def test_empty_tensor_gets_an_empty_piece() -> None:
    plan = plan_shards({"a": (0, 4), "b": (8,)}, 2)
    (empty,) = plan.pieces_of("a")
    assert empty.numel == 0
    joined = plan.join({**plan.split("a", torch.zeros(0, 4)), **plan.split("b", torch.arange(8.0))})
    assert joined["a"].shape == (0, 4)


shape_maps = st.dictionaries(
    st.text("abcdefgh.", min_size=1, max_size=6),
    st.lists(st.integers(1, 12), min_size=1, max_size=3).map(tuple),
    min_size=1,
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(shapes=shape_maps, num_shards=st.integers(1, 12))
def test_plans_cover_every_element_and_leave_no_shard_empty(shapes: dict, num_shards: int) -> None:
    total = sum(math.prod(s) for s in shapes.values())
    if num_shards > total:
        with pytest.raises(InvalidArgument):
            plan_shards(shapes, num_shards)
        return
    plan = plan_shards(shapes, num_shards)
    _check_coverage(plan, shapes)
    assert all(size > 0 for size in plan.shard_bytes())
    # No piece of a cut tensor exceeds a fair share (rounded up), which is what bounds the imbalance.
    assert max((p.numel for p in plan.pieces if len(plan.pieces_of(p.param)) > 1), default=0) <= -(-total // num_shards)
