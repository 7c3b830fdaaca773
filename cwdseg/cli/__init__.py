"""The command lines: ``train.py``/``cwd-train`` (:mod:`.train`), ``evaluate.py``/``cwd-eval`` (:mod:`.evaluate`),
``predict.py`` (:mod:`.predict`); their shared parser (:mod:`.parser`) and value checks (:mod:`.checks`)."""
