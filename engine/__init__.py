"""The generation loops: the Lightning loop over a modality (:mod:`engine.loop`), the analytic recipes' NumPy loop
vectorised over seeds (:mod:`engine.analytic`), and the Trainer settings every Lightning recipe shares
(:mod:`engine.trainer`)."""
