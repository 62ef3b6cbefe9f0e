"""The sidecar trainer: flagged frames in, labelled data and new model versions out.

``queue`` receives frames from drivers, ``selection`` picks which to label, ``reference``
holds the reference calculators (one registry), ``labelling`` runs them (Parsl or in-process),
``store`` keeps every frame and label in an ASE database, ``loop`` updates the posterior and
publishes model versions.
"""
