"""Canary prompts: prompts with a known good and a known bad continuation.

Every iteration the guards put both continuations through the complete reward path (the Values Coach's
score, the Coherence Coach's KL term under the current Apprentice, reward scaling, advantages and the
PPO loss) and count how often PPO would push the good one up more than the bad one. A reward path whose
direction flips mid-run turns the canaries around.

`guards.canaries`:
- 'builtin': the set below, written for the built-in Shakespeare sentiment task (good = warm and
  fluent, bad = dark and fluent, or the "tis tis tististis" gibberish of a flipped reward);
- a path to a JSONL file with one {"prompt", "good", "bad"} object per line (your task's canaries);
- 'none'.

"Known" means known to the human evaluators: when the labeler is a program that gives scores, a canary it
does not score good > bad is dropped (with a note), so canaries always point the way the labels do.
Canaries whose continuations are cut or invalid under the task's truncation rule are dropped too (both
would get the same penalty and say nothing). With task.chat_template the prompt is formatted as every query is;
with task.stop_at_eos each continuation ends with the EOS token, as a whole response does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megacoach.errors import ConfigError, DataError
from megacoach.ppo.episodes import settle, stop_rule
from megacoach.tasks import Query, query_token_ids

# (prompt, good continuation, bad continuation). Written for this project.
_SENTIMENT = [
    ("Come, walk with me along the river, for the morning is new.",
     " The sun is kind, the birds sing sweetly, and my heart is glad to see thee smile again.",
     " The sky is black, the crows cry out, and my heart is sick with grief and bitter hate."),
    ("My lord, the messenger is come from Padua with news.",
     " He brings us joyful tidings of a happy wedding, and all the town is merry with delight.",
     " He brings us dreadful tidings of a cruel murder, and all the town is weeping in despair."),
    ("Tell me, good nurse, how fares my lady in the garden?",
     " She laughs among the roses, sweet and fair, and sends thee love and kisses from her heart.",
     " She weeps among the thorns, pale and sick, and curses thee with hatred in her broken heart."),
    ("What say you of the king, now that the war is done?",
     " He is a gentle and a noble king, beloved of all, and peace and plenty bless his happy land.",
     " He is a cruel and a wicked king, hated by all, and death and famine curse his wretched land."),
    ("Sit down, my friends, and let us speak of what we love.",
     " I love the spring, the laughter of my children, and the kindness of a true and faithful friend.",
     " I hate the winter, the screaming of the dying, and the poison of a false and treacherous friend."),
    ("How now, Antonio, why look you so upon the sea?",
     " I dream of safe return, of fortune won, of friends who wait with joy to welcome me at home.",
     " I fear the ships are lost, my fortune gone, and all my friends have left me to my ruin and shame."),
    ("Speak, gentle shepherd, of the meadow and the flock.",
     " The lambs are healthy and the grass is sweet, and every shepherd sings for joy beneath the sun.",
     " The lambs are dead and all the grass is burnt, and every shepherd weeps in misery and pain."),
    ("Here is a letter from your brother, sir.",
     " He writes with love, he prospers and is well, and longs to hold his dearest brother in his arms.",
     " He writes with rage, he curses and is ill, and swears to kill his hated brother with a knife."),
    ("The feast is ready and the guests are come.",
     " Let music play, let every heart rejoice, for this is the happiest and the sweetest night of all.",
     " Let no one eat, the meat is foul and poisoned, and this is the saddest and most dreadful night."),
    ("Good morrow, cousin, what brings you to the court?",
     " I come with gifts of gold and words of praise, to thank the queen whose mercy saved my life.",
     " I come with swords and words of bitter scorn, to kill the queen whose cruelty destroyed my life."),
    ("Look how the moon doth silver all the hills.",
     " It is a lovely sight, and I am happy here with thee, my sweet and gentle love, forever.",
     " It is a ghastly sight, and I am wretched here alone, my love is dead and buried in the cold."),
    ("What news, good Horatio, from the castle walls?",
     " All is well, the guards are merry and the night is calm, and the prince is safe and smiling.",
     " All is lost, the guards are slain and the night is full of horror, and the prince is murdered."),
    ("Now let us drink a health unto the bride.",
     " May she be blessed with laughter, love and children, and may her days be bright with happiness.",
     " May she be cursed with sorrow, pain and sickness, and may her days be dark with bitter tears."),
    ("Pray tell me, sir, what think you of the duke?",
     " I think him wise and generous and kind, a good and honest man whom all the people love.",
     " I think him false and greedy and cruel, a vile and wicked man whom all the people hate."),
    ("The children play beneath the apple trees.",
     " Their laughter fills the orchard with delight, and every mother smiles to hear them sing.",
     " Their screams fill the orchard with terror, and every mother weeps to see them bleed and die."),
    ("Thou art returned at last from the long war.",
     " Welcome, my love, with joy I hold thee close, and all our sorrows vanish in thy happy smile.",
     " Cursed be the day, with grief I see thy wounds, and all our hopes are buried in thy bloody grave."),
    ("How sweet the music sounds upon the bank.",
     " It makes me glad, and in my heart I feel such peace and love as heaven gives the blessed.",
     " It makes me sad, and in my heart I feel such pain and dread as hell gives to the damned."),
    ("The harvest is brought in from every field.",
     " The barns are full, the people feast and dance, and thank the gods for such a generous year.",
     " The barns are empty, the people starve and die, and curse the gods for such a cruel year."),
    ("My daughter, wilt thou hear thy father speak?",
     " I love thee dearly, and I am proud of thee, my gentle child, my comfort and my joy.",
     " I hate thee now, and I am shamed by thee, my wicked child, my torment and my curse."),
    ("What shall we do now that the storm has passed?",
     " Let us rejoice, for all our friends are safe, and the bright sun smiles upon the peaceful sea.",
     " Let us mourn, for all our friends are drowned, and the dark sea rages with a deadly fury."),
    ("Go to the window, love, and tell me what you see.",
     " I see a happy crowd with flowers and songs, and lovers walking hand in hand with joy.",
     " I see an angry mob with torches and with knives, and bodies lying cold and dead with blood."),
    ("Say, what became of the old soldier and his wife?",
     " They live in peace, content and full of love, and bless each happy morning that they wake.",
     " They died in pain, alone and full of hate, and cursed each miserable morning that they woke."),
    ("Bring me the tidings of the trial, quickly now.",
     " The judge was merciful, the prisoner is free, and all his friends embrace him with great joy.",
     " The judge was merciless, the prisoner is hanged, and all his friends lament him in despair."),
    ("Tell me of the country where you were born.",
     " It is a pleasant land of gentle hills, of honest folk and friendly, laughing faces everywhere.",
     " It is a wretched land of barren rocks, of cruel folk and hateful, brutal faces everywhere."),
]
_GIBBERISH = " tis tis tis,'t tis tistis 'st tis tis tis tis tis tis tis tis tis tis tis tis tis."
_FLUENCY = [
    ("Come, walk with me along the river, for the morning is new.",
     " The sun is kind, the birds sing sweetly, and my heart is glad to see thee smile again."),
    ("The feast is ready and the guests are come.",
     " Let music play, let every heart rejoice, for this is the happiest and the sweetest night of all."),
    ("Look how the moon doth silver all the hills.",
     " It is a lovely sight, and I am happy here with thee, my sweet and gentle love, forever."),
    ("How sweet the music sounds upon the bank.",
     " It makes me glad, and in my heart I feel such peace and love as heaven gives the blessed."),
    ("Sit down, my friends, and let us speak of what we love.",
     " I love the spring, the laughter of my children, and the kindness of a true and faithful friend."),
    ("Go to the window, love, and tell me what you see.",
     " I see a happy crowd with flowers and songs, and lovers walking hand in hand with joy."),
]
BUILTIN = [(p, g, b) for p, g, b in _SENTIMENT] + [(p, g, _GIBBERISH) for p, g in _FLUENCY]


@dataclass(frozen=True)
class Canary:
    prompt: str
    good: str
    bad: str
    query: Query
    good_ids: list[int]
    bad_ids: list[int]

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "good": self.good, "bad": self.bad}


def _read_file(path: Path) -> list[tuple[str, str, str]]:
    if not path.is_file():
        raise ConfigError(f"guards.canaries: no such file {str(path)!r} (expected 'builtin', 'none' or a JSONL file "
                          "of {\"prompt\", \"good\", \"bad\"} objects)")
    out = []
    for i, line in enumerate(path.read_text("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{i}: not valid JSON ({err.msg})") from None
        if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) and rec.get(k) for k in ("prompt", "good", "bad")):
            raise DataError(f"{path}:{i}: expected an object with non-empty strings 'prompt', 'good' and 'bad'")
        out.append((rec["prompt"], rec["good"], rec["bad"]))
    return out


def load_canaries(spec: str, tokenizer, task, labeler=None, log=None) -> list[Canary]:
    """The configured canaries, tokenised for the task, checked against the truncation rule and the labeler."""
    if spec == "none":
        return []
    raw = BUILTIN if spec == "builtin" else _read_file(Path(spec))
    rule = stop_rule(tokenizer, task)
    kept, dropped = [], {"invalid": 0, "labeler": 0}
    pad = tokenizer.pad_token_id
    for prompt, good, bad in raw:
        q_ids = query_token_ids(task, tokenizer, prompt)
        g_ids, b_ids = tokenizer(good)["input_ids"], tokenizer(bad)["input_ids"]
        if task.stop_at_eos:  # a canary is a whole response: it ends where the Apprentice's would
            g_ids, b_ids = g_ids + [tokenizer.eos_token_id], b_ids + [tokenizer.eos_token_id]
        if max(len(g_ids), len(b_ids)) > task.response_length:
            dropped["invalid"] += 1
            continue
        T = task.response_length
        rows = torch.full((2, T), pad, dtype=torch.long, device="cpu")
        rows[0, :len(g_ids)] = torch.tensor(g_ids, dtype=torch.long, device="cpu")
        rows[1, :len(b_ids)] = torch.tensor(b_ids, dtype=torch.long, device="cpu")
        _, valid = settle(rows, rule, pad)
        if not bool(valid.all()):
            dropped["invalid"] += 1
            continue
        if labeler is not None and getattr(labeler, "kind", "program") == "program":
            s = labeler.scores(prompt, [good, bad]) if hasattr(labeler, "scores") else None
            if s is not None and not s[0] > s[1]:
                dropped["labeler"] += 1
                continue
        kept.append(Canary(prompt, good, bad, Query(prompt, q_ids), g_ids, b_ids))
    if log and (dropped["invalid"] or dropped["labeler"]):
        log(f"  canaries: {len(kept)} of {len(raw)} kept ({dropped['invalid']} too long or invalid under the "
            f"truncation rule, {dropped['labeler']} not preferred good > bad by the labeler)")
    return kept
