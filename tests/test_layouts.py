"""The layout tables: every family's table covers the canonical table exactly, its moves invert, and
conversions through it are bit-exact, for every spec family the project tests."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import vitspec
from vitspec.errors import SpecError
from vitspec.families import FAMILIES, family
from vitspec.formats import FORMATS
from vitspec.layout import param_shapes
from vitspec.layouts import CANONICAL
from vitspec.layouts.flax import FLAX
from vitspec.layouts.keras import KERAS, h5_layout
from vitspec.layouts.moves import CONV, DENSE, SAME, Concat, Reshape, Transpose
from vitspec.layouts.timm import TIMM, TORCH


def _expressible() -> list[tuple[str, str]]:
    """(format, family) pairs the format can hold; test_formats checks the refusals."""
    pairs = []
    for fmt, record in FORMATS.items():
        for fam in FAMILIES:
            try:
                record.check(family(fam, depth=2))
            except SpecError:
                continue
            pairs.append((fmt, fam))
    return pairs


@pytest.mark.parametrize(("fmt", "fam"), _expressible())
def test_every_canonical_tensor_is_held_exactly_once_and_round_trips(fmt: str, fam: str) -> None:
    spec = family(fam, depth=2)
    table = FORMATS[fmt].layout.table(spec)
    held = [c for r in table.rows for c in r.canonical]
    assert sorted(held) == sorted(param_shapes(spec)), "a canonical tensor is missing or held twice"
    assert len({r.native for r in table.rows}) == len(table.rows), "two rows share a native name"
    weights = vitspec.init_weights(spec, seed=3, scheme="random")
    native = dict(table.to_native(weights))
    assert [(k, v.shape) for k, v in native.items()] == table.native_layout()
    back = dict(table.from_native(native))
    assert list(back) == list(param_shapes(spec))
    for name, value in weights.items():
        assert back[name].flags.c_contiguous, name
        assert back[name].shape == value.shape, name
        assert np.array_equal(back[name].view(np.uint32), value.view(np.uint32)), name


def test_the_fused_qkv_rows_put_query_key_value_where_each_family_expects() -> None:
    spec = vitspec.load_spec("Ti/16").replace(depth=1)
    w = vitspec.init_weights(spec, seed=0, scheme="random")
    d = spec.hidden_dim
    q, k, v = (w[f"blocks.0.attn.{p}.kernel"] for p in ("query", "key", "value"))
    torch_qkv = dict(TORCH.to_native(spec, w))["blocks.0.attn.qkv.weight"]
    np.testing.assert_array_equal(torch_qkv[d : 2 * d], k.T)  # rows q, k, v of an (out, in) weight
    keras_qkv = dict(KERAS.to_native(spec, w))["blocks_0/attn/qkv/kernel"]
    np.testing.assert_array_equal(
        keras_qkv[:, 2 * d :], v
    )  # columns q, k, v of an (in, out) kernel
    flax_qkv = dict(FLAX.to_native(spec, w))["blocks.0.attn.qkv.kernel"]
    np.testing.assert_array_equal(flax_qkv[:, :d], q)


def test_torch_adds_pre_logits_to_timm_and_keras_files_list_every_weight() -> None:
    spec = family("vit_paper_pre_logits", depth=1)
    extra = {n for n, _ in TORCH.native_layout(spec)} - {n for n, _ in TIMM.native_layout(spec)}
    assert extra == {"pre_logits.fc.weight", "pre_logits.fc.bias"}
    assert [n for n, _ in h5_layout(spec)] == [n for n, _ in KERAS.native_layout(spec)]
    assert CANONICAL.native_layout(spec) == list(param_shapes(spec).items())


shapes = st.lists(st.integers(1, 4), min_size=2, max_size=4).map(tuple)


@given(shapes, st.integers(0, 2**32 - 1))
def test_every_move_inverts_its_forward(shape: tuple[int, ...], seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal(shape), rng.standard_normal(shape)
    axes = tuple(int(i) for i in rng.permutation(len(shape)))
    moves = [
        SAME,
        Reshape((int(np.prod(shape)),)),
        Transpose(axes),
        Concat(0),
        Concat(-1),
        Concat(0, Transpose(axes)),
    ]
    if len(shape) == 2:
        moves.append(DENSE)
    if len(shape) == 4:
        moves.append(CONV)
    for move in moves:
        parts = [a, b] if isinstance(move, Concat) else [a]
        native = move.forward(parts)
        assert native.shape == move.shape([p.shape for p in parts]), move
        for j, part in enumerate(parts):
            np.testing.assert_array_equal(move.inverse(native, j, [p.shape for p in parts]), part)


# ---- vitspec.layout's helpers (killing the survivors of `make mutants PART=layout`) -----------


def test_drop_path_rates_rise_linearly_from_zero_to_drop_path() -> None:
    from vitspec.layout import drop_path_rates

    assert drop_path_rates(family("vit_paper", depth=1, drop_path=0.2)) == [0.0]
    assert drop_path_rates(family("vit_paper", depth=5, drop_path=0.2)) == pytest.approx(
        [0.0, 0.05, 0.1, 0.15, 0.2]
    )
    assert drop_path_rates(family("vit_paper", depth=3, drop_path=0.3)) == pytest.approx(
        [0.0, 0.15, 0.3]
    )


def test_check_capture_expands_all_and_refuses_other_names_listing_the_spec_points() -> None:
    from vitspec.errors import InputError
    from vitspec.layout import capture_points, check_capture

    spec = family("vit_paper", depth=3)
    assert check_capture(spec, "".join(["a", "ll"])) == capture_points(
        spec
    )  # equal, not the same object
    assert check_capture(spec, "blocks.2.mlp") == ["blocks.2.mlp"]
    assert check_capture(spec, []) == []
    for name in ("aardvark", "a", "zebra"):  # sorting before or after "all" changes nothing
        with pytest.raises(InputError) as info:
            check_capture(spec, name)
        assert str(info.value) == (
            f"unknown capture point(s) {name!r}; this spec has: patch_embed, embed, "
            "blocks.0..2[.attn_probs|.attn_heads|.attn|.mlp], encoded, pooled, output"
        )
    with pytest.raises(
        InputError, match=r"blocks\.0\.\.0\[.*\], encoded, pooled, pre_logits, output$"
    ):
        check_capture(family("vit_paper", depth=1, pre_logits_dim=8), ["blocks.1"])


def test_final_norm_meaning_names_where_it_applies() -> None:
    table = {p.name: p.meaning for p in vitspec.param_table(family("vit_paper"))}
    assert table["norm.scale"] == "final norm on every token, before pooling: LayerNorm scale"
    after = family(
        "vit_paper",
        final_norm="after_pool",
        pooling="avg",
        class_token=False,
        pos_embed_class_slot=False,
    )
    table = {p.name: p.meaning for p in vitspec.param_table(after)}
    assert table["norm.scale"] == "final norm on the pooled vector (timm fc_norm): LayerNorm scale"


def test_capture_points_and_shapes_list_pre_logits_only_when_the_spec_has_it() -> None:
    from vitspec.layout import capture_points, capture_shapes

    spec = family("vit_paper", depth=2)
    block = ["attn_probs", "attn_heads", "attn", "mlp"]
    expected = ["patch_embed", "embed"]
    for i in range(2):
        expected += [f"blocks.{i}.{p}" for p in block] + [f"blocks.{i}"]
    assert capture_points(spec) == [*expected, "encoded", "pooled", "output"]
    assert list(capture_shapes(spec, 3)) == capture_points(spec)
    with_pre = spec.replace(pre_logits_dim=7)
    assert capture_points(with_pre) == [*expected, "encoded", "pooled", "pre_logits", "output"]
    shapes = capture_shapes(with_pre, 3)
    assert list(shapes) == capture_points(with_pre)
    n, d, h = spec.seq_len, spec.hidden_dim, spec.n_heads
    assert shapes["blocks.1.attn_probs"] == (3, h, n, n)
    assert shapes["blocks.1.attn_heads"] == (3, h, n, d // h)
    assert shapes["pre_logits"] == (3, 7)
    assert shapes["output"] == (3, spec.n_classes)


def test_pos_embed_meaning_says_whether_the_class_token_has_a_row() -> None:
    spec = family("vit_paper")
    assert spec.pos_embed_class_slot
    table = {p.name: p.meaning for p in vitspec.param_table(spec)}
    assert (
        table["pos_embed"] == "learned position embedding (prefix tokens then patches, row-major)"
    )
    table = {
        p.name: p.meaning for p in vitspec.param_table(spec.replace(pos_embed_class_slot=False))
    }
    assert table["pos_embed"] == "learned position embedding (patches, row-major)"


def test_param_rows_are_frozen() -> None:
    import dataclasses

    row = vitspec.param_table(family("vit_paper"))[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.name = "renamed"  # type: ignore[misc]
