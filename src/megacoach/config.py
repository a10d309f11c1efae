"""Typed, validated configuration for every megacoach run.

Every field has a documented default. Where megacoach's built-in default differs from the paper
(Ziegler et al. 2019, ORIG = openai/lm-human-preferences), the field's description gives the paper's value,
and the preset `paper-sentiment` restores it (`--preset paper-sentiment`).

Load from YAML or TOML (`--config run.yaml`); override any field from the CLI with a dotted path
(`--set ppo.learning_rate=3e-5`) or the dedicated flags; the resolved config is saved beside every run's outputs.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from megacoach.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """The base model: the Apprentice starts as an exact copy; the Values Coach and the Coherence Coach's
    reference are made from it too."""

    name_or_path: str = Field("builtin", description="'builtin' (the shipped Shakespeare GPT-2), a local "
                              "Hugging Face model folder, or a hub name such as 'gpt2' where a hub is reachable.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="The older way to set the weights' dtype of every model (bfloat16 = model.precision "
        "bf16, float16 = fp16), used while model.precision is 'auto'. Default float32 (then model.precision decides).")
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = Field(
        "auto", description="The Apprentice's numeric precision. 'fp32'; 'bf16-mixed': float32 master weights and "
        "optimiser state, bf16 autocast for the forward passes, log-probs, KL, values, advantages and losses in "
        "float32; 'bf16': bfloat16 weights, for a frozen base under a LoRA adapter (ppo.lora_r; without LoRA it is "
        "refused: use bf16-mixed). Default 'auto': fp32 on the CPU, "
        "bf16-mixed on a GPU with bfloat16 (fp32 on one without). The run says which at start and in "
        "RUN_DIR/precision.json.")
    reference_precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = Field(
        "auto", description="The original model's (the Coherence Coach's frozen reference) precision; it only infers, "
        "so 'bf16' halves its memory. Default 'auto': the Apprentice's.")
    tf32: bool = Field(True, description="TF32 matmuls for float32 work on GPUs that have them (NVIDIA Ampere and "
                       "later). No effect on the CPU. Default true.")
    static_cache: bool = Field(True, description="Sample into a preallocated KV cache (transformers' StaticCache) "
                               "where the model's attention allows one, instead of a cache that grows by concatenation "
                               "(which copies the whole cache at every token). The same samples up to float rounding.")
    fused_activation: bool = Field(True, description="Run GPT-2's tanh-GELU as PyTorch's fused kernel (same formula, "
                                   "equal up to float rounding). False: the model's own Python implementation.")


class TaskConfig(_Section):
    """Query/response settings: the paper's book-style (sentiment, descriptiveness) task."""

    query_source: str = Field("builtin", description="'builtin' (excerpts of the held-in Shakespeare plays), "
                              "'builtin:instructions' (320 short instructions shipped with megacoach, for chat models), a "
                              ".txt file (one query per line), a .jsonl file (field 'text'), or 'hf:NAME[:SPLIT[:FIELD]]'.")
    query_length: int = Field(64, ge=1, description="Query tokens (left-padded with the pad token). Paper: 64.")
    query_min_tokens: int = Field(24, ge=1, description="Built-in excerpts are at least this many tokens.")
    response_length: int = Field(24, ge=1, description="Sampled response tokens: exactly this many (the paper), or at "
                                 "most this many with task.stop / task.stop_at_eos. Paper: 24.")
    temperature: float = Field(0.7, gt=0, description="Logits are divided by this before sampling. Paper: 0.7.")
    truncate_token: str | None = Field(".", description="Text is cut after the first occurrence of this token "
                                       "(kept), after `truncate_after`. None: no truncation. Paper: '.'. With task.stop "
                                       "or task.stop_at_eos it is one more place where a response ends (set it to null "
                                       "to end responses only at the stops).")
    truncate_after: int = Field(16, ge=0, description="The truncate token counts only at response positions >= this. "
                                "Paper: 16. (The stops of task.stop and task.stop_at_eos count anywhere.)")
    penalty_reward: float = Field(-1.0, description="Score given instead of the Values Coach's to an invalid response: "
                                  "one without the truncate token; with task.stop / task.stop_at_eos, one that did not "
                                  "stop within task.response_length tokens. Paper: -1.")
    chat_template: bool = Field(False, description="Format each query with the tokenizer's chat template (one user "
                                "message, after task.system_prompt if set), the generation prompt appended, for instruct "
                                "models. The tokenizer must have a chat template. Default false: queries are plain text "
                                "(the paper).")
    system_prompt: str | None = Field(None, description="A system message before each query (needs "
                                      "task.chat_template). Default none.")
    stop: list[str] | None = Field(None, description="Stop strings: a response ends at the first token that completes "
                                   "one of them (kept in the response); the tokens after it are padding, masked out "
                                   "of every log-prob, value, KL, advantage and loss. Sampling ends early once every "
                                   "response of a batch has stopped; task.response_length is then the maximum. Default "
                                   "none (the paper: fixed-length responses).")
    stop_at_eos: bool = Field(False, description="End a response at the tokenizer's end-of-sequence token (kept, as "
                              "the stop strings are). Default false (the paper: the built-in model's responses are "
                              "exactly task.response_length tokens).")

    @property
    def early_stop(self) -> bool:
        """Whether responses end at stops (task.stop, task.stop_at_eos) instead of being fixed-length."""
        return bool(self.stop) or self.stop_at_eos

    @model_validator(mode="after")
    def _check(self):
        if self.system_prompt is not None and not self.chat_template:
            raise ValueError("task.system_prompt needs task.chat_template=true (the system message is part of the "
                             "chat template)")
        if self.stop is not None and not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("task.stop: expected a list of non-empty strings")
        return self


class LabelsConfig(_Section):
    """Human evaluators and mock labelers, and the durable label store."""

    db: str | None = Field(None, description="SQLAlchemy URL of the label store. None: sqlite file labels.db in the "
                           "run folder.")
    labeler: str = Field("vader", description="Who labels the initial comparisons: a mock labeler standing in for "
                         "people ('vader', 'vader:invert', 'vader:noise=0.7', 'package.module:callable'), or 'people' "
                         "(the human evaluators, through `megacoach label serve`; no mock score is then logged).")
    num_comparisons: int = Field(4000, ge=0, description="Comparisons collected from the initial policy before "
                                 "the Values Coach is trained (offline variant). Paper: ~5,000. With the built-in "
                                 "model, 4,000 labels seen once teach the Values Coach more than 2,000 seen twice in "
                                 "the same training time (held-out best-of-4 accuracy 61.6% vs 58.8%).")
    k: int = Field(4, ge=2, description="Continuations per comparison (best of K). Paper: 4.")
    valid_fraction: float = Field(0.1, ge=0, lt=1, description="Share of comparisons held out for validation.")
    guideline_version: str = Field("v1", description="Guideline version stored with every label.")
    sample_batch_size: int = Field(128, ge=1, description="Continuations per sampling call while the initial "
                                   "comparisons are collected (queries x k). The built-in model on 2 cores samples "
                                   "fastest at 128-256 (docs/benchmarks.md).")


class TermExample(_Section):
    """One example of what a reward term should prefer: for `query`, `better` over `worse`."""

    query: str = Field("", description="The query (prompt) text; may be empty.")
    better: str = Field(..., description="A response the term must score higher (after its weight).")
    worse: str = Field(..., description="A response the term must score lower (after its weight).")


class RewardTerm(_Section):
    """A reward term added to the Values Coach's score: `weight * scorer(query text, response text)` for each valid
    response (megacoach/reward/terms.py). Its examples prove its direction at the preflight."""

    name: str = Field(..., min_length=1, description="The term's name (metrics guard/term/<name>, preflight messages).")
    scorer: str = Field(..., min_length=1, description="'length' (the response's characters), 'words' (its words), "
                        "'regex:<pattern>' (1 where the response matches, else 0), or 'module:function' (a callable "
                        "(query: str, response: str) -> float).")
    weight: float = Field(..., description="Multiplies the scorer's value; negative for a penalty (a length penalty: "
                          "scorer 'length', weight -0.01).")
    examples: list[TermExample] = Field(..., min_length=1, description="What the term should prefer: the preflight "
                                        "refuses a term that does not score every `better` above its `worse` "
                                        "(after the weight), alone and through PPO's push.")


class RewardConfig(_Section):
    """The Values Coach: base LM + scalar head, trained on best-of-K comparisons."""

    model: str | None = Field(None, description="The Values Coach's base model ('builtin', a local Hugging Face "
                              "model folder, or a hub name); None (default): the Apprentice's (model.name_or_path). "
                              "With a tokenizer other than the Apprentice's it scores the text: query and truncated "
                              "response decoded by the Apprentice's tokenizer and tokenized again with its own.")
    learning_rate: float = Field(3e-4, gt=0, description="Adam learning rate, decayed linearly to 0. Paper: 5e-5 "
                                 "(GPT-2 124M); the built-in 5M model learns far less in one epoch at that rate "
                                 "(held-out best-of-4 accuracy 38% vs 54% at 3e-4 on 1,800 VADER comparisons).")
    batch_size: int = Field(8, ge=1, description="Comparisons per step. Paper: 32 (the `paper-sentiment` preset); "
                            "the built-in model learns more from 2,000 labels in smaller steps (held-out best-of-4 "
                            "accuracy 56% at 8 vs 54% at 32, one epoch; benchmarks/reward_accuracy.py).")
    epochs: int = Field(1, ge=1, description="Passes over the labels. Paper: 1. On the built-in model 2 passes "
                        "gain ~3 points of held-out best-of-4 accuracy on 2,000 VADER comparisons (59% vs 56%; "
                        "3 passes: 59%, overfitting), but twice the labels seen once gain as much for the same "
                        "training time (see labels.num_comparisons).")
    adam_eps: float = Field(1e-5, gt=0, description="Adam epsilon. Paper: 1e-5.")
    normalize_samples: int = Field(256, ge=16, description="Initial-policy samples used to set gain and bias so "
                                   "rewards have mean 0, std 1 (before and after training).")
    path: str | None = Field(None, description="Use an already trained Values Coach from this folder instead of "
                             "training one.")
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = Field(
        "auto", description="The Values Coach's precision while PPO uses it (model.precision lists them); 'bf16' "
        "keeps bfloat16 weights for scoring and trains (first and online retrains) in bf16-mixed. Default 'auto': "
        "the Apprentice's.")
    lora_r: int = Field(0, ge=0, description="Rank of a LoRA adapter (through PEFT) on the Values Coach's trunk; 0 "
                        "(default): off, every weight of the Values Coach trains (the paper). With LoRA only the adapter "
                        "and the scalar head train, and a saved Values Coach holds the adapter and the head (its base "
                        "is loaded from where it was trained from).")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator of the Values Coach's adapter: its "
                              "update is scaled by lora_alpha / lora_r.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the Values Coach's adapter input while it "
                                "trains (the paper's Values Coach has no dropout).")
    lora_target_modules: list[str] | None = Field(
        None, description="Modules of the Values Coach's trunk that get an adapter (e.g. ['q_proj', 'v_proj']); None: "
        "PEFT's default for the family (GPT-2: c_attn; Llama, Mistral, Qwen2: q_proj and v_proj).")
    terms: list[RewardTerm] = Field(default_factory=list, description="Reward terms beyond the Values Coach (a "
                                    "length penalty, a format rule, another scorer): each valid response's episode "
                                    "score is the Values Coach's score plus the sum of weight * scorer; each term's "
                                    "direction is proved on its examples at the preflight. Default: none (the paper).")

    @field_validator("terms")
    @classmethod
    def _unique_term_names(cls, v):
        names = [t.name for t in v]
        if len(set(names)) != len(names):
            raise ValueError(f"reward.terms: term names must be unique (got {names})")
        return v


class KLConfig(_Section):
    """The Coherence Coach: the KL penalty to the frozen original model."""

    adaptive: bool = Field(True, description="Adaptive (style tasks) or fixed coefficient. Paper style: adaptive.")
    init_kl_coef: float = Field(0.2, ge=0, description="beta at start (the fixed value if not adaptive). Paper: 0.15 "
                                "(the `paper-sentiment` preset). The built-in run is 48 iterations: from 0.15 the "
                                "controller lowered beta to 0.11 while the KL was still below target, and the KL then "
                                "overshot to 7.4 nats (target 6) before beta caught up; from 0.2 it ended at 6.0-6.9 over 10 seeds.")
    target: float = Field(6.0, description="Adaptive target KL in nats per response. Paper: 6.")
    horizon: int = Field(1000, description="Adaptive horizon in episodes. Paper: 10,000 — with runs this short beta "
                         "would hardly move, so the built-in default is 1,000.")

    @model_validator(mode="after")
    def _check(self):
        if self.adaptive and self.target <= 0:
            raise ValueError("kl.target must be > 0 for the adaptive controller")
        if self.adaptive and self.horizon <= 0:
            raise ValueError("kl.horizon must be > 0 for the adaptive controller")
        return self


class PPOConfig(_Section):
    """The Apprentice's training by PPO, as ORIG/DET do it."""

    total_episodes: int = Field(3072, ge=1, description="Episodes (query+response) to train on. Paper: 1M.")
    batch_size: int = Field(64, ge=1, description="Episodes per rollout batch. Paper: 512.")
    mini_batch_size: int = Field(16, ge=1, description="Episodes per optimiser step. Paper: 512 (1 minibatch).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per minibatch step.")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each rollout batch. Paper: 4.")
    learning_rate: float = Field(3e-5, gt=0, description="Decays linearly to 0 over the run. Paper: 1e-5 (1M "
                                 "episodes). The built-in run (3,072 episodes) at 5e-5 rose faster but overshot the KL "
                                 "target (8-10 nats vs 6, with kl.horizon 1,000 or 500); at 1e-4, 11 nats.")
    lr_decay: bool = Field(True, description="Linear learning-rate decay to 0. Paper: yes.")
    optimizer: Literal["adam", "tf_adam"] = Field("adam", description="'tf_adam' = TF1-style Adam (DET) whose "
                                                  "epsilon is not bias-corrected.")
    adam_eps: float = Field(1e-5, gt=0, description="Adam epsilon. DET: 1e-5.")
    fused_optimizer: bool = Field(True, description="Update every parameter in one call: torch's fused Adam "
                                  "('adam'), the multi-tensor (foreach) form of 'tf_adam'. The same update up to float "
                                  "rounding. False: one parameter at a time (torch's default on the CPU).")
    fused_head: bool = Field(True, description="The update's response head (LM head, temperature, one log-softmax, "
                             "the sampled tokens' log-probs and the entropy) as one pass with its own gradient "
                             "(megacoach/ppo/policy.py): the logits are made in chunks of rows and only the "
                             "softmax is kept for the backward pass, so no compiler is needed. For heads that are a "
                             "scaled float32 linear map (GPT-2, Llama, Qwen, Granite, ...); others (softcapped Gemma-2, "
                             "bf16 heads) keep autograd's head, which run.compile compiles. The same numbers up to "
                             "float rounding. The original model's log-probs in the rollout are made the same way (in chunks, without "
                             "gradient). Default true.")
    cliprange: float = Field(0.2, gt=0, description="Policy ratio clip. Paper: 0.2.")
    cliprange_value: float = Field(0.2, gt=0, description="Value clip. Paper: 0.2.")
    vf_coef: float = Field(0.1, ge=0, description="Value loss coefficient. Paper: 0.1.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount. Paper: 1.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda. Paper: 0.95.")
    whiten_rewards: bool = Field(True, description="Scale the rewards (mean kept) once over the whole "
                                "rollout batch, before GAE; the advantages are whitened over the whole batch too. "
                                "Paper: yes, per minibatch (the same with its one minibatch per batch).")
    separate_value_model: bool = Field(False, description="False: value head on the policy's trunk (ORIG). "
                                       "True: a separate value network.")
    forward_batch_size: int | None = Field(
        None, ge=1, description="Rows per forward pass when a rollout is scored (Values Coach, original model, and the "
        "'forward' rollout pass); None = ppo.mini_batch_size. Only peak memory changes: each row is computed alone.")
    rollout_pass: Literal["auto", "sampling", "forward"] = Field(
        "auto", description="Where the old log-probs and values come from. 'sampling': kept from the KV-cached "
        "sampling pass (no second forward of the Apprentice; equal up to float rounding in fp32). 'forward': "
        "recomputed in a separate full forward pass (the straightforward path, as ORIG), the same forward the update "
        "runs. Default 'auto': 'sampling' for an fp32 Apprentice, 'forward' in any other precision (in bf16 the "
        "decode and the full forward round differently: the PPO ratio would not start at 1; docs/hardware.md).")
    lora_r: int = Field(0, ge=0, description="Rank of a LoRA adapter (through PEFT) on the Apprentice; 0 (default): "
                        "off, every weight trains (the paper). With LoRA only the adapter and the value head train, and "
                        "the original model is the same base with the adapter switched off (one copy of the weights; "
                        "the original model then runs in the Apprentice's precision). RUN_DIR/apprentice holds the "
                        "adapter; `megacoach export-merged` writes the merged model.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator: the adapter's update is scaled by "
                              "lora_alpha / lora_r.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input during PPO updates "
                                "(0: the updates see the same function the rollout sampled from).")
    lora_target_modules: list[str] | None = Field(
        None, description="Names of the modules that get an adapter (e.g. ['q_proj', 'v_proj']); None: PEFT's default "
        "for the model's family (GPT-2: c_attn; Llama, Mistral, Qwen2: q_proj and v_proj). The LM head is refused: "
        "the Apprentice shares it with the original model.")
    gradient_checkpointing: bool = Field(False, description="Recompute the Apprentice's layer activations in the "
                                         "backward pass instead of keeping them (transformers' gradient checkpointing): "
                                         "less memory in the PPO update for about one more forward pass of compute. "
                                         "The same gradients. Default false.")
    checkpoint_recompute: Literal["all", "pointwise"] = Field(
        "all", description="With ppo.gradient_checkpointing, what a layer runs again in the backward pass: 'all' "
        "(default: every op, one more forward pass of the trunk) or 'pointwise' (the matmuls' and attention's "
        "outputs are kept; only LayerNorms, activations, residual adds and reshapes run again). Measured with "
        "benchmarks/ppo_iteration.py at size 2: peak RSS 1144-1150 MiB and 6.7-7.1 s per iteration without "
        "checkpointing, 1087-1125 MiB and 7.1-7.2 s pointwise, 1087 MiB and 7.9 s all. The same gradients.")

    @model_validator(mode="after")
    def _check(self):
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"ppo.batch_size ({self.batch_size}) must be a multiple of ppo.mini_batch_size "
                             f"({self.mini_batch_size})")
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ValueError(f"ppo.mini_batch_size ({self.mini_batch_size}) must be a multiple of "
                             f"ppo.gradient_accumulation_steps ({self.gradient_accumulation_steps})")
        if self.lora_r and self.separate_value_model:
            raise ValueError("ppo.lora_r with ppo.separate_value_model: a LoRA Apprentice keeps its value head on the "
                             "shared trunk (set one of them off)")
        return self


class GuardsConfig(_Section):
    """Guards against the section 4.4 incident (megacoach/guards/): preflight, a check of every batch before
    its update, live monitors, the Andon cord. Halting monitors test at (1 - confidence) / (8 monitors x
    planned iterations) each, so a clean run halts by chance with probability below 1 - confidence."""

    enabled: bool = Field(True, description="Run the guards (preflight, batch check, live monitors).")
    preflight: bool = Field(True, description="Run the preflight before the first update, on resume and after "
                            "every Values Coach (re)load. Switch off only to watch the live monitors work alone.")
    batch_check: bool = Field(True, description="Before every PPO update, check that the actual loss pushes the batch "
                              "up where the Values Coach scores high and down where the KL is high (halts if flipped).")
    confidence: float = Field(0.99, gt=0.5, lt=1, description="Preflight: each direction check must beat chance at "
                              "this confidence. Live monitors: a clean run's probability of a false halt, over all "
                              "monitors and iterations together, stays below 1 - confidence.")
    preflight_comparisons: int = Field(256, ge=1, description="At most this many held-out (split 'valid') labeled "
                                       "comparisons, the most recent, are put through the reward path.")
    min_heldout: int = Field(8, ge=1, description="Fewer held-out comparisons than this (or than the confidence "
                             "needs) refuse training: the direction cannot be checked.")
    probe_queries: int = Field(32, ge=2, description="Training queries for the KL-direction and optimiser-step probes "
                               "(the optimiser probe updates on twice as many responses).")
    require_coherence_coach: bool = Field(True, description="Refuse β = 0 (no KL penalty). False allows it: the KL "
                                          "check then only requires the KL term not to reward leaving the original model.")
    canaries: str = Field("builtin", description="Canary prompts with known good and bad continuations: 'builtin' "
                          "(Shakespeare sentiment), 'none', or a JSONL file of {prompt, good, bad}.")
    baseline_samples: int = Field(512, ge=8, description="Samples of the initial policy (the frozen original model) "
                                  "that the live monitors compare the current Apprentice with.")
    kl_budget: float = Field(25.0, gt=0, description="Halt when the KL to the original model exceeds this (nats per "
                             "response, batch mean); warn at 80%.")
    divergence_window: int = Field(4, ge=2, description="Window (iterations) of the live monitors; the divergence "
                                   "alarm looks at trends over twice as many.")
    fresh_labels_per_iteration: int = Field(8, ge=0, description="Fresh comparisons per iteration: ceil(K/2) samples "
                                            "of the current Apprentice and the rest from the initial policy, same "
                                            "query, labeled through the store (split 'valid'). 0: no fresh labels.")
    agreement_floor: float = Field(0.5, gt=0, lt=1, description="Halt when the Values Coach's pairwise agreement with "
                                   "fresh labels is confidently below this (0.5 = chance).")
    winrate_floor: float | None = Field(None, gt=0, lt=1, description="Halt when the labelers pick a current sample "
                                        "confidently less often than this. None: the no-change rate (ceil(K/2)/K).")
    min_evidence: int = Field(24, ge=1, description="Judgements (fresh labels, or scored samples) needed before a "
                              "labeler-based monitor may halt.")
    rollout_check: bool = Field(True, description="Before the first optimiser step of every update (and in the "
                                "preflight), compare the trainer's log-probs of the first minibatch's tokens with the "
                                "rollout's own (PPO's ratio is 1 there by construction); beyond float rounding at the "
                                "Apprentice's precision, halt before the step and name what differs.")
    rollout_tolerance: float = Field(1.0, gt=0, description="Scale of that check's tolerance (1 = what float rounding "
                                     "allows at the Apprentice's precision; raise it for a generation engine whose "
                                     "kernels round differently from the trainer's).")


class OnlineConfig(_Section):
    """Online labeling (`megacoach train --online`): current-policy samples go to the human evaluators (the
    labeling app, mock labelers, or both) while PPO runs, and the Values Coach is retrained on all labels so far."""

    enabled: bool = Field(False, description="Collect labels on current-policy samples during training.")
    mode: Literal["online", "batched"] = Field("online", description="'online': PPO continues while people label and "
                                               "the Values Coach retrains in the background; 'batched': collect a batch, "
                                               "wait for its labels, retrain, continue (the paper's later advice).")
    collect_every: int = Field(4, ge=1, description="Iterations between batches of items put in the store.")
    items_per_batch: int = Field(32, ge=1, description="Items (a query and K current-policy continuations) per batch.")
    retrain_every_labels: int = Field(64, ge=1, description="Retrain the Values Coach (fresh head, all labels so far) "
                                      "after this many new labels. The paper retrains about 20 times per run.")
    mock_labeler: str | None = Field("vader", description="A mock labeler that also labels every online item "
                                     "(labels.labeler syntax); None: people only, through `megacoach label serve`.")
    min_initial_labels: int = Field(16, ge=1, description="With people only: labels to wait for before the first "
                                    "Values Coach is trained.")
    wait_timeout_s: float = Field(3600.0, gt=0, description="Batched mode / first labels: how long to wait for people "
                                  "before giving up with a clear message (the run is checkpointed, resumable).")


class RunConfig(_Section):
    """Where and how: seeds, threads, logging, checkpoints."""

    out: str = Field("runs/latest", description="Run folder: config, metrics, checkpoints, report.")
    seed: int = Field(1, description="Seed for torch, numpy and python.")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="Where every model runs: 'auto' (this process's GPU where there is one — under "
                        "accelerate launch / torchrun each process takes its local GPU — else the CPU), 'cpu', "
                        "'cuda' or 'cuda:N'. Default 'auto'.")
    threads: int = Field(2, ge=1, description="torch intra-op threads.")
    compile: bool = Field(True, description="Compile the PPO update's response head (LM head, temperature, "
                          "log-softmax, log-probs and entropy) with torch.compile where ppo.fused_head does not serve "
                          "it (a softcapped or bf16 head, or ppo.fused_head=false). Inductor needs a C++ compiler; "
                          "without one the run says so and stays eager. Compile time (seconds, once per process; "
                          "Inductor caches kernels on disk) is paid in the first update. Default true; the `tiny` "
                          "preset turns it off (its updates are too small to repay the compile).")
    mmap_threshold_mib: float | None = Field(
        None, gt=0, le=32, description="Trade speed for memory: allocations of at least this many MiB are served by "
        "mmap and given back to the system when freed (glibc mallopt; megacoach/memory.py). None (default): the C "
        "allocator's own behaviour. Measured at the benchmark's size 2: 1 MiB cuts peak RSS 1222 -> 1034 MiB but "
        "makes an iteration 49% slower (10.7 -> 15.9 s: every large tensor is page-faulted in afresh).")
    checkpoint_every: int = Field(10, ge=1, description="Iterations between checkpoints (and at the end).")
    sample_table_every: int = Field(5, ge=1, description="Iterations between logged sample tables.")
    eval_queries: int = Field(200, ge=1, description="Held-out queries for the before/after comparison.")
    wandb: bool = Field(False, description="Also log to Weights & Biases (if installed).")
    max_iterations: int | None = Field(None, ge=1, description="Stop after this many PPO iterations (for tests).")


class Config(_Section):
    """A whole megacoach run."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    labels: LabelsConfig = Field(default_factory=LabelsConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    kl: KLConfig = Field(default_factory=KLConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    guards: GuardsConfig = Field(default_factory=GuardsConfig)
    online: OnlineConfig = Field(default_factory=OnlineConfig)
    run: RunConfig = Field(default_factory=RunConfig)


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's book-style sentiment task exactly (ORIG / DET launch settings).
    "paper-sentiment": {
        "task": {"query_length": 64, "response_length": 24, "temperature": 0.7, "truncate_token": ".",
                 "truncate_after": 16, "penalty_reward": -1.0},
        "labels": {"num_comparisons": 5000, "k": 4},
        "reward": {"learning_rate": 5e-5, "batch_size": 32, "epochs": 1},
        "kl": {"adaptive": True, "init_kl_coef": 0.15, "target": 6.0, "horizon": 10000},
        "ppo": {"total_episodes": 1_000_000, "batch_size": 512, "mini_batch_size": 512, "ppo_epochs": 4,
                "learning_rate": 1e-5, "optimizer": "tf_adam"},
    },
    # A tiny run for tests and smoke checks.
    "tiny": {
        "task": {"query_length": 24, "response_length": 8, "truncate_after": 2, "query_min_tokens": 4},
        "labels": {"num_comparisons": 16},
        "reward": {"batch_size": 4, "epochs": 1, "normalize_samples": 16},
        "ppo": {"total_episodes": 16, "batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1},
        "run": {"eval_queries": 4, "checkpoint_every": 1, "compile": False},
        # random tiny models cannot pass the preflight (their Values Coach agrees with nobody): tests that
        # exercise the guards switch them on with a Values Coach built to agree with the labels
        "guards": {"enabled": False, "fresh_labels_per_iteration": 2, "min_evidence": 4, "probe_queries": 8,
                   "baseline_samples": 16, "preflight_comparisons": 64},
    },
    # The paper's sentiment task on a real pretrained model: SmolLM2-135M-Instruct (`megacoach model get
    # smollm2-135m-instruct`; GPT-2-small's scale), plain continuation, VADER as the mock labeler, sized for 2 CPU
    # cores. Every field it sets, and why, is in docs/commands.md#presets.
    "smollm2-sentiment": {
        "model": {"name_or_path": "smollm2-135m-instruct"},
        "task": {"query_source": "builtin", "chat_template": False, "query_length": 64, "query_min_tokens": 24,
                 "response_length": 24, "temperature": 0.7, "truncate_token": ".", "truncate_after": 16,
                 "penalty_reward": -1.0},
        "labels": {"labeler": "vader", "num_comparisons": 1000, "k": 4, "sample_batch_size": 64,
                   "guideline_version": "sentiment-v1"},
        "reward": {"learning_rate": 5e-5, "batch_size": 8, "epochs": 1, "normalize_samples": 128},
        "kl": {"adaptive": True, "init_kl_coef": 0.15, "target": 6.0, "horizon": 1000},
        "ppo": {"total_episodes": 384, "batch_size": 16, "mini_batch_size": 4, "ppo_epochs": 4,
                "learning_rate": 1e-5},
        "guards": {"baseline_samples": 64, "probe_queries": 16, "preflight_comparisons": 128},
        "run": {"eval_queries": 200, "checkpoint_every": 4},
    },
    # An instruct model answering short instructions in its chat template, responses ending at <|im_end|>, LoRA on
    # the Apprentice and on the Values Coach, the guards on. Mock labeler and people judge the same thing: the
    # warmth of the reply (megacoach/guidelines/warm-replies.md; VADER scores the reply's tone).
    "smollm2-instruct": {
        "model": {"name_or_path": "smollm2-135m-instruct"},
        "task": {"query_source": "builtin:instructions", "chat_template": True,
                 "system_prompt": "You are a friendly assistant. Reply in one or two short sentences.",
                 "query_length": 64, "response_length": 64, "temperature": 0.7, "truncate_token": None,
                 "stop_at_eos": True, "penalty_reward": -1.0},
        "labels": {"labeler": "vader", "num_comparisons": 400, "k": 4, "sample_batch_size": 64,
                   "guideline_version": "warm-replies-v1"},
        "reward": {"learning_rate": 1e-4, "batch_size": 8, "epochs": 1, "normalize_samples": 128, "lora_r": 16,
                   "lora_alpha": 32.0},
        "kl": {"adaptive": True, "init_kl_coef": 0.15, "target": 6.0, "horizon": 1000},
        "ppo": {"total_episodes": 256, "batch_size": 16, "mini_batch_size": 4, "ppo_epochs": 4,
                "learning_rate": 1e-4, "lora_r": 16, "lora_alpha": 32.0},
        "guards": {"baseline_samples": 64, "probe_queries": 16, "preflight_comparisons": 128},
        "run": {"eval_queries": 200, "checkpoint_every": 4},
    },
}


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `megacoach config show` lists every field)"
        elif "input" in e and e["type"] != "value_error":
            msg += f" (got {e['input']!r})"
        parts.append(f"{loc}: {msg}")
    return "invalid config: " + "; ".join(parts)


def build_config(data: dict | None = None) -> Config:
    try:
        return Config.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def read_config_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (expected a .yaml, .yml or .toml file)")
    try:
        text = p.read_text("utf-8")
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml", ".json"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {p}: unknown extension {p.suffix!r} (expected .yaml, .yml or .toml)")
    except (yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {p} cannot be parsed: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping of sections at the top level")
    return data


def parse_override(item: str) -> dict:
    """'ppo.learning_rate=3e-5' -> {'ppo': {'learning_rate': 3e-5}} (values parsed as YAML scalars)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected SECTION.FIELD=VALUE")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. ppo.learning_rate=3e-5")
    value = yaml.safe_load(raw) if raw.strip() else None
    return {parts[0]: {parts[1]: value}}


def load_config(path: str | Path | None = None, preset: str | None = None, overrides: list[dict] | None = None,
                *, base: Config | dict | None = None) -> Config:
    """Defaults <- base <- preset <- config file <- overrides (CLI flags), validated once at the end.

    `base` is a whole saved config to start from instead of the defaults: `megacoach train --resume RUN`
    passes the run folder's config.yaml, with no preset, then its --config file and --set items; a field
    that none of them names keeps its saved value (fields added to megacoach since the run was saved get
    their defaults).
    """
    if isinstance(base, Config):
        base = base.model_dump(mode="json")
    data: dict = dict(base or {})
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r} (expected one of: {', '.join(PRESETS)})")
        data = _deep_merge(data, PRESETS[preset])
    if path:
        data = _deep_merge(data, read_config_file(path))
    for o in overrides or []:
        data = _deep_merge(data, o)
    return build_config(data)


def resume_config(saved: Config | dict, run_dir: str | Path, path: str | Path | None = None,
                  overrides: list[dict] | None = None) -> Config:
    """The config of a resumed run (`megacoach train --resume RUN_DIR`): what wins, last wins.

    saved (RUN_DIR's config.yaml) <- the config file (--config) <- overrides (--set, in order) <- run.out =
    RUN_DIR. No preset and none of train's dedicated flags (--model, --seed, --episodes, ...) apply: a
    resumed run changes only the fields that --config and --set name, and it stays in its folder.
    """
    return load_config(path, None, [*(overrides or []), {"run": {"out": str(run_dir)}}], base=saved)


def save_config(config: Config, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False))


def describe_fields(config_cls: type[BaseModel] = Config) -> list[tuple[str, str, str]]:
    """(dotted name, default, description) for every field: used by `megacoach config show` and the docs."""
    rows = []
    for sec_name, sec_field in config_cls.model_fields.items():
        sec_cls = sec_field.default_factory().__class__
        for name, f in sec_cls.model_fields.items():
            rows.append((f"{sec_name}.{name}", repr(f.default), f.description or ""))
    return rows
