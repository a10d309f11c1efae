"""The task: where queries come from (the built-in Shakespeare excerpts, a JSONL/text file, or a dataset).

The rules applied to the responses (truncation, validity) are the episode's: megacoach/ppo/episodes.py.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from megacoach.config import TaskConfig
from megacoach.errors import ConfigError, DataError
from megacoach.lm.corpus import split_plays

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


# ----------------------------------------------------------------------------------------------- queries
@dataclass(frozen=True)
class Query:
    text: str
    token_ids: list[int]


def _builtin_texts(split: str) -> list[str]:
    train, held = split_plays()
    plays = train if split == "train" else held
    return [s for p in plays for s in p.speeches]


def builtin_excerpts(tokenizer, split: str, n: int, min_tokens: int, max_tokens: int, seed: int) -> list[Query]:
    """Excerpts of Shakespeare speeches that start and end at sentence boundaries (like the paper's book
    passages), each between `min_tokens` and `max_tokens` tokens. split: 'train' (held-in plays) or 'eval'
    (held-out plays, never seen in pretraining)."""
    rng = random.Random(seed)
    speeches = _builtin_texts(split)
    out: list[Query] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n and tries < n * 50:
        tries += 1
        sentences = [s for s in _SENTENCE_END.split(rng.choice(speeches)) if s]
        starts = [i for i, s in enumerate(sentences) if s[0].isupper()]
        if not starts:
            continue
        text, best = "", ""
        for s in sentences[rng.choice(starts):]:
            cand = (text + " " + s).strip() if text else s
            if len(tokenizer(cand)["input_ids"]) > max_tokens:
                break
            text = cand
            if text[-1] in ".!?":
                best = text  # the longest prefix that ends at a sentence boundary
        text = best
        ids = tokenizer(text)["input_ids"] if text else []
        if len(ids) >= min_tokens and text not in seen:
            seen.add(text)
            out.append(Query(text, ids))
    if len(out) < n:
        raise DataError(f"the built-in corpus gave only {len(out)} of {n} excerpts of {min_tokens}-{max_tokens} "
                        "tokens; lower task.query_min_tokens or raise task.query_length")
    return out


def _file_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"task.query_source: no such file {str(path)!r} (expected a .txt or .jsonl file)")
    lines = path.read_text("utf-8").splitlines()
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{i}: not valid JSON ({err.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise DataError(f"{path}:{i}: expected an object with a string field 'text'")
            texts.append(rec["text"])
    else:
        texts = [ln for ln in lines if ln.strip()]
    if not texts:
        raise DataError(f"task.query_source: {path} contains no queries (expected one per line)")
    return texts


SHIPPED_PROMPTS = ("instructions",)  # prompt files shipped with megacoach (megacoach/prompts/NAME.txt)


def shipped_prompts_path(name: str) -> Path:
    """The prompts file `builtin:NAME` names: one of SHIPPED_PROMPTS, in the package."""
    from importlib import resources

    if name not in SHIPPED_PROMPTS:
        raise ConfigError(f"task.query_source: unknown prompts 'builtin:{name}' (shipped: "
                          f"{', '.join('builtin:' + n for n in SHIPPED_PROMPTS)})")
    return Path(str(resources.files("megacoach") / "prompts" / f"{name}.txt"))


def _hf_texts(spec: str) -> list[str]:
    from datasets import load_dataset

    parts = spec.split(":")  # hf:NAME[:SPLIT[:FIELD]]
    name, split, field = parts[1], (parts[2] if len(parts) > 2 else "train"), (parts[3] if len(parts) > 3 else "text")
    try:
        ds = load_dataset(name, split=split)
    except Exception as err:
        raise DataError(f"task.query_source: dataset {name!r} cannot be loaded: {str(err).splitlines()[0][:200]}") from None
    if field not in ds.column_names:
        raise DataError(f"task.query_source: dataset {name!r} has no field {field!r} (has {ds.column_names})")
    return [t for t in ds[field] if isinstance(t, str) and t.strip()]


def check_chat_template(task: TaskConfig, tokenizer) -> None:
    """ConfigError when task.chat_template is asked of a tokenizer that has none."""
    if task.chat_template and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("task.chat_template: the model's tokenizer has no chat template (tokenizer_config.json "
                          "'chat_template', or chat_template.jinja); set task.chat_template=false for plain-text queries")


def query_token_ids(task: TaskConfig, tokenizer, text: str) -> list[int]:
    """The tokens the Apprentice reads for a query: the text itself (the paper), or with task.chat_template the
    text as a user message (after task.system_prompt) in the tokenizer's chat template, the generation prompt
    appended; cut to the last `query_length` tokens either way."""
    if not task.chat_template:
        return tokenizer(text)["input_ids"][-task.query_length:]
    check_chat_template(task, tokenizer)
    messages = ([{"role": "system", "content": task.system_prompt}] if task.system_prompt is not None else [])
    messages.append({"role": "user", "content": text})
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"][-task.query_length:]


def load_queries(task: TaskConfig, tokenizer, split: str, n: int, seed: int) -> list[Query]:
    """`n` queries for `split` ('train' or 'eval'), tokenised (`query_token_ids`: with task.chat_template, in the
    tokenizer's chat template) and cut to the last `query_length` tokens. A query's text is what was asked (the
    prompt, without the template)."""
    check_chat_template(task, tokenizer)
    src = task.query_source
    if src == "builtin" and task.chat_template:
        return [Query(q.text, query_token_ids(task, tokenizer, q.text)) for q in
                builtin_excerpts(tokenizer, split, n, task.query_min_tokens, task.query_length,
                                 seed + (0 if split == "train" else 7919))]
    if src == "builtin":
        return builtin_excerpts(tokenizer, split, n, task.query_min_tokens, task.query_length,
                                seed + (0 if split == "train" else 7919))
    if src.startswith("builtin:"):
        texts = _file_texts(shipped_prompts_path(src.split(":", 1)[1]))
    else:
        texts = _hf_texts(src) if src.startswith("hf:") else _file_texts(Path(src))
    rng = random.Random(seed + (0 if split == "train" else 7919))
    # files have no natural split: the last 10% (at least one) is the eval split
    n_eval = max(1, len(texts) // 10) if len(texts) > 1 else 0
    pool = texts[-n_eval:] if split == "eval" and n_eval else texts[: len(texts) - n_eval] or texts
    chosen = [pool[rng.randrange(len(pool))] for _ in range(n)] if len(pool) < n else rng.sample(pool, n)
    return [Query(t, query_token_ids(task, tokenizer, t)) for t in chosen]
