"""The application layer: run directories, the run driver, figures and the CLI helpers."""
