"""The pipeline: methods declare stages (stages.py), the core runs them streaming on one store (core.py), and
run.py turns a run config into a run directory. Import the modules directly: this package imports nothing, so
that a method importing stages never imports the runner that imports methods."""
