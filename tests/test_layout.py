"""Pure planner tests: chunk layout, shard offsets, segments (no process group)."""

from __future__ import annotations

import pytest

from tierlift.layout import UnitSpec, plan_chunks

UNITS = [
    UnitSpec("", (("embed.weight", (100, 8)), ("norm.weight", (8,)))),
    UnitSpec("blocks.0", (("blocks.0.w1", (8, 32)), ("blocks.0.b1", (32,)), ("blocks.0.w2", (32, 8)))),
    UnitSpec("blocks.1", (("blocks.1.w1", (8, 32)), ("blocks.1.b1", (32,)), ("blocks.1.w2", (32, 8)))),
]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("align", [4096, 512, 64])
def test_shards_tile_chunk_and_align(world, align):
    layout = plan_chunks(UNITS, world, align_bytes=align)
    for c in layout:
        assert c.padded_numel % world == 0
        assert c.shard_numel * 2 % align == 0, "every shard is a multiple of align_bytes at bf16"
        assert c.padded_numel >= c.numel
        ranges = [c.shard_range(r) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == c.padded_numel
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_segments_cover_every_parameter_exactly_once(world):
    layout = plan_chunks(UNITS, world, align_bytes=64)
    for c in layout:
        covered = {p.name: [] for p in c.params}
        for r in range(world):
            lo, hi = c.shard_range(r)
            for s in c.segments(r):
                assert 0 <= s.shard_lo < s.shard_hi <= hi - lo
                assert s.shard_hi - s.shard_lo == s.param_hi - s.param_lo
                covered[s.param.name].append((s.param_lo, s.param_hi))
        for p in c.params:
            spans = sorted(covered[p.name])
            assert spans[0][0] == 0 and spans[-1][1] == p.numel
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), f"{p.name}: gaps/overlaps {spans}"


def test_offsets_independent_of_world_size():
    offsets = [{p.name: p.offset for c in plan_chunks(UNITS, w) for p in c.params} for w in (1, 2, 7)]
    assert offsets[0] == offsets[1] == offsets[2]


def test_tied_parameter_stored_once_and_empty_units_skipped():
    units = [UnitSpec("", (("embed.weight", (10, 4)), ("head.weight", (10, 4)))),
             UnitSpec("blocks.0", (("embed.weight", (10, 4)),)),  # tied: already owned by the root
             UnitSpec("blocks.1", ())]
    layout = plan_chunks(units, 2)
    assert [c.unit for c in layout] == [""]
    assert [p.name for p in layout.chunks[0].params] == ["embed.weight", "head.weight"]


def test_persistence_threshold_and_decay_flags():
    layout = plan_chunks(UNITS, 2, persistence_threshold=600)
    by_unit = {c.unit: c for c in layout}
    assert by_unit["blocks.0"].persistent and not by_unit[""].persistent  # 520 < 600 < 808
    slots = {p.name: p for c in layout for p in c.params}
    assert slots["blocks.0.w1"].decay and not slots["blocks.0.b1"].decay and not slots["norm.weight"].decay


def test_bad_arguments():
    with pytest.raises(ValueError):
        plan_chunks(UNITS, 0)
    with pytest.raises(ValueError):
        plan_chunks(UNITS, 2, align_bytes=3)
