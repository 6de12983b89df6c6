"""load_model: registry names via the cache, each file/folder format, activation rules, refusals."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from clipengine.errors import CheckpointError, DownloadNotAllowedError
from clipengine.image.preprocess import PreprocessConfig
from clipengine.models import load as load_mod
from clipengine.models.clip import CLIP
from clipengine.models.config import CLIPConfig
from clipengine.models.load import load_model
from clipengine.models.registry import get_source
from clipengine.models.saving import save_model
from clipengine.models.weights import cache_path, hub_dir

from .conftest import SMALL_TEXT, SMALL_VIT, Checkpoint
from .parity import assert_parity


def test_registry_name_without_cache_refuses_to_download() -> None:
    with pytest.raises(DownloadNotAllowedError, match="ViT-B-32@openai are not in the cache"):
        load_model("ViT-B-32")


def _small_cfg() -> CLIPConfig:
    return CLIPConfig.from_dict({"embed_dim": 64, "vision": SMALL_VIT, "text": SMALL_TEXT}, name="ViT-B-32")


@pytest.fixture
def cached_laion(monkeypatch: pytest.MonkeyPatch, small_vit_bin: Checkpoint) -> Path:
    """Pretend the small open_clip checkpoint is ViT-B-32@laion2b_s34b_b79k placed in the cache."""
    source = get_source("ViT-B-32", "laion2b_s34b_b79k")
    monkeypatch.setattr(load_mod, "get_config", lambda arch: _small_cfg())
    monkeypatch.setattr(
        load_mod, "get_source", lambda arch, tag: replace(source, preprocess=PreprocessConfig(32))
    )
    path = cache_path(source)
    path.parent.mkdir(parents=True)
    shutil.copy(small_vit_bin.path, path)
    return path


def test_registry_name_loads_cached_file_with_entry_settings(
    cached_laion: Path, small_vit_bin: Checkpoint
) -> None:
    loaded = load_model("ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert (loaded.name, loaded.pretrained, loaded.source) == (
        "ViT-B-32",
        "laion2b_s34b_b79k",
        str(cached_laion),
    )
    assert not loaded.config.quick_gelu  # from the registry entry
    assert_parity(small_vit_bin, loaded)


def test_quickgelu_suffix_overrides_the_entry(cached_laion: Path) -> None:
    assert load_model("ViT-B-32-quickgelu@laion2b_s34b_b79k").config.quick_gelu


@pytest.mark.parametrize(
    ("fixture", "quick_gelu"),
    [
        ("small_vit_bin", False),  # open_clip .bin: GELU by convention
        ("small_vit_safetensors", False),
        ("small_vit_training", False),
        ("small_rn_torchscript", True),  # OpenAI archive: QuickGELU
        ("small_rn_openai_state_dict", True),  # OpenAI metadata keys present
        ("small_hf_folder", False),  # HF config says hidden_act=gelu
    ],
)
def test_activation_follows_the_format(
    fixture: str, quick_gelu: bool, request: pytest.FixtureRequest
) -> None:
    ckpt: Checkpoint = request.getfixturevalue(fixture)
    loaded = load_model(ckpt.path)
    assert loaded.config.quick_gelu is quick_gelu
    assert loaded.module.training is False and loaded.module.dtype == torch.float32
    assert torch.equal(loaded.module.attn_mask, torch.full((77, 77), -1e4).triu_(1))


def test_arch_hint_forces_activation(small_vit_bin: Checkpoint) -> None:
    cfg = load_model(small_vit_bin.path, arch=_small_cfg().with_quick_gelu(True)).config
    assert cfg.quick_gelu and cfg.name == "ViT-B-32"


def test_arch_name_hint_must_fit_the_shapes(small_vit_bin: Checkpoint) -> None:
    with pytest.raises(CheckpointError, match=r"does not fit architecture 'ViT-B-32'.*shape mismatches"):
        load_model(small_vit_bin.path, arch="ViT-B-32")


def test_hf_folder_reads_preprocessor_config(small_hf_folder: Checkpoint) -> None:
    loaded = load_model(small_hf_folder.path)
    assert loaded.preprocess == PreprocessConfig(32, (0.5,) * 3, (0.5,) * 3, "bilinear")  # type: ignore[arg-type]
    assert loaded.config.text.heads == 4 and loaded.config.vision.heads == 3


def test_open_clip_hub_folder(small_vit_open_clip: Any, small_vit_safetensors: Checkpoint) -> None:
    folder = hub_dir("org/small-clip")
    folder.mkdir(parents=True)
    shutil.copy(small_vit_safetensors.path, folder / "open_clip_model.safetensors")
    model_cfg = {"embed_dim": 64, "vision_cfg": SMALL_VIT, "text_cfg": SMALL_TEXT, "quick_gelu": False}
    pp = {
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "interpolation": "bicubic",
        "resize_mode": "squash",
    }
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pp}))
    loaded = load_model("hf-hub:org/small-clip")
    assert loaded.preprocess.resize_mode == "squash" and loaded.preprocess.image_size == 32
    assert_parity(small_vit_safetensors, loaded)


def test_save_model_round_trip(tmp_path: Path, tiny_model: CLIP) -> None:
    pp = PreprocessConfig(image_size=32, interpolation="bilinear")
    save_model(tiny_model, tmp_path / "m", pp)
    loaded = load_model(tmp_path / "m")
    assert loaded.config == tiny_model.config and loaded.preprocess == pp
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key


def _half_written_save_file(tensors: dict[str, torch.Tensor], filename: str) -> None:
    """safetensors' save_file dying halfway (disk full): part of a file, then the error."""
    Path(filename).write_bytes(b"\x00" * 100)
    raise OSError(28, "No space left on device")


def test_failed_save_keeps_the_previous_save_and_leaves_no_temp_files(
    tmp_path: Path, tiny_model: CLIP, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    pp = PreprocessConfig(image_size=32, interpolation="bilinear")
    folder = save_model(tiny_model, tmp_path / "m", pp)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setattr(safetensors.torch, "save_file", _half_written_save_file)
    with pytest.raises(OSError, match="No space left"):
        save_model(tiny_model, folder, PreprocessConfig(image_size=32))  # another config.json
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp or backup folder left beside it
    loaded = load_model(folder)
    assert loaded.preprocess == pp
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key


def test_loading_a_folder_whose_save_was_killed_names_the_previous_save(tmp_path: Path, tiny_model: CLIP) -> None:
    """Killed between save_model's two renames: no folder, the previous save beside it as .NAME.*.old."""
    folder = save_model(tiny_model, tmp_path / "m")
    folder.rename(tmp_path / ".m.0123abcd.old")
    with pytest.raises(CheckpointError, match=r"previous save is in .*\.m\.0123abcd\.old: rename it back"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("killed", ["while writing", "between the renames"])
def test_the_next_save_cleans_up_after_a_killed_one(tmp_path: Path, tiny_model: CLIP, killed: str) -> None:
    """A save killed while writing leaves .m.<hex>.saving; killed between its renames, no m and the
    previous save as .m.<hex>.old. The next save removes both kinds and leaves only m (the user's
    own dot-files beside it stay)."""
    folder = save_model(tiny_model, tmp_path / "m")
    (tmp_path / ".m.deadbeef.saving").mkdir()
    (tmp_path / ".m.deadbeef.saving" / "model.safetensors").write_bytes(b"half")
    if killed == "between the renames":
        folder.rename(tmp_path / ".m.0123abcd.old")
    (tmp_path / ".m.notes.old").write_text("the user's")
    save_model(tiny_model, tmp_path / "m", PreprocessConfig(image_size=32, interpolation="bilinear"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.notes.old", "m"]
    assert load_model(tmp_path / "m").preprocess.interpolation == "bilinear"


def test_failed_first_save_leaves_no_folder(
    tmp_path: Path, tiny_model: CLIP, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", _half_written_save_file)
    with pytest.raises(OSError, match="No space left"):
        save_model(tiny_model, tmp_path / "new" / "m")
    assert [p.name for p in (tmp_path / "new").iterdir()] == []


def test_save_replaces_a_previous_save_whole(tmp_path: Path, tiny_model: CLIP) -> None:
    folder = save_model(tiny_model, tmp_path / "m")
    other = CLIP(tiny_model.config).eval()  # other (random) weights, same architecture
    pp = PreprocessConfig(image_size=32, interpolation="bilinear")
    assert save_model(other, folder, pp) == folder
    loaded = load_model(folder)
    assert loaded.preprocess == pp
    for key, value in other.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("previous", [False, True])
def test_save_is_durable_files_and_folder_synced_around_the_rename(
    tmp_path: Path, tiny_model: CLIP, monkeypatch: pytest.MonkeyPatch, previous: bool
) -> None:
    """Both files and the folder holding their names reach the disk before the rename, and the
    parent folder (which holds the rename) after it: a power loss keeps the old save or the new."""
    import sync_log

    if previous:
        save_model(tiny_model, tmp_path / "m")
    log = sync_log.record(monkeypatch)
    folder = save_model(tiny_model, tmp_path / "m", PreprocessConfig(image_size=32, interpolation="bilinear"))
    monkeypatch.undo()
    log.assert_rename_durable(folder)
    rename = log.renames_to(folder)[-1]
    for p in (folder / "config.json", folder / "model.safetensors", folder):
        assert log.synced_before(rename, p), p


def test_save_into_an_empty_folder(tmp_path: Path, tiny_model: CLIP) -> None:
    (tmp_path / "m").mkdir()
    save_model(tiny_model, tmp_path / "m")
    assert load_model(tmp_path / "m").config == tiny_model.config


def test_save_refuses_a_folder_holding_other_files(tmp_path: Path, tiny_model: CLIP) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"notes\.txt.*new or empty folder"):
        save_model(tiny_model, tmp_path / "m")
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    (tmp_path / "f").write_text("a file")
    with pytest.raises(CheckpointError, match="not a folder"):
        save_model(tiny_model, tmp_path / "f")
    assert (tmp_path / "f").read_text() == "a file"


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_model(path)


# Text files whose first byte is a pickle opcode make torch's unpickler fail with a raw KeyError
# ("hello": BINGET of a memo entry never put) or IndexError ("a", "t": pop from an empty stack).
@pytest.mark.parametrize(
    "content", [b"", b"not a checkpoint at all", b"hello world\n", b"a README", b"transformers config"]
)
def test_garbage_file_is_a_checkpoint_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"bad\.bin: not a readable checkpoint"):
        load_model(path)


@pytest.mark.parametrize(
    "content",
    [{}, [1, 2], {"epoch": 3, "name": "run"}, torch.zeros(3)],
    ids=["empty dict", "list", "no tensors", "a tensor"],
)
def test_a_pickle_holding_no_state_dict_names_the_file(tmp_path: Path, content: Any) -> None:
    """The message ("checkpoint holds no state dict", "entry 'x' is a int") named no file: with
    several --checkpoint files in a script, the user could not tell which one."""
    torch.save(content, tmp_path / "odd.bin")
    with pytest.raises(CheckpointError, match=r"odd\.bin( holds no state dict|: entry 'epoch' is a int)"):
        load_model(tmp_path / "odd.bin")


@pytest.mark.parametrize("entries", [["config.json", "model.safetensors"], ["x/data.txt"]])
def test_a_zip_that_is_no_torch_checkpoint_says_so(tmp_path: Path, entries: list[str]) -> None:
    """torch's own reasons ("[enforce fail at inline_container.cc:180] . file in archive is not in a
    subdirectory", "Expected hasRecord("version") to be true ... report an enhancement request to
    PyTorch") did not tell the user the file is a plain zip, such as a zipped model folder."""
    import zipfile

    with zipfile.ZipFile(tmp_path / "model.zip", "w") as z:
        for name in entries:
            z.writestr(name, "{}")
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "model.zip")
    assert str(info.value) == (
        f"{tmp_path / 'model.zip'}: not a readable checkpoint (a zip archive, but not one torch.save or "
        "torch.jit.save writes: no data.pkl); if it holds a model folder, unzip it and pass the folder"
    )


def test_a_torchscript_archive_of_another_module_is_a_checkpoint_error(tmp_path: Path) -> None:
    torch.jit.script(torch.nn.Linear(3, 4)).save(str(tmp_path / "linear.pt"))
    with pytest.raises(CheckpointError, match=r"linear\.pt: cannot infer the architecture, key 'text_projection'"):
        load_model(tmp_path / "linear.pt")
    torch.jit.script(torch.nn.Identity()).save(str(tmp_path / "identity.pt"))
    with pytest.raises(CheckpointError, match=r"identity\.pt holds no state dict"):
        load_model(tmp_path / "identity.pt")


@pytest.mark.parametrize("cut", [0, 4, 100, -100])
def test_unreadable_safetensors_is_a_checkpoint_error(tmp_path: Path, tiny_model: CLIP, cut: int) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(tmp_path / "full.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes((tmp_path / "full.safetensors").read_bytes()[:cut])
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: not a readable checkpoint"):
        load_model(tmp_path / "bad.safetensors")


def test_a_checkpoint_the_os_cannot_read_gets_the_os_reason(tmp_path: Path) -> None:
    """safetensors reported any file it could not open as "No such file or directory" (a
    permission error too) and a folder as "No such device"."""
    from clipengine.models.checkpoint import read_checkpoint

    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"d\.safetensors: not a readable checkpoint \(.*Is a directory"):
        read_checkpoint(tmp_path / "d.safetensors")


def test_integer_safetensors_is_a_checkpoint_error(tmp_path: Path, tiny_model: CLIP) -> None:
    from safetensors.torch import save_file

    state = {k: v.to(torch.int32).contiguous() for k, v in tiny_model.state_dict().items()}
    save_file(state, str(tmp_path / "int.safetensors"))
    with pytest.raises(CheckpointError, match=r"int\.safetensors does not fit .*dtype mismatches"):
        load_model(tmp_path / "int.safetensors", arch=tiny_model.config)


@pytest.mark.parametrize(
    ("file", "content"),
    [
        ("config.json", b"\xff\xfe\x00 not text"),
        ("config.json", b"{}"),
        ("config.json", b'{"embed_dim": "wide", "vision": {}, "text": {}}'),
        ("config.json", b'{"vision_config": null, "text_config": null}'),
        ("open_clip_config.json", b'{"model_cfg": {}}'),
        ("open_clip_config.json", b'{"model_cfg": null}'),
        ("open_clip_config.json", b"\xff\xfe"),
    ],
)
def test_damaged_folder_config_is_a_checkpoint_error(
    tmp_path: Path, tiny_model: CLIP, file: str, content: bytes
) -> None:
    folder = save_model(tiny_model, tmp_path / "damaged-model")
    (folder / file).write_bytes(content)
    with pytest.raises(CheckpointError, match="damaged-model"):
        load_model(folder)


def _edit_json(path: Path, edit: Any) -> None:
    values = json.loads(path.read_text())
    edit(values)
    path.write_text(json.dumps(values))


# Values a hand-edited config.json may hold. They failed inside CLIP's constructor (a TypeError or
# ZeroDivisionError traceback naming neither file nor setting), or, for heads that do not divide
# the width, loaded and failed at the first image with a reshape error.
@pytest.mark.parametrize(
    ("tower", "setting", "value", "reason"),
    [
        ("vision", "layers", "2", r"vision\.layers must be a positive integer, got '2'"),
        ("vision", "layers", [1, 1, 1], r"vision\.layers must be one depth \(ViT\) or 4 \(ModifiedResNet\)"),
        ("vision", "width", 0, r"vision\.width must be a positive integer, got 0"),
        ("vision", "head_width", 20, r"vision: 3 heads do not divide its width 64"),
        ("text", "heads", 3, r"text: 3 heads do not divide its width 64"),
        ("text", "mlp_ratio", 0, r"text\.mlp_ratio must be a positive number, got 0"),
        (None, "embed_dim", -1, r"embed_dim must be a positive integer, got -1"),
        # bool("false") is True: the string picked QuickGELU without a word.
        (None, "quick_gelu", "false", r"quick_gelu must be true or false, got 'false'"),
    ],
)
def test_unbuildable_architecture_settings_name_the_file_and_the_setting(
    tmp_path: Path, tiny_model: CLIP, tower: str | None, setting: str, value: Any, reason: str
) -> None:
    folder = save_model(tiny_model, tmp_path / "edited")
    _edit_json(folder / "config.json", lambda c: (c[tower] if tower else c).update({setting: value}))
    with pytest.raises(CheckpointError, match=r"edited/config\.json: bad architecture settings \(.*" + reason):
        load_model(folder)


def test_unbuildable_settings_from_other_sources_are_checkpoint_errors(
    tmp_path: Path, tiny_model: CLIP, small_hf_folder: Checkpoint
) -> None:
    hf = shutil.copytree(small_hf_folder.path, tmp_path / "hf")
    _edit_json(hf / "config.json", lambda c: c["text_config"].update(num_attention_heads=3))
    with pytest.raises(CheckpointError, match=r"hf/config\.json: .*text: 3 heads do not divide its width 128"):
        load_model(hf)
    torch.save(tiny_model.state_dict(), tmp_path / "tiny.pt")  # a CLIPConfig given as arch=
    bad = replace(tiny_model.config, text=replace(tiny_model.config.text, heads=5))
    with pytest.raises(CheckpointError, match=r"tiny\.pt: .*text: 5 heads do not divide its width 64"):
        load_model(tmp_path / "tiny.pt", arch=bad)


@pytest.mark.parametrize("preprocess_cfg", [None, "bicubic", [0.5]])
def test_open_clip_folder_with_a_malformed_preprocess_cfg(
    small_vit_safetensors: Checkpoint, tmp_path: Path, preprocess_cfg: Any
) -> None:
    """`"preprocess_cfg": null` (or a non-object) raised AttributeError from `.items()`."""
    folder = tmp_path / "oc"
    folder.mkdir()
    shutil.copy(small_vit_safetensors.path, folder / "open_clip_model.safetensors")
    model_cfg = {"embed_dim": 64, "vision_cfg": SMALL_VIT, "text_cfg": SMALL_TEXT}
    meta = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"oc/open_clip_config\.json: preprocess_cfg is not a JSON object"):
        load_model(folder)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("crop_size", "abc"),
        ("crop_size", [32, 32]),
        ("crop_size", {"height": "tall"}),
        ("crop_size", {"height": None}),
        ("resample", [3]),
    ],
)
def test_hf_preprocessor_config_with_a_malformed_setting(
    small_hf_folder: Checkpoint, tmp_path: Path, setting: str, value: Any
) -> None:
    """int() of these crop sizes raised ValueError / TypeError tracebacks, a list resample an
    unhashable-type TypeError."""
    hf = shutil.copytree(small_hf_folder.path, tmp_path / "hf")
    _edit_json(hf / "preprocessor_config.json", lambda pp: pp.update({setting: value}))
    with pytest.raises(
        CheckpointError, match=rf"hf/preprocessor_config\.json: bad preprocessing settings \({setting}"
    ):
        load_model(hf)


def test_hf_preprocessor_config_with_a_null_crop_size_uses_the_model_size(
    small_hf_folder: Checkpoint, tmp_path: Path
) -> None:
    """transformers' CLIPImageProcessor reads `"crop_size": null` as its default; ours is the
    model's own input size (the only size it runs at)."""
    hf = shutil.copytree(small_hf_folder.path, tmp_path / "hf")
    _edit_json(hf / "preprocessor_config.json", lambda pp: pp.update(crop_size=None))
    assert load_model(hf).preprocess.image_size == 32


def test_hf_folder_with_sharded_safetensors(small_hf_folder: Checkpoint, tmp_path: Path) -> None:
    """The documented "model.safetensors [sharded ok]": transformers' own shards and index."""
    small_hf_folder.reference.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / "sharded" / "model.safetensors").exists()
    assert_parity(small_hf_folder, load_model(tmp_path / "sharded"))


@pytest.mark.parametrize("weight_map", [["model-00001.safetensors"], {"w": 1}, None])
def test_hf_shard_index_with_a_malformed_weight_map(
    small_hf_folder: Checkpoint, tmp_path: Path, weight_map: Any
) -> None:
    """A list or non-string shard names raised AttributeError / TypeError tracebacks."""
    hf = shutil.copytree(small_hf_folder.path, tmp_path / "hf")
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"hf/model\.safetensors\.index\.json: weight_map is not"):
        load_model(hf)


def test_a_folder_named_like_a_registered_model_says_how_to_load_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`clipengine predict` (default --model ViT-B-32) run beside a folder named ViT-B-32 (say, an
    output folder) loads that folder; the error said only that it lacks a config.json."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ViT-B-32").mkdir()
    with pytest.raises(CheckpointError, match=r"ViT-B-32: no config\.json .*write ViT-B-32@openai"):
        load_model("ViT-B-32")
    with pytest.raises(CheckpointError) as info:  # a path the user wrote as one: no such hint
        load_model(tmp_path / "ViT-B-32")
    assert "@openai" not in str(info.value)


def test_folder_without_config_says_what_it_expected(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no config\.json or open_clip_config\.json"):
        load_model(tmp_path)


def test_truncated_state_dict_names_missing_keys(tmp_path: Path, tiny_model: CLIP) -> None:
    state = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith("transformer.resblocks.1.")}
    torch.save(state, tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: transformer\.resblocks\.1\."):
        load_model(tmp_path / "cut.pt", arch=tiny_model.config)


def test_a_vit_state_dict_without_its_projection_names_that_key(tmp_path: Path, tiny_model: CLIP) -> None:
    """The ViT/ResNet decision looked at visual.proj alone, so a ViT file lacking it was read as a
    ResNet and refused for lacking 'visual.layer1.0.conv1.weight', a key it never had."""
    state = {k: v for k, v in tiny_model.state_dict().items() if k != "visual.proj"}
    torch.save(state, tmp_path / "noproj.pt")
    with pytest.raises(CheckpointError, match=r"noproj\.pt does not fit .*missing keys: visual\.proj$"):
        load_model(tmp_path / "noproj.pt")


def test_an_arch_that_does_not_fit_a_registered_model_is_refused() -> None:
    """`load("tiny-synth", arch="ViT-B-32")` ignored arch without a word."""
    with pytest.raises(CheckpointError, match=r"arch='ViT-B-32' does not fit tiny-synth@synthetic, a tiny-synth"):
        load_model("tiny-synth", arch="ViT-B-32")
    with pytest.raises(DownloadNotAllowedError):  # the entry's own architecture passes, -quickgelu too
        load_model("ViT-B-32@openai", arch="ViT-B-32-quickgelu")


def test_a_bare_open_clip_file_of_an_architecture_with_other_preprocessing_is_warned(
    small_vit_bin: Checkpoint, small_rn_openai_state_dict: Checkpoint, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A weights file names no tag, so it gets OpenAI's preprocessing; ViT-L-14 laion2b was trained
    with mean = std = 0.5, and such a file exported or embedded with OpenAI's values said nothing."""
    import dataclasses
    import logging

    from clipengine.models import load as load_module
    from clipengine.models import registry

    caplog.set_level(logging.WARNING, logger="clipengine.models.load")
    load_module._warn_unnamed_preprocessing(Path("big.bin"), "ViT-L-14", PreprocessConfig(image_size=224))
    assert "laion2b_s32b_b82k weights of ViT-L-14 were trained with other values" in caplog.text
    caplog.clear()
    load_module._warn_unnamed_preprocessing(Path("b32.bin"), "ViT-B-32", PreprocessConfig(image_size=224))
    assert not caplog.records  # every ViT-B-32 tag uses OpenAI's values: nothing to say
    # Through a load: the small ViT is named ViT-B-32; give that name a tag trained with other values.
    real = registry.get_source

    def other_norm(arch: str, tag: str | None = None):  # type: ignore[no-untyped-def]
        source = real(arch, tag)
        if arch == "ViT-B-32" and tag == "laion2b_s34b_b79k":
            return dataclasses.replace(source, preprocess=dataclasses.replace(source.preprocess, mean=(0.5,) * 3))
        return source

    monkeypatch.setattr(registry, "get_source", other_norm)
    loaded = load_model(small_vit_bin.path, arch=_small_cfg())
    assert loaded.preprocess == PreprocessConfig(image_size=32)  # still OpenAI's: a warning, not a guess
    # listed among the tags that differ (every one does in size here: the small model's 32 px)
    assert re.search(r"laion2b_s34b_b79k[\w, ]* weights of ViT-B-32 were trained with other values", caplog.text)
    caplog.clear()
    load_model(small_rn_openai_state_dict.path)  # OpenAI's own file: OpenAI's preprocessing, no warning
    assert not caplog.records


def test_an_export_folder_is_named_as_one(tmp_path: Path) -> None:
    """`clipengine export EXPORT_FOLDER` said only that config.json was missing."""
    from clipengine.export.manifest import MANIFEST_FILE

    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / MANIFEST_FILE).write_text("{}")  # load.py names the file itself (models does not import export)
    (folder / "image_fp32_b1.onnx").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"exported: an export folder .*--backend onnx or openvino"):
        load_model(folder)


def test_arch_applies_to_a_clipengine_model_folder_as_to_other_folders(tmp_path: Path, tiny_model: CLIP) -> None:
    """`load(folder, arch=...)` applied arch to open_clip and transformers folders but ignored it for
    a clipengine folder (its config.json won without a word)."""
    folder = save_model(tiny_model, tmp_path / "tiny")
    flipped = tiny_model.config.with_quick_gelu(not tiny_model.config.quick_gelu)
    assert load_model(folder, arch=flipped).config.quick_gelu is flipped.quick_gelu
    with pytest.raises(CheckpointError, match=r"tiny/model\.safetensors"):  # ViT-B-32's shapes do not fit
        load_model(folder, arch="ViT-B-32")
    assert load_model(folder).config == tiny_model.config


def test_building_the_empty_model_does_not_import_torch_dynamo_or_sympy() -> None:
    """The meta-device build a load starts with: randn imported sympy, and `scale * tensor`,
    nn.Embedding's normal_ and the causal mask's triu_ torch._dynamo, through meta decompositions
    (1.0-1.6 s of every model load, session 15)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from clipengine.models.config import get_config\n"
        "from clipengine.models.load import _empty_model\n"
        "for name in ('ViT-B-32', 'RN50'):\n"
        "    model = _empty_model(get_config(name))\n"
        "    assert all(p.is_meta for p in model.parameters())\n"
        "leaked = [m for m in ('torch._dynamo', 'sympy') if m in sys.modules]\n"
        "assert not leaked, leaked\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_random_init_on_a_real_device_is_unchanged() -> None:
    """In-place scaling and the token embedding's explicit normal_ draw what they drew before:
    every parameter with CLIP's own init, in the same order from the same seed."""
    from clipengine.models.clip import build_model, causal_mask
    from clipengine.models.config import get_config

    cfg = get_config("ViT-B-32")
    torch.manual_seed(7)
    model = build_model(cfg)
    torch.manual_seed(7)
    width = cfg.vision.width
    torch.nn.Conv2d(3, width, kernel_size=cfg.vision.patch_size, stride=cfg.vision.patch_size, bias=False)
    assert torch.equal(model.visual.class_embedding, width**-0.5 * torch.randn(width))
    token = model.token_embedding.weight.detach()
    assert 0.98 < float(token.std()) < 1.02 and abs(float(token.mean())) < 0.01  # normal_(0, 1), not torch.empty
    assert torch.equal(model.attn_mask, torch.full((77, 77), -1e4).triu(1))
    assert torch.equal(causal_mask(3), torch.tensor([[0.0, -1e4, -1e4], [0.0, 0.0, -1e4], [0.0, 0.0, 0.0]]))
