"""Continuations: K truncated responses per query with the task's sampling settings (`TaskSampler`).

Used by `megacoach sample`, by the mock labelers' data collection (`label auto`) and by reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rich.panel import Panel

from megacoach.config import Config, TaskConfig
from megacoach.errors import DataError
from megacoach.hardware import load_model
from megacoach.ppo import episodes
from megacoach.progress import StageProgress
from megacoach.sampling import HFGenerator, ResponseGenerator
from megacoach.tasks import Query, load_queries, query_token_ids


@dataclass
class Continuation:
    query: Query
    response_ids: list[int]  # truncated, without padding
    text: str  # decoded truncated response
    valid: bool  # contains the truncate token after the minimum position (with stops: stopped in time)
    sampled_ids: list[int]  # response_length tokens as sampled (with stops: padding after the stop)


class TaskSampler:
    """Queries -> truncated continuations, with one generator, one tokenizer and the task's rules."""

    def __init__(self, generator: ResponseGenerator, tokenizer, task: TaskConfig):
        self.gen, self.tok, self.task = generator, tokenizer, task
        self.stops = episodes.stop_rule(tokenizer, task, device=self.device)

    @property
    def device(self) -> torch.device:
        """Where the generator samples (its random generator must live there): the CPU for an engine that says
        nothing."""
        return getattr(self.gen, "device", torch.device("cpu"))

    def query_tensor(self, queries: list[Query]) -> torch.Tensor:
        return episodes.pad_queries(queries, self.tok.pad_token_id, self.task.query_length)

    def continuations(self, queries: list[Query], k: int, generator: torch.Generator | None,
                      batch_size: int = 64, progress: StageProgress | None = None) -> list[list[Continuation]]:
        """k continuations of each query (each query is read once; its KV cache serves its k continuations).

        progress: told after each sampling call (`batch_size` continuations; `advance` counts continuations). The
        calls are the ones one `episodes.sample` over all queries makes, in the same order from the same random
        generator, so the continuations do not depend on whether progress is shown."""
        step = max(1, batch_size // k)  # queries per sampling call, as episodes.sample cuts them
        chunks = [queries] if progress is None else [queries[i:i + step] for i in range(0, len(queries), step)]
        out: list[list[Continuation]] = []
        for chunk in chunks:
            s = episodes.sample(self.gen, self.tok, self.task, self.stops, chunk, generator, batch_size, repeats=k)
            for i, q in enumerate(chunk):
                rows = range(i * k, (i + 1) * k)
                out.append([Continuation(q, s.ids[r], s.texts[r], bool(s.valid[r]), s.responses[r].tolist())
                            for r in rows])
            if progress is not None:
                progress.advance(len(chunk) * k)
        return out


def print_samples(cfg: Config, n: int, n_queries: int, prompt: str | None, console) -> None:
    torch.manual_seed(cfg.run.seed)
    torch.set_num_threads(cfg.run.threads)
    model, tok = load_model(cfg)
    if prompt is not None:
        if not prompt.strip():
            raise DataError("--prompt is empty (expected some text to continue)")
        queries = [Query(prompt, query_token_ids(cfg.task, tok, prompt))]
    else:
        queries = load_queries(cfg.task, tok, "eval", n_queries, cfg.run.seed)
    sampler = TaskSampler(HFGenerator(model, tok.pad_token_id), tok, cfg.task)
    groups = sampler.continuations(queries, n, torch.Generator(device=sampler.device).manual_seed(cfg.run.seed))
    t = cfg.task
    if t.early_stop:
        stops = [repr(x) for x in t.stop or []] + (["EOS"] if t.stop_at_eos else [])
        if t.truncate_token is not None:
            stops.append(f"{t.truncate_token!r} (position >= {t.truncate_after})")
        rule = f"at most {t.response_length} tokens, temperature {t.temperature}, stop at {', '.join(stops)}"
        missing = "no stop"
    else:
        rule = (f"{t.response_length} tokens, temperature {t.temperature}, truncate after {t.truncate_token!r} "
                f"(position >= {t.truncate_after})")
        missing = f"no {t.truncate_token!r}"
    console.print(f"[dim]Apprentice: {cfg.model.name_or_path} | response {rule}[/]")
    for q, group in zip(queries, groups):
        console.print(Panel(q.text, title="query", title_align="left"))
        for j, c in enumerate(group, 1):
            flag = "[green]valid[/]" if c.valid else f"[red]invalid: {missing} -> penalty {t.penalty_reward}[/]"
            trunc = " [dim](truncated)[/]" if c.valid and len(c.response_ids) < cfg.task.response_length else ""
            console.print(f"[bold]{j}.[/] {flag}{trunc}")
            console.print("   " + c.text.replace("\n", "\n   "), markup=False, highlight=False)
