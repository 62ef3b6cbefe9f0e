"""Posteriors over MACE weights, behind one interface.

``load_posterior(path, device="cpu")`` reads a rarefly model file (``.rfly``) and returns a
:class:`rarefly.posterior.base.Posterior`, which implements
:class:`rarefly.prediction.Predictor`: ``predict(structures) -> list[Prediction]``.
"""
