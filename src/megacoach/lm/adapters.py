"""LoRA adapters through PEFT: the Apprentice as the base model plus a low-rank adapter, and the original model
as the same base with the adapter switched off, so one copy of the weights serves both.

`add_lora(lm, ...)` injects the adapter into `lm` in place (PEFT's `get_peft_model`; the base weights are frozen)
and returns the PEFT model, which runs, samples and saves like the model it wraps (its `save_pretrained` writes
the adapter only). `add_trunk_lora(trunk, ...)` does the same for a bare trunk (the Values Coach's, `reward.lora_r`). The adapter's B matrices start at zero, so the adapted model computes exactly what the base
computes until the first update: the Coherence Coach's KL is 0 at the start.

`AdapterOff(peft_model)` is the original model for the Coherence Coach, the guards' baseline samples and anything
else that reads the reference: every forward of its trunk (and of the whole model) runs inside PEFT's
`disable_adapter()`. The LM head is never adapted (`lm_head` in the target modules is refused), so the head it
shares with the Apprentice is the original's.

`merge_adapter(base_lm, adapter_dir)` folds a saved adapter into its base: a plain model of the base's family.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from megacoach.errors import ConfigError
from megacoach.lm.hf import PRECISION_ATTR, trunk_of


def _peft(model, r: int, alpha: float, dropout: float, target_modules: list[str] | None, task_type: str | None,
          field: str):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type=task_type,
                        target_modules=list(target_modules) if target_modules else None)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:  # PEFT knows no default for this family, or a module name is not in the model
        raise ConfigError(f"{field}: {err}") from None
    for q in peft_model.parameters():  # what trains is float32 over any base (PEFT upcasts, this makes sure)
        if q.requires_grad and q.is_floating_point() and q.dtype != torch.float32:
            q.data = q.data.float()
    precision = getattr(model, PRECISION_ATTR, None)
    if precision is not None:
        setattr(peft_model, PRECISION_ATTR, precision)  # lm.hf.autocast reads it on the model it is given
    return peft_model


def add_lora(lm, r: int, alpha: float, dropout: float = 0.0, target_modules: list[str] | None = None):
    """`lm` with a LoRA adapter of rank `r` (scaling alpha / r) on `target_modules` (None: PEFT's default for the
    model's family, e.g. GPT-2's `c_attn`, Llama's `q_proj`/`v_proj`). Only the adapter's parameters train."""
    head = lm.get_output_embeddings()
    head_names = {name.split(".")[-1] for name, m in lm.named_modules() if m is head}
    if target_modules and head_names & set(target_modules):
        raise ConfigError(f"ppo.lora_target_modules: {sorted(head_names & set(target_modules))} is the LM head, "
                          "which the Apprentice shares with the original model; adapt the trunk's layers only")
    return _peft(lm, r, alpha, dropout, target_modules, "CAUSAL_LM", "ppo.lora_target_modules")


def add_trunk_lora(trunk, r: int, alpha: float, dropout: float = 0.0, target_modules: list[str] | None = None,
                   field: str = "reward.lora_target_modules"):
    """A bare transformer trunk (no LM head: the Values Coach's) with a LoRA adapter, as `add_lora`; the PEFT model
    runs like the trunk (same arguments and outputs) and its `save_pretrained` writes the adapter only."""
    return _peft(trunk, r, alpha, dropout, target_modules, None, field)


def has_adapter(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class _TrunkAdapterOff(nn.Module):
    def __init__(self, trunk: nn.Module, peft_model):
        super().__init__()
        self.trunk = trunk
        object.__setattr__(self, "_peft", peft_model)  # not a submodule: the view owns no weights of its own

    def forward(self, *args, **kwargs):
        with self._peft.disable_adapter():
            return self.trunk(*args, **kwargs)


class AdapterOff(nn.Module):
    """The original model inside a PEFT model: the same weights, the adapter off in every forward pass."""

    def __init__(self, peft_model):
        super().__init__()
        self.model = peft_model
        self._trunk = _TrunkAdapterOff(trunk_of(peft_model), peft_model)

    @property
    def config(self):
        return self.model.config

    @property
    def _megacoach_precision(self):  # PRECISION_ATTR: the precision of the model it shares
        return getattr(self.model, PRECISION_ATTR, None)

    def get_decoder(self):
        return self._trunk

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)


# ------------------------------------------------------------------------------------------ one base, three roles
COACH_ADAPTER = "values_coach"  # the Values Coach's adapter, beside the Apprentice's ('default') on one base


def _lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


@contextlib.contextmanager
def adapter_active(peft_model, name: str):
    """Every LoRA layer of `peft_model` computes with adapter `name` alone inside this context (a layer without it:
    the base alone), then with what it had before. Which parameters train is left as it was (PEFT's own
    `set_adapter` would change it)."""
    layers = list(_lora_layers(peft_model).values())
    before = [m._active_adapter for m in layers]
    for m in layers:
        m._active_adapter = [name]
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m._active_adapter = b


class SharedTrunk(nn.Module):
    """A trunk that is another model's trunk with one of its adapters switched on in every forward pass: the
    Values Coach on the Apprentice's base (`share_trunk`). Owns no weights (the base and the adapter are the PEFT
    model's), so nothing is counted, moved or cast twice."""

    shares_base = True  # read by RewardModel: the config is the Apprentice's, left as it is

    def __init__(self, peft_model, adapter: str):
        super().__init__()
        object.__setattr__(self, "_peft", peft_model)  # not a submodule
        object.__setattr__(self, "_trunk", trunk_of(peft_model))
        self.adapter = adapter

    @property
    def config(self):
        return self._trunk.config

    def forward(self, *args, **kwargs):
        training = self._trunk.training  # the Values Coach scores without dropout, whatever the Apprentice is doing
        self._trunk.eval()
        try:
            with adapter_active(self._peft, self.adapter):
                return self._trunk(*args, **kwargs)
        finally:
            self._trunk.train(training)

    def save_pretrained(self, *args, **kwargs):
        raise ConfigError("a Values Coach on the Apprentice's shared base is saved where it was trained "
                          "(RUN_DIR/values_coach); this view of it has no files of its own")


def _base_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """A trunk's weights other than LoRA's, by the name they have without PEFT's wrapping."""
    return {n.replace(".base_layer", ""): p for n, p in module.named_parameters(remove_duplicate=False)
            if "lora_" not in n}


def _same_base(own: dict, shared: dict, embeddings: str | None, pad_id: int | None) -> bool:
    """Whether two trunks' base weights are equal, the pad token's input-embedding row aside: a run's tokenizer may
    add a pad token, whose new row each load initialises at random, and that row never reaches a score (pad positions
    are masked out of attention and never read)."""
    if own.keys() != shared.keys():
        return False
    for k, a in own.items():
        b = shared[k]
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return False
        if k == embeddings and pad_id is not None and 0 <= pad_id < a.shape[0]:
            keep = torch.arange(a.shape[0], device=a.device) != pad_id
            a, b = a[keep], b[keep]
        if not torch.equal(a, b):
            return False
    return True


def share_trunk(peft_lm, coach_trunk, adapter: str = COACH_ADAPTER, pad_id: int | None = None) -> SharedTrunk | None:
    """The Values Coach's LoRA trunk `coach_trunk` (a PEFT model over a bare trunk: `add_trunk_lora`) as an adapter
    of the Apprentice's PEFT model `peft_lm`, over its base: returns the trunk to score with (`SharedTrunk`), or None
    where the two bases are not the same weights (another model, precision or device; the pad token's embedding row
    `pad_id` aside: `_same_base`), which then stay apart.
    The coach's adapter is copied in frozen; the Apprentice's adapter still trains, and the original model (all
    adapters off) is unchanged. The same scores as the separate trunk, exactly: same weights, same computation."""

    base = coach_trunk.base_model.model
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    emb_name = next((n.replace(".base_layer", "") for n, m in base.named_modules() if m is emb), None)
    if not _same_base(_base_weights(base), _base_weights(trunk_of(peft_lm)),
                      None if emb_name is None else f"{emb_name}.weight".lstrip("."), pad_id):
        return None
    conf = coach_trunk.peft_config["default"]
    weights = {}
    for name, m in _lora_layers(coach_trunk.base_model.model).items():
        weights[name] = (m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"])
    return join_adapter(peft_lm, weights, conf.r, conf.lora_alpha, conf.lora_dropout, adapter)


def join_adapter(peft_lm, weights: dict, r: int, alpha: float, dropout: float,
                 adapter: str = COACH_ADAPTER) -> SharedTrunk | None:
    """Add a LoRA adapter to the Apprentice's PEFT model `peft_lm`, frozen, from `weights` (trunk layer name ->
    (A, B, scaling)), and return the trunk that scores through it (`SharedTrunk`); None (nothing added) where the
    adapter's layers are not exactly the layers its target names select in this trunk."""
    from peft import LoraConfig

    peft_lm.add_adapter(adapter, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                                            target_modules=sorted({n.split(".")[-1] for n in weights})))
    layers = _lora_layers(trunk_of(peft_lm))
    with torch.no_grad():
        for name, (a, b, scaling) in weights.items():
            dst = layers.get(name)
            if dst is None or adapter not in dst.lora_A or dst.lora_A[adapter].weight.shape != a.shape \
                    or dst.lora_B[adapter].weight.shape != b.shape:
                peft_lm.delete_adapter(adapter)
                return None
            dst.lora_A[adapter].weight.copy_(a)
            dst.lora_B[adapter].weight.copy_(b)
            dst.scaling[adapter] = scaling
        extra = [n for n, m in layers.items() if adapter in m.lora_A and n not in weights]
        if extra:  # the coach's target names matched more modules here than it adapted: not the same function
            peft_lm.delete_adapter(adapter)
            return None
    for n, q in peft_lm.named_parameters():
        if f".{adapter}." in n:
            q.requires_grad_(False)  # the Values Coach does not train in PPO
    return SharedTrunk(peft_lm, adapter)


def saved_adapter_weights(path: str | Path) -> tuple[dict, dict, dict] | None:
    """A LoRA adapter saved over a bare trunk (a Values Coach's `save_pretrained`), read without loading any base:
    (its adapter_config.json, trunk layer name -> (A, B, scaling), base weights saved beside the adapter by trunk
    name: PEFT saves the input embeddings when a pad token was added to them); None where the files hold an adapter
    that computes otherwise than a plain LoRA (biases, DoRA, rsLoRA, per-layer ranks, modules to save, ...)."""
    import json

    from safetensors.torch import load_file

    p = Path(path)
    conf = json.loads((p / "adapter_config.json").read_text("utf-8"))
    if conf.get("peft_type") != "LORA" or conf.get("bias", "none") != "none" or any(
            conf.get(k) for k in ("use_rslora", "use_dora", "lora_bias", "modules_to_save", "rank_pattern",
                                  "alpha_pattern", "layer_replication", "alora_invocation_tokens")):
        return None
    tensors = load_file(str(p / "adapter_model.safetensors"))
    prefix, pairs, base = "base_model.model.", {}, {}
    for key, t in tensors.items():
        if not key.startswith(prefix):
            return None
        if key.endswith((".lora_A.weight", ".lora_B.weight")):
            layer, part, _ = key[len(prefix):].rsplit(".", 2)
            pairs.setdefault(layer, {})[part] = t
        elif "lora_" in key:
            return None
        else:
            base[key[len(prefix):]] = t
    scaling = float(conf["lora_alpha"]) / int(conf["r"])
    if not pairs or any(set(v) != {"lora_A", "lora_B"} for v in pairs.values()):
        return None
    return conf, {n: (v["lora_A"], v["lora_B"], scaling) for n, v in pairs.items()}, base


def base_holds(peft_lm, saved_base: dict, pad_id: int | None = None) -> bool:
    """Whether the base weights an adapter file carries (`saved_adapter_weights`) are the Apprentice's own, the pad
    token's input-embedding row aside (`_same_base`)."""
    if not saved_base:
        return True
    trunk = trunk_of(peft_lm)
    own = _base_weights(trunk)
    emb = trunk.get_input_embeddings() if hasattr(trunk, "get_input_embeddings") else None
    emb_name = next((f"{n.replace('.base_layer', '')}.weight".lstrip(".") for n, m in trunk.named_modules()
                     if m is emb), None)
    if not set(saved_base) <= set(own):
        return False
    return _same_base({k: own[k] for k in saved_base}, saved_base, emb_name, pad_id)


def save_own_adapter(lm, out: str | Path) -> None:
    """Save the Apprentice: a plain model whole; a PEFT model's own adapter only ('default', not a Values Coach's
    adapter sharing its base)."""
    if has_adapter(lm):
        lm.save_pretrained(out, selected_adapters=["default"])
    else:
        lm.save_pretrained(out)


def merge_adapter(base_lm, adapter_dir: str | Path):
    """The base model with the adapter saved in `adapter_dir` folded into its weights (a plain model)."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter_dir}: no LoRA adapter here (expected adapter_config.json)")
    return PeftModel.from_pretrained(base_lm, str(adapter_dir)).merge_and_unload()


def export_merged(base_name_or_path: str, adapter_dir: str | Path, out: str | Path) -> Path:
    """Write the base model with the adapter of `adapter_dir` merged in, and the tokenizer saved beside the adapter
    (else the base's), to `out` as a plain Hugging Face model (float32). Returns `out`."""
    from megacoach.lm.loading import load_causal_lm, load_tokenizer

    adapter_dir, out = Path(adapter_dir), Path(out)
    base, tok = load_causal_lm(base_name_or_path, fused_activation=False)
    merged = merge_adapter(base, adapter_dir)
    if (adapter_dir / "tokenizer_config.json").is_file():
        tok = load_tokenizer(str(adapter_dir))
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tok.save_pretrained(out)
    return out
