"""Config resolution: what wins when a config starts from a saved run (`megacoach train --resume`)."""

from __future__ import annotations

from megacoach.config import Config, PRESETS, build_config, load_config, resume_config


def _saved() -> Config:
    return build_config({"ppo": {"learning_rate": 1e-4, "total_episodes": 128}, "kl": {"target": 4.0},
                         "labels": {"k": 3}, "run": {"seed": 7, "out": "runs/elsewhere"}})


def test_resume_saved_then_file_then_set_then_the_run_folder(tmp_path):
    cfg_file = tmp_path / "fix.yaml"
    cfg_file.write_text("ppo:\n  learning_rate: 2.0e-4\nkl:\n  target: 5.0\n")
    run_dir = tmp_path / "run"
    overrides = [{"ppo": {"learning_rate": 3e-4}}, {"ppo": {"learning_rate": 4e-4}}, {"run": {"out": "runs/other"}}]
    cfg = resume_config(_saved(), run_dir, cfg_file, overrides)
    assert cfg.ppo.learning_rate == 4e-4  # --set beats the file, the last --set wins
    assert cfg.kl.target == 5.0  # the file beats the saved config
    assert cfg.ppo.total_episodes == 128 and cfg.labels.k == 3 and cfg.run.seed == 7  # nothing named: saved
    assert cfg.run.out == str(run_dir)  # a resumed run stays in its folder, whatever --set says


def test_resume_without_changes_is_the_saved_config(tmp_path):
    saved = _saved()
    cfg = resume_config(saved, "runs/elsewhere")
    assert cfg == saved
    assert resume_config(saved.model_dump(mode="json"), "runs/elsewhere") == saved  # a dict works the same


def test_resume_keeps_saved_values_a_preset_would_change(tmp_path):
    saved = build_config({"run": {"seed": 7}})
    cfg = resume_config(saved, tmp_path)
    tiny = PRESETS["tiny"]["ppo"]["total_episodes"]
    assert cfg.ppo.total_episodes == saved.ppo.total_episodes != tiny  # no preset applies on resume


def test_load_config_base_replaces_the_defaults_and_the_preset_applies_on_top():
    cfg = load_config(None, "tiny", [{"run": {"seed": 3}}], base=_saved())
    assert cfg.labels.k == 3 and cfg.kl.target == 4.0  # from the base (tiny names neither)
    assert cfg.ppo.total_episodes == PRESETS["tiny"]["ppo"]["total_episodes"]  # the preset beats the base
    assert cfg.run.seed == 3  # overrides beat both
    assert load_config(None, None, None, base=None) == Config()


def test_nothing_outside_config_uses_the_private_merge():
    from pathlib import Path

    import megacoach

    root = Path(megacoach.__file__).parent
    users = [p.relative_to(root).as_posix() for p in root.rglob("*.py")
             if p != root / "config.py" and "_deep_merge" in p.read_text("utf-8")]
    assert users == []
