"""hallupatch's drop-in modeling files for trust_remote_code checkpoints (copied into a checkpoint folder
by ``python -m hallupatch.modeling install``; not imported as modules of this package)."""
