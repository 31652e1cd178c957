"""The commands' jobs: each a plain function over its options (project, score, inrun,
fidelity, demo, the checks, inspect)."""
