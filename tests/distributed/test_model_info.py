"""The Ray driver reads the model's preprocessing from its files instead of loading the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import clipengine
from clipengine.cli import model_options
from clipengine.cli.app import app
from clipengine.distributed.model_info import preprocess_config
from clipengine.errors import DownloadNotAllowedError, UnknownModelError
from clipengine.image.preprocess import PreprocessConfig


def test_it_is_what_a_load_gives_for_a_model_folder_and_a_bundled_model(tiny_model_dir: Path) -> None:
    for name in (str(tiny_model_dir), "tiny-synth"):
        assert preprocess_config(name) == clipengine.load(name).preprocess_cfg


def test_an_export_folder_gives_its_manifest_s_preprocessing(tmp_path: Path) -> None:
    cfg = PreprocessConfig(image_size=48, interpolation="bilinear")
    (tmp_path / "manifest.json").write_text(json.dumps({"pretrained": "openai", "preprocess": cfg.to_dict()}))
    assert preprocess_config(tmp_path) == cfg
    assert preprocess_config(tmp_path, "openai") == cfg
    assert preprocess_config(tmp_path, "laion") is None  # other weights: the load's own error says so


def test_registry_errors_are_the_load_s_and_files_only_a_load_reads_give_none(tmp_path: Path) -> None:
    for name in ("ViT-B-32", "no-such-model"):
        with pytest.raises((DownloadNotAllowedError, UnknownModelError)) as ours:
            preprocess_config(name)
        with pytest.raises(type(ours.value)) as theirs:
            clipengine.load(name)
        assert str(ours.value) == str(theirs.value)
    (tmp_path / "c.safetensors").write_bytes(b"x")
    assert preprocess_config(tmp_path / "c.safetensors") is None


@pytest.mark.parametrize(("command", "extra"), [(["embed"], ["--no-progress"]), (["index", "build"], [])])
def test_engine_ray_loads_no_model_on_the_driver(
    command: list[str],
    extra: list[str],
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fakes,
) -> None:  # type: ignore[no-untyped-def]
    """The driver loaded the whole model to read its preprocessing and held it while the actors
    worked (`embed`, then `index build` / `add`, which embed their images first)."""
    import clipengine.distributed.ray as ray_engine
    from clipengine.pipeline.run import RunStats, embed_folder

    def no_load(opts: model_options.ModelOptions) -> None:
        raise AssertionError("the driver loaded the model")

    seen: list[object] = []

    def fake_embed_with_ray(
        items: list[object], out: Path, factory: object, cfg: object, **kw: object
    ) -> RunStats:
        seen.append(cfg)  # embeds here, as the actors would, so that an index gets built
        kw = {k: v for k, v in kw.items() if k not in ("address", "num_actors", "num_gpus")}  # Ray's own
        return embed_folder(items, out, lambda: clipengine.load(str(tiny_model_dir)).backend, cfg, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(model_options, "load_clip", no_load)
    monkeypatch.setattr(ray_engine, "embed_with_ray", fake_embed_with_ray)
    fakes.write_images(tmp_path / "img", 3)
    out = tmp_path / "photos.index"
    args = [*command, str(tmp_path / "img"), "-o", str(out), "--engine", "ray", *extra]
    result = CliRunner().invoke(app, [*args, "--model", str(tiny_model_dir)])
    assert result.exit_code == 0, result.output
    assert seen == [clipengine.load(str(tiny_model_dir)).preprocess_cfg]
    if command[0] == "index":
        assert len(clipengine.Index.load(out).ids) == 3
