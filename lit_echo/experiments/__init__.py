"""The evidence behind lit_echo's claim: online ECHO / PaW against action masking on ShellWorld.

``python -m lit_echo.experiments.compare`` trains five arms from one warm start over several training seeds,
evaluates every run every few steps on held-out ShellWorld (unseen trees, unseen task types) and on held-out
world-model buffers, and writes ``results.csv``, ``results.png`` and ``results.md``. Modules: :mod:`.grid` (arms,
sizes, configs), :mod:`.evaluation` (one evaluation point), :mod:`.intervals` (confidence intervals),
:mod:`.results` (the CSV), :mod:`.report` (plot and table), :mod:`.compare` (the resumable command).
"""
