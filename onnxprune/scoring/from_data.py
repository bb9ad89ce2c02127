"""Criteria measured on calibration data (see calibration.py for how).

- ``taylor``: |mean over samples of sum(a * dL/da)| per channel, at the read
  points; equals |sum w * dL/dw| over the channel's reader weights. A
  first-order estimate of the loss change when the channel goes.
- ``fisher``: mean over samples of (sum a * dL/da)^2 / 2 (OBD's diagonal with
  the Fisher for the Hessian). Also in loss units.
- ``activation``: mean |a| of the channel, divided by the group's mean, so
  that --global ranks channels by how active they are relative to their layer.
- ``apoz``: 1 - average percentage of zeros after a ReLU-like op (channels
  that are mostly zero matter least). A group without such an op returns
  None, and the caller falls back to l2 with a warning; so does every
  criterion for a group that could not be measured (channels inside a
  subgraph, which onnxruntime does not hand out).
- ``obs``: the fraction of each reader's output that removing the channel
  costs after the best least-squares refit of the reader (obs.py); the
  criterion that matches reconstruction.
"""

from __future__ import annotations


def taylor(stats):
    return stats.taylor


def fisher(stats):
    return stats.fisher


def activation(stats):
    if stats.abs_mean is None:  # not measured (channels inside a subgraph)
        return None
    scale = float(stats.abs_mean.mean())
    return stats.abs_mean / scale if scale > 0 else stats.abs_mean.copy()


def apoz(stats):
    if not stats.relu_seen:
        return None
    return 1.0 - stats.zeros


def obs(stats):
    return stats.obs


GRADIENT = {"taylor": taylor, "fisher": fisher}
ACTIVATION = {"activation": activation, "apoz": apoz}
GRAM = {"obs": obs}  # measured from the Gram matrices at the readers' inputs (obs.py)
