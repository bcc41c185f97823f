"""AXOL1TL's stages around training an anomaly detector: preparation, scores and thresholds.

- :mod:`trainers.anomaly.prepare`: saturation, normalization (statistics from the
  training split only) and fixed-point quantization, as trigger firmware consumes.
- :mod:`trainers.anomaly.scores`: anomaly scores, thresholds at target trigger rates,
  signal efficiencies and ROC AUC.
"""
