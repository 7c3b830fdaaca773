"""The command lines: ``train.py``/``cwd-train`` (:mod:`.train`) and ``evaluate.py``/``cwd-eval`` (:mod:`.evaluate`)."""
