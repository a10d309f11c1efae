"""Online labeling: the human evaluators label the current Apprentice's samples while it trains.

Every `online.collect_every` iterations a batch of items (a query and K continuations of the CURRENT Apprentice,
with provenance: run, iteration, seed) goes into the label store. People label them in the labeling app
(`megacoach label serve`), a mock labeler labels them at once (`online.mock_labeler`), or both. After every
`online.retrain_every_labels` new labels the Values Coach is retrained from a fresh head on all labels so far
(ORIG retrains ~20 times per run), normalised on the initial policy's samples, checked by the guards' preflight,
and swapped in at the next iteration boundary.

Modes: 'online' retrains in a background thread while PPO continues (not bit-reproducible: the swap point depends
on timing); 'batched' collects a batch, waits until it is labeled, retrains, then continues (reproducible with
mock labelers; the paper's later advice, since online collection hid data-quality problems until runs ended).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from megacoach import seeds
from megacoach.errors import HaltError
from megacoach.hardware import Hardware, resolve, weights_dtype_name
from megacoach.labels.labelers import label_items
from megacoach.labels.records import NewSample
from megacoach.reward.train import retrain_from_scratch
from megacoach.tasks import load_queries


class OnlineLabeling:
    def __init__(self, cfg, store, sampler, run_id: str, run_path: Path, norm_sequences: torch.Tensor, log,
                 mock_labeler=None, hw: Hardware | None = None):
        self.cfg, self.store, self.sampler, self.run_id = cfg, store, sampler, run_id
        self.hw = hw or resolve(cfg)  # the retrained Values Coaches live on the run's device
        self.run_path, self.norm, self.log, self.mock = run_path, norm_sequences, log, mock_labeler
        self.last_retrain_count = store.count_comparisons(split="train")
        self.retrains = 0
        self.pending_batches: list[str] = []
        self._thread: threading.Thread | None = None
        self._result = None
        self._error: BaseException | None = None

    # ---------------------------------------------------------------- collection
    def collect(self, iteration: int) -> str:
        """Put a batch of current-policy items in the store (and label it with the mock labeler, if any)."""
        o, seed = self.cfg.online, self.cfg.run.seed
        batch = f"{self.run_id}/online-{iteration:05d}"
        queries = load_queries(self.cfg.task, self.sampler.tok, "train", o.items_per_batch,
                               seeds.seed_of(seed, seeds.Stream.ONLINE_QUERIES, iteration))
        groups = self.sampler.continuations(queries, self.cfg.labels.k,
                                            seeds.generator(seed, seeds.Stream.ONLINE_SAMPLING, iteration,
                                                            device=self.sampler.device))
        rng = seeds.rng(seed, seeds.Stream.ONLINE_SAMPLING, iteration)
        specs = [dict(query_text=q.text, query_token_ids=q.token_ids, batch=batch, source="online", run_id=self.run_id,
                      split="valid" if rng.random() < self.cfg.labels.valid_fraction else "train",
                      samples=[NewSample(c.text, c.response_ids, policy=f"{self.run_id}@{iteration}",
                                         iteration=iteration, seed=seed, run_id=self.run_id) for c in g])
                 for q, g in zip(queries, groups)]
        contents = self.store.create_items(specs)
        if self.mock is not None:
            label_items(self.store, self.mock, contents, rng=rng, guideline_version=self.cfg.labels.guideline_version)
        self.pending_batches.append(batch)
        return batch

    def wait_for_batch(self, batch: str) -> None:
        """Batched mode: block until every item of `batch` has a label (people may be labeling it now)."""
        deadline = time.time() + self.cfg.online.wait_timeout_s
        while self.store.items_without_labels(batch=batch, limit=1):
            if time.time() > deadline:
                raise HaltError(f"online: batch {batch} was not labeled within {self.cfg.online.wait_timeout_s:.0f}s; "
                                "the run is checkpointed, resume it when the labelers are back")
            time.sleep(2.0)

    # ---------------------------------------------------------------- retraining
    def _retrain(self, seed: int):
        train = self.store.comparisons(split="train")
        valid = self.store.comparisons(split="valid")
        hw = self.hw
        model, metrics = retrain_from_scratch(self.cfg.model.name_or_path, train, valid, self.cfg.reward,
                                              normalisation_samples=self.norm, seed=seed, log=None,
                                              dtype=weights_dtype_name(hw.values_coach_training),
                                              tokenizer=self.sampler.tok, device=hw.device,
                                              precision=hw.values_coach_training)
        model.eval()
        return model, metrics, len(train)

    def _background(self, seed: int) -> None:
        try:
            self._result = self._retrain(seed)
        except BaseException as err:  # reported at the next iteration boundary
            self._error = err

    def step(self, iteration: int):
        """Called after every PPO iteration. Returns (new Values Coach, metrics) when one is ready to swap in."""
        o = self.cfg.online
        if iteration % o.collect_every == 0:
            batch = self.collect(iteration)
            if o.mode == "batched":
                self.wait_for_batch(batch)
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        if self._result is not None:  # a background retrain finished
            model, metrics, n = self._result
            self._result, self._thread = None, None
            return self._finish(model, metrics, n)
        n_train = self.store.count_comparisons(split="train")
        if n_train - self.last_retrain_count < o.retrain_every_labels or self._thread is not None:
            return None
        self.last_retrain_count = n_train
        seed = self.cfg.run.seed + int(seeds.Stream.ONLINE_RETRAIN) * (self.retrains + 1)  # retrain r: seed + 7 r
        if o.mode == "batched":
            return self._finish(*self._retrain(seed))
        self._thread = threading.Thread(target=self._background, args=(seed,), daemon=True)
        self._thread.start()
        return None

    def _finish(self, model, metrics, n_labels: int):
        self.retrains += 1
        path = self.run_path / f"values_coach_r{self.retrains:02d}"
        model.save_pretrained(path)
        model.set_precision(self.hw.values_coach)  # saved as trained; PPO scores with it in its own precision
        self.log(f"Values Coach retrained (#{self.retrains}) on {n_labels} labels: held-out accuracy "
                 f"{metrics.get('valid_accuracy')} (with every choice reversed {metrics.get('valid_reversed_accuracy')}); "
                 f"saved to {path}")
        metrics = {"online/retrains": self.retrains, "online/labels": n_labels,
                   "online/valid_accuracy": metrics.get("valid_accuracy"),
                   "online/valid_reversed_accuracy": metrics.get("valid_reversed_accuracy")}
        return model, metrics

    def state_dict(self) -> dict:
        return {"last_retrain_count": self.last_retrain_count, "retrains": self.retrains,
                "pending_batches": list(self.pending_batches)}

    def load_state_dict(self, state: dict) -> None:
        self.last_retrain_count = state["last_retrain_count"]
        self.retrains = state["retrains"]
        self.pending_batches = list(state["pending_batches"])
