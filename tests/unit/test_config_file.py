"""amft_lib.config_file and amft_lib.regular_file: the bounded YAML/JSON loader every config path goes through."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import yaml

from amft_lib.config import TrainConfig, apply_overrides, load_config
from amft_lib.config_file import (
    MAX_DEPTH,
    ConfigError,
    expanded_size,
    load_mapping_file,
    parse_value,
    parse_yaml,
    read_config_text,
)


def _bomb(levels: int, fan: int = 9) -> str:
    """The classic "billion laughs" in YAML: level k is `fan` aliases of level k-1 (fan**levels leaves)."""
    lines = [f"l0: &l0 [{', '.join(['x'] * fan)}]"]
    lines += [f"l{k}: &l{k} [{', '.join([f'*l{k - 1}'] * fan)}]" for k in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_plain_yaml_and_json_parse_as_safe_load_does() -> None:
    text = "optim:\n  lr: 0.001\n  betas: [0.9, 0.99]\nname: x\nflag: true\nnothing:\n"
    assert parse_yaml(text, "f") == yaml.safe_load(text)
    assert parse_yaml('{"a": [1, 2, {"b": null}]}', "f") == {"a": [1, 2, {"b": None}]}
    assert parse_yaml("", "f") is None


def test_small_aliases_and_merge_keys_still_work() -> None:
    """Bounded, not refused: a config may share a block with an anchor, and `<<:` may be overridden."""
    text = "base: &b {lr: 0.1, seed: 1}\nrun:\n  <<: *b\n  lr: 0.2\nlist: &l [1, 2]\ncopy: *l\n"
    assert parse_yaml(text, "f") == {"base": {"lr": 0.1, "seed": 1}, "run": {"lr": 0.2, "seed": 1},
                                     "list": [1, 2], "copy": [1, 2]}


def test_duplicate_key_names_both_lines() -> None:
    with pytest.raises(ConfigError, match=r"^cfg.yaml:line 4: duplicate key 'lr' \(first at line 2\)"):
        parse_yaml("optim:\n  lr: 1\n  beta1: 0.9\n  lr: 2\n", "cfg.yaml")
    with pytest.raises(ConfigError, match="duplicate key 'a'"):  # flow mappings and JSON too
        parse_yaml('{"a": 1, "a": 2}', "p.json")
    assert parse_yaml("a: {x: 1}\nb: {x: 2}\n", "f") == {"a": {"x": 1}, "b": {"x": 2}}  # same key, other maps


def test_expanded_size_counts_aliases_without_expanding() -> None:
    """Hand count: l0 = 1 list + 3 scalars = 4; l1 = 1 + 3*4 = 13; the root = 1 + 2 keys + 4 + 13 = 20."""
    node = yaml.compose("l0: &l0 [x, x, x]\nl1: [*l0, *l0, *l0]\n")
    assert expanded_size(node) == 20


def test_alias_bomb_refused_fast() -> None:
    """9 levels of 9 = 387,420,489 leaves (the 416-byte bomb of the issue): refused in milliseconds."""
    text = _bomb(9)
    assert len(text) < 500
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than 100000 values"):
        parse_yaml(text, "bomb.yaml")
    assert time.perf_counter() - t0 < 2.0
    assert parse_yaml(_bomb(4), "ok.yaml")["l3"][0][0][0][0] == "x"  # 9**4 = 6561 leaves: under the bound


def test_recursive_alias_refused() -> None:
    with pytest.raises(ConfigError, match="an alias refers to itself"):
        parse_yaml("a: &a [1, *a]\n", "f")


@pytest.mark.parametrize("depth,ok", [(MAX_DEPTH - 1, True), (MAX_DEPTH + 1, False), (20_000, False)])
def test_depth_bound(depth: int, ok: bool) -> None:
    """The document node plus `depth` nested lists; 20,000 was a RecursionError traceback before."""
    text = "[" * depth + "]" * depth
    if ok:
        value = parse_yaml(text, "f")
        for _ in range(depth - 1):
            value = value[0]
        assert value == []
    else:
        with pytest.raises(ConfigError, match=f"nested deeper than {MAX_DEPTH} levels"):
            parse_yaml(text, "f")


def test_syntax_error_names_line() -> None:
    with pytest.raises(ConfigError, match=r"^f\.yaml: not valid YAML at line 2 \(mapping values are not allowed"):
        parse_yaml("a: 1\nb: x: 2\nc: 3\n", "f.yaml")


def test_non_regular_paths_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "cfg.fifo"
    os.mkfifo(fifo)
    result: list[str] = []

    def read() -> None:
        try:
            read_config_text(fifo)
        except ConfigError as exc:
            result.append(str(exc))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    assert result == [f"{fifo}: config file is a FIFO; give a regular file"]
    with pytest.raises(ConfigError, match=r"^/dev/zero: params file is a device"):
        load_mapping_file("/dev/zero", "params file")
    with pytest.raises(ConfigError, match="is a directory, not a config file"):
        read_config_text(tmp_path)
    link = tmp_path / "link.yaml"
    link.symlink_to("/dev/zero")  # judged by what it points at
    with pytest.raises(ConfigError, match=r"link\.yaml: config file is a device"):
        read_config_text(link)
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        read_config_text(tmp_path / "nope.yaml")


def test_size_cap_and_encoding(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"a: 1\n" + b"#" * 200)
    assert read_config_text(big, max_bytes=205) == "a: 1\n" + "#" * 200  # exactly at the cap: read
    with pytest.raises(ConfigError, match="larger than 204 bytes"):
        read_config_text(big, max_bytes=204)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        read_config_text(latin)


def test_load_mapping_file_shapes(tmp_path: Path) -> None:
    empty, listed = tmp_path / "empty.yaml", tmp_path / "list.yaml"
    empty.write_text("# nothing\n")
    listed.write_text("- a\n")
    assert load_mapping_file(empty) == {}
    with pytest.raises(ConfigError, match="top level must be a mapping, got list"):
        load_mapping_file(listed)


def test_load_config_uses_the_loader(tmp_path: Path) -> None:
    """Through config.load_config: a good file loads; a duplicate key and a bomb are refused, naming the file."""
    good, dup = tmp_path / "good.yaml", tmp_path / "dup.yaml"
    good.write_text("optim:\n  lr: 0.01\nseed: 3\n")
    dup.write_text("seed: 3\nseed: 4\n")
    cfg = load_config(good)
    assert (cfg.optim.lr, cfg.seed) == (0.01, 3)
    with pytest.raises(ConfigError, match=f"^{dup}:line 2: duplicate key 'seed'"):
        load_config(dup)


def test_overrides_use_the_same_bounds() -> None:
    cfg = apply_overrides(TrainConfig(), ["model.lora_targets=[q_proj, v_proj]"])
    assert cfg.model.lora_targets == ["q_proj", "v_proj"]
    bomb = "[" + ", ".join(["&a [x, x, x, x, x, x, x, x, x]"] + [
        f"&{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]) + "]"
    with pytest.raises(ConfigError, match=r"^override 'model.lora_targets=\[&a .*\.\.\.':line 1: expands to more"):
        apply_overrides(TrainConfig(), [f"model.lora_targets={bomb}"])
    with pytest.raises(ConfigError, match="longer than"):
        parse_value("x" * (2 << 20), "--set a")
