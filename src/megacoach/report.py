"""Reporting: TensorBoard / W&B logging during a run, and the HTML report at its end.

RUN_DIR/report.html shows score, KL, beta and the labelers' score against iteration, the guards' state,
and samples of the initial and final Apprentice side by side for the same held-out queries
(also machine-readable in RUN_DIR/before_after.jsonl: {"query", "initial", "final", ...} per line).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

SIGN_CONVENTION = ("Sign convention: every reward term is something PPO maximises. Megacoach reward = score "
                   "(Values Coach, normalised; or the invalid-response penalty) − β · KL, with "
                   "KL = log p_Apprentice − log p_original summed over the response (the Coherence Coach). "
                   "objective/score_total = objective/score − objective/kl_coef · objective/kl.")


class Loggers:
    """metrics.jsonl is written by the run folder; this adds TensorBoard always and W&B when asked."""

    def __init__(self, run_dir: Path, use_wandb: bool, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(run_dir / "tb"))
        self.wandb = None
        if use_wandb:
            try:
                import wandb  # type: ignore

                self.wandb = wandb.init(project="megacoach", dir=str(run_dir), config=config)
            except ImportError:
                print("run.wandb is set but wandb is not installed; logging to TensorBoard only")

    def log(self, metrics: dict, step: int) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_samples(self, rows: list[dict], step: int) -> None:
        text = "| query | response | score | KL |\n|---|---|---|---|\n" + "\n".join(
            f"| {r['query'][-80:]!r} | {r['response']!r} | {r['score']:.3f} | {r['kl']:.2f} |" for r in rows)
        self.tb.add_text("samples", text, step)

    def close(self) -> None:
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _plot_png(metrics: list[dict], keys: list[tuple[str, str]], title: str, marks: list[int] | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    for key, label in keys:
        xs = [m["iteration"] for m in metrics if key in m]
        ys = [m[key] for m in metrics if key in m]
        if xs:
            ax.plot(xs, ys, marker=".", label=label)
    for x in marks or []:
        ax.axvline(x, color="red", linestyle="--", linewidth=1)
    ax.set_xlabel("iteration")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _score_change(r: dict) -> str:
    if "initial_labeler_score" not in r:
        return "(people's labels)"
    return f"{r['initial_labeler_score']:+.2f} → {r['final_labeler_score']:+.2f}"


def write_before_after(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def write_report(run_dir: Path, metrics: list[dict], before_after: list[dict], summary: dict,
                 halted: dict | None = None) -> Path:
    marks = [halted["iteration"]] if halted and "iteration" in halted else []
    plots = [
        _plot_png(metrics, [("objective/score", "score (Values Coach)"), ("objective/score_total",
                  "Megacoach reward (score − β·KL)")], "Values Coach score", marks),
        _plot_png(metrics, [("labeler/score", "labelers' score (mock: VADER)")], "Human evaluators' verdict", marks),
        _plot_png(metrics, [("objective/kl", "KL to the original model (nats)")], "Coherence Coach: KL", marks),
        _plot_png(metrics, [("objective/kl_coef", "β")], "Coherence Coach: β", marks),
    ]
    e = html.escape
    rows = "\n".join(
        f"<tr><td>{e(r['query'][-160:])}</td><td>{e(r['initial'])}</td><td>{e(r['final'])}</td>"
        f"<td>{_score_change(r)}</td></tr>"
        for r in before_after[:60])
    summary_rows = "\n".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in summary.items())
    halt_html = ""
    if halted:
        halt_html = (f"<div class='halt'><h2>Halted at iteration {e(str(halted.get('iteration')))}</h2>"
                     f"<p>{e(str(halted.get('reason')))}</p><pre>{e(json.dumps(halted.get('evidence', {}), indent=2, default=str)[:6000])}</pre></div>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>megacoach report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;width:100%}}td,th{{border:1px solid #ccc;padding:4px;vertical-align:top;font-size:13px;white-space:pre-wrap}}
.halt{{background:#fee;border:2px solid #c00;padding:1em}}img{{max-width:49%}}</style></head><body>
<h1>megacoach run report</h1>
<p>The Apprentice (policy) was trained by PPO on the Megacoach reward: the Values Coach's score (reward model
trained on the human evaluators' best-of-K comparisons) minus β times the Coherence Coach's KL to the original model.</p>
<p><small>{e(SIGN_CONVENTION)}</small></p>
{halt_html}
<h2>Summary</h2><table>{summary_rows}</table>
<h2>Curves</h2>{''.join(f'<img src="data:image/png;base64,{p}">' for p in plots)}
<h2>Initial vs final Apprentice on held-out queries</h2>
<p>Same queries, the training's sampling settings. Full list: before_after.jsonl.</p>
<table><tr><th>query</th><th>initial</th><th>final</th><th>labelers' score</th></tr>{rows}</table>
</body></html>"""
    out = run_dir / "report.html"
    out.write_text(page)
    return out
