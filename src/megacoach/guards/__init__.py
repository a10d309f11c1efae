"""Guards against the section 4.4 incident (a sign flip that makes PPO optimise for what people like least).

Layers, each one general (none knows where a bug might sit; all read the reward path through the trainer's
own functions):
  preflight   (preflight.py)  before the first update, on resume, after every Values Coach (re)load:
                              the reward path must push labeled preferences up, component by component;
  batch check (core.py)       every batch, before PPO's update: the actual loss must push up what the
                              Values Coach scores high and push down what drifted from the original model;
  monitors    (monitors.py)   every iteration: labelers vs current samples, the Values Coach vs fresh labels,
                              canaries, divergence, KL budget, non-finite values;
  Andon cord                  any person stops the run (`megacoach andon RUN_DIR --reason ...`).
Bug variants for demonstrations and tests: bugs.py. `megacoach incident` (megacoach/incident.py) reproduces the incident.
"""

from megacoach.guards.alarms import Alarm, GuardFailure, GuardHalt

__all__ = ["Alarm", "GuardFailure", "GuardHalt"]
