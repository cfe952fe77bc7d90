"""The spec: fields, validation messages, derived values, loading, presets, YAML round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vitspec
from vitspec import Spec, SpecError, load_spec
from vitspec.families import FAMILIES, family
from vitspec.presets import VARIANTS, preset

BASE = {"image_size": 32, "patch_size": 8, "hidden_dim": 48, "n_heads": 4, "depth": 2}


def problems(data: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        Spec.from_dict(data)
    return info.value.problems


# ---- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_dim": 100, "n_heads": 12}, "hidden_dim 100 is not divisible by n_heads 12"),
        ({"image_size": 30}, "image_size 30 is not divisible by patch_size 8"),
        ({"image_size": [32, 30]}, "image_size 32x30 is not divisible by patch_size 8"),
        ({"hidden_dim": 0}, "hidden_dim must be greater than 0, found 0"),
        ({"depth": -3}, "depth must be greater than 0, found -3"),
        (
            {"patch_size": 16.0},
            "patch_size must be a positive integer or a pair [height, width], found a float (16.0)",
        ),
        ({"depth": 2.0}, "depth must be an integer, found a float (2.0)"),
        ({"depth": "2"}, "depth must be an integer, found a string ('2')"),
        ({"depth": True}, "depth must be an integer, found a boolean (True)"),
        (
            {"image_size": [32, 32, 32]},
            "image_size must be a positive integer or a pair [height, width], found a list",
        ),
        ({"image_size": [32, 0]}, "image_size[1] must be greater than 0, found 0"),
        ({"n_classes": -1}, "n_classes must be at least 0, found -1"),
        (
            {"mlp_ratio": 0.01},
            "hidden_dim * mlp_ratio must be a whole number, found 48 * 0.01 = 0.48",
        ),
        ({"mlp_ratio": 2.5, "hidden_dim": 50, "n_heads": 5}, None),
        ({"mlp_ratio": "4"}, "mlp_ratio must be a number, found a string ('4')"),
        (
            {"pooling": "mean"},
            "pooling must be one of 'token', 'avg', 'max', 'avgmax' or 'map', found 'mean'",
        ),
        ({"gelu": "approx"}, "gelu must be one of 'exact', 'tanh' or 'quick', found 'approx'"),
        ({"class_token": "yes"}, "class_token must be true or false, found a string ('yes')"),
        (
            {"pooling": "token", "class_token": False},
            "pooling 'token' needs class_token true, found class_token false",
        ),
        (
            {"pos_embed": "sincos2d", "hidden_dim": 42, "n_heads": 2},
            "pos_embed 'sincos2d' needs hidden_dim divisible by 4",
        ),
        (
            {"pos_embed": "sincos2d", "hidden_dim": 4, "n_heads": 1},
            "pos_embed 'sincos2d' needs hidden_dim divisible by 4 and at least 8, found 4",
        ),
        (
            {"pos_embed_class_slot": True, "pos_embed": "none"},
            "pos_embed_class_slot true needs a prefix token (class_token, distillation_token or reg_tokens) and pos_embed 'learned', found pos_embed 'none'",
        ),
        ({"norm_eps": 0.0}, "norm_eps must be greater than 0.0, found 0.0"),
        ({"norm_eps": float("nan")}, "norm_eps must be a finite number"),
        ({"dropout": 1.0}, "dropout must be less than 1.0, found 1.0"),
        ({"drop_path": -0.1}, "drop_path must be at least 0.0, found -0.1"),
        ({"hiden_dim": 48}, "unknown field 'hiden_dim'; did you mean 'hidden_dim'?"),
    ],
)
def test_each_bad_value_gets_one_clear_message(change: dict, message: str | None) -> None:
    data = {**BASE, **change}
    if "hiden_dim" in change:
        del data["hidden_dim"]
    if message is None:
        Spec.from_dict(data)  # valid: 50 * 2.5 = 125
        return
    found = problems(data)
    assert any(message in p for p in found), found
    assert all("\n" not in p for p in found)


def test_distillation_and_pool_prefix_rules_name_what_is_wrong_in_yaml_words() -> None:
    found = problems({**BASE, "distillation_token": True, "class_token": False, "pooling": "avg"})
    assert found == [
        "distillation_token true needs class_token true, pooling 'token', final_norm 'before_pool' "
        "or 'none' and pre_logits_dim 0 (DeiT's distilled model), found class_token false, pooling 'avg'"
    ]
    assert problems({**BASE, "pool_include_prefix": True, "pooling": "token"}) == [
        "pool_include_prefix true needs pooling 'avg', 'max', 'avgmax' or 'map', found 'token'"
    ]


def test_missing_fields_are_each_named() -> None:
    found = problems({"image_size": 32})
    assert {p.split()[0] for p in found} == {"patch_size", "hidden_dim", "n_heads", "depth"}
    assert all("is required" in p for p in found)


def test_every_problem_is_reported_at_once() -> None:
    found = problems(
        {
            **BASE,
            "hidden_dim": 50,
            "n_heads": 4,
            "image_size": 30,
            "pooling": "token",
            "class_token": False,
        }
    )
    assert len(found) == 3
    assert any("not divisible by n_heads" in p for p in found)
    assert any("image_size 30" in p for p in found)
    assert any("pooling 'token'" in p for p in found)


def test_spec_is_frozen_and_hashable() -> None:
    spec = Spec.from_dict(BASE)
    with pytest.raises(Exception, match="frozen"):
        spec.depth = 3  # type: ignore[misc]
    assert hash(spec) == hash(Spec.from_dict(BASE))


def test_non_square_sizes_and_class_slot_default() -> None:
    spec = Spec.from_dict({**BASE, "image_size": [24, 40], "patch_size": [6, 8]})
    assert spec.grid == (4, 5) and spec.n_patches == 20 and spec.seq_len == 21
    assert spec.pos_embed_class_slot is True and spec.n_positions == 21
    gap = Spec.from_dict({**BASE, "class_token": False, "pooling": "avg"})
    assert gap.pos_embed_class_slot is False and gap.n_positions == 16 and gap.seq_len == 16
    no_slot = Spec.from_dict({**BASE, "pos_embed_class_slot": False})
    assert no_slot.n_positions == 16 and no_slot.seq_len == 17


# ---- derived values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "n_params"),
    [
        # timm's counts for vit_*_patch*_224 with 1000 classes.
        ("Ti/16", 5_717_416),
        ("S/16", 22_050_664),
        ("B/16", 86_567_656),
        ("B/32", 88_224_232),
        ("L/16", 304_326_632),
        ("H/14", 632_045_800),
    ],
)
def test_n_params_equals_timm(name: str, n_params: int) -> None:
    assert preset(name).n_params == n_params


def test_n_params_equals_timm_model_for_every_family() -> None:
    torch = pytest.importorskip("torch")  # installed in CI: test extra
    from timm.models.vision_transformer import VisionTransformer

    for spec, kwargs in [
        (family("timm_token"), {}),
        (family("timm_avg_fc_norm"), {"global_pool": "avg", "fc_norm": True}),
        (family("timm_no_qkv_bias"), {"qkv_bias": False}),
        (family("no_head"), {"num_classes": 0}),
        (family("timm_no_embed_class"), {"no_embed_class": True}),
        (family("big_vision_gap"), {"class_token": False, "global_pool": "avg", "fc_norm": False}),
    ]:
        args = {
            "img_size": spec.image_size,
            "patch_size": spec.patch_size,
            "embed_dim": spec.hidden_dim,
            "depth": spec.depth,
            "num_heads": spec.n_heads,
            "num_classes": spec.n_classes,
            **kwargs,
        }
        model = VisionTransformer(**args)
        with torch.no_grad():
            assert sum(p.numel() for p in model.parameters()) == spec.n_params, spec


def test_derived_values() -> None:
    spec = preset("B/16")
    assert (spec.grid, spec.n_patches, spec.seq_len, spec.head_dim, spec.mlp_dim) == (
        (14, 14),
        196,
        197,
        64,
        3072,
    )
    # 17.58 GMACs is the usual figure for ViT-B/16 at 224 (fvcore counts MACs).
    assert spec.macs == 17_563_828_224
    assert spec.flops == 2 * spec.macs
    assert preset("B/16@384").seq_len == 577


# ---- presets ------------------------------------------------------------------------------


def test_presets_follow_the_paper_table() -> None:
    b, large, h = preset("B/16"), preset("ViT-L/16"), preset("H/14")
    assert (b.hidden_dim, b.depth, b.mlp_dim, b.n_heads) == (768, 12, 3072, 12)
    assert (large.hidden_dim, large.depth, large.mlp_dim, large.n_heads) == (1024, 24, 4096, 16)
    assert (h.hidden_dim, h.depth, h.mlp_dim, h.n_heads, h.patch_size) == (
        1280,
        32,
        5120,
        16,
        (14, 14),
    )
    for variant in VARIANTS:
        spec = preset(f"{variant}/16")
        assert spec.n_classes == 1000 and spec.class_token and spec.pos_embed_class_slot


def test_unknown_preset_and_missing_file() -> None:
    with pytest.raises(SpecError, match="'Q/16' is neither a spec file nor a preset name"):
        load_spec("Q/16")
    with pytest.raises(SpecError, match="no such spec file: nope.yaml"):
        load_spec("nope.yaml")
    with pytest.raises(SpecError, match="not divisible by patch_size 15"):
        load_spec("B/15")


# ---- files --------------------------------------------------------------------------------


def test_yaml_round_trip_for_every_family(tmp_path: Path) -> None:
    for name in FAMILIES:
        spec = family(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(spec.to_yaml())
        assert load_spec(path) == spec
        (tmp_path / f"{name}.json").write_text(spec.to_json())
        assert load_spec(tmp_path / f"{name}.json") == spec


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.yaml", "", "empty.yaml: is empty, expected a YAML or JSON spec"),
        ("blank.yaml", "  \n\n", "is empty"),
        (
            "binary.yaml",
            b"\x89PNG\r\n\x1a\n\x00\x00",
            "is a binary file, expected a YAML or JSON spec",
        ),
        ("latin1.yaml", b"image_size: \xe9", "is not UTF-8 text"),
        ("list.yaml", "- 1\n- 2\n", "a spec must be a mapping of field: value, found a list"),
        ("scalar.yaml", "224\n", "found an integer (224)"),
        ("null.yaml", "~\n", "found nothing"),
        (
            "syntax.yaml",
            "image_size: 32\npatch_size: [8,\n",
            "syntax.yaml: line 3 column 1: invalid YAML",
        ),
        ("tab.yaml", "image_size: 32\n\tdepth: 2\n", "line 2"),
        ("bad.json", '{"image_size": 32,}', "bad.json: line 1 column 19: invalid JSON"),
        (
            "alias.yaml",
            "a: &x 1\nb: *x\n",
            "line 1 column 4: YAML anchors and aliases are not allowed",
        ),
    ],
)
def test_bad_files_give_one_line_errors(
    tmp_path: Path, name: str, content: str | bytes, message: str
) -> None:
    path = _write(tmp_path, name, content)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert message in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i, (prev, cur) in enumerate(zip("abcdefgh", "bcdefghi", strict=True)):
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
        del i
    path = _write(tmp_path, "bomb.yaml", "\n".join(lines) + "\n")
    with pytest.raises(SpecError, match="anchors and aliases are not allowed"):
        load_spec(path)


def test_huge_file_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "huge.yaml", "# " + "x" * (2 << 20) + "\n")
    with pytest.raises(SpecError, match="a spec file is at most"):
        load_spec(path)


def test_unknown_field_in_file_names_file_and_closest(tmp_path: Path) -> None:
    path = _write(tmp_path, "s.yaml", json.dumps({**BASE, "n_head": 4}))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}: unknown field 'n_head'; did you mean 'n_heads'?"


def test_json_schema_names_every_field() -> None:
    schema = Spec.model_json_schema()
    assert set(schema["properties"]) == set(Spec.model_fields)
    assert all(schema["properties"][f].get("description") for f in Spec.model_fields)
    assert set(schema["required"]) == {"image_size", "patch_size", "hidden_dim", "n_heads", "depth"}


def test_replace_validates() -> None:
    spec = Spec.from_dict(BASE)
    assert spec.replace(depth=5).depth == 5
    with pytest.raises(SpecError, match="not divisible by n_heads 5"):
        spec.replace(n_heads=5)


def test_public_api_is_lazy_and_complete() -> None:
    for name in vitspec.__all__:
        assert getattr(vitspec, name) is not None
    with pytest.raises(AttributeError):
        vitspec.nope  # noqa: B018


# ---- float notations (YAML 1.2) and derived defaults -------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1e-5", 1e-5),
        ("1E-5", 1e-5),
        ("5e-1", 0.5),
        (".5", 0.5),
        ("+.5", 0.5),
        ("1.0e-5", 1e-5),
        ("2.5E+0", 2.5),
    ],
)
def test_every_float_notation_is_a_number_in_yaml_and_in_spec_pairs(
    tmp_path: Path, text: str, value: float
) -> None:
    from vitspec.formats.infer import load_partial_spec

    field = "norm_eps" if value < 1 else "mlp_ratio"
    path = _write(
        tmp_path, "s.yaml", "".join(f"{k}: {v}\n" for k, v in BASE.items()) + f"{field}: {text}\n"
    )
    assert getattr(load_spec(path), field) == value
    assert load_partial_spec(f"{field}={text}") == {field: value}


@pytest.mark.parametrize("text", ["abc", "'1e-5'", '"0.5"', "1e-5x", "e-5", "1e"])
def test_real_strings_are_still_refused_where_a_number_belongs(tmp_path: Path, text: str) -> None:
    path = _write(
        tmp_path, "s.yaml", "".join(f"{k}: {v}\n" for k, v in BASE.items()) + f"norm_eps: {text}\n"
    )
    with pytest.raises(SpecError, match=r"norm_eps must be a number, found a string"):
        load_spec(path)


def test_integers_stay_integers_and_strings_stay_strings_in_yaml(tmp_path: Path) -> None:
    from vitspec.spec import load_yaml

    assert load_yaml("a: 12\nb: 012\nc: 09\nd: 1_000\ne: 1e3\nf: -2E-2\ng: .inf\nh: B/16\n") == {
        "a": 12,
        "b": 10,
        "c": "09",
        "d": 1000,
        "e": 1000.0,
        "f": -0.02,
        "g": float("inf"),
        "h": "B/16",
    }


def test_replace_re_derives_defaults_that_were_not_set() -> None:
    b16 = preset("B/16")
    assert b16.pos_embed_class_slot is True and b16.n_positions == 197
    gap = b16.replace(class_token=False, pooling="avg")
    assert gap.pos_embed_class_slot is False and gap.n_positions == 196
    assert gap.replace(class_token=True).pos_embed_class_slot is True
    assert b16.replace(pos_embed="sincos2d").pos_embed_class_slot is False
    # A field set explicitly stays, even through replace; a contradiction is reported, not guessed away.
    no_slot = Spec.from_dict({**BASE, "pos_embed_class_slot": False})
    assert no_slot.replace(depth=3).pos_embed_class_slot is False
    slot = Spec.from_dict({**BASE, "pos_embed_class_slot": True})
    with pytest.raises(SpecError, match="pos_embed_class_slot true needs a prefix token"):
        slot.replace(class_token=False, pooling="avg")
    # None asks for the derived value again.
    assert no_slot.replace(pos_embed_class_slot=None).pos_embed_class_slot is True
    assert gap == Spec.from_dict(
        {
            **BASE,
            "image_size": 224,
            "patch_size": 16,
            "hidden_dim": 768,
            "n_heads": 12,
            "depth": 12,
            "mlp_ratio": 4.0,
            "class_token": False,
            "pooling": "avg",
        }
    )
