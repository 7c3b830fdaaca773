"""The command lines: ``train.py``/``cwd-train`` (:mod:`.train`, its flags turned into one run configuration
by :mod:`.train_config`), ``evaluate.py``/``cwd-eval`` (:mod:`.evaluate`), ``predict.py`` (:mod:`.predict`);
their shared parser (:mod:`.parser`) and value checks (:mod:`.checks`)."""
