"""Sweeps with Ray Tune over `tune_spaces/<method>.yaml`, and model soups of their checkpoints.

    space.py    tune space YAML → Ray Tune domains over run-spec paths (validated against the spec)
    sweep.py    the Tuner: one driver function per trial that builds and fits the TorchTrainer; ASHA
    report.py   results.csv / results.md / metric.png / best_config.yaml
    heldout.py  held-out scoring (−loss or exact match) for soups
    soups.py    uniform and greedy soups (Wortsman et al. 2022)
    run.py      `ftray tune`: sweep → reports → optional soup vs best single vs mean single
"""
