"""Byzantine robustness: robust aggregators, attacks on payload rows, and payload validation.

Each rule is a class built from its config node by ``_target_`` (``conf/aggregator/``,
``conf/attack/``) or by hand (``Krum(f=2)``); :func:`validate_payloads` screens untrusted
per-worker payloads before aggregation.
"""

from diloco.adversary.aggregators import (
    NNM,
    Aggregator,
    Bucketing,
    CenteredClipping,
    CoordinateMedian,
    GeometricMedian,
    Krum,
    Mean,
    MultiKrum,
    TrimmedMean,
)
from diloco.adversary.attacks import (
    ALIE,
    IPM,
    Attack,
    FreeRider,
    Gaussian,
    Malformed,
    Mimic,
    MinMax,
    NoAttack,
    SignFlip,
    Stale,
)
from diloco.adversary.validate import validate_payloads

__all__ = [
    "ALIE",
    "IPM",
    "NNM",
    "Aggregator",
    "Attack",
    "Bucketing",
    "CenteredClipping",
    "CoordinateMedian",
    "FreeRider",
    "Gaussian",
    "GeometricMedian",
    "Krum",
    "Malformed",
    "Mean",
    "Mimic",
    "MinMax",
    "MultiKrum",
    "NoAttack",
    "SignFlip",
    "Stale",
    "TrimmedMean",
    "validate_payloads",
]
